"""A processor's config file (`logferry process --config processor.toml`).

`ProcessorSection` is also what `Processor(...)` keyword arguments are validated against,
so the Python API and the TOML file cannot drift apart.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from logferry.config import PinToCpu, StrictModel, TopicName, topic_problem
from logferry.kafka import KafkaSettings
from logferry.processors.failures import retry_topic

# Seconds before a delayed retry; finite, as it names a topic (<topic>.retry.5s).
RetryDelay = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class MetricsSettings(StrictModel):
    address: str = "127.0.0.1:9465"
    enabled: bool = True


class FilterSettings(StrictModel):
    """Entries not matching are committed without calling the handler."""

    levels: list[str] | None = None  # keep only these levels (entries without a level are dropped)
    # field -> allowed values; a field is a LogEntry field (service, host, source) or an attribute.
    fields: dict[str, list[str]] = Field(default_factory=dict)


class ProcessorSection(StrictModel):
    group: str = Field(min_length=1)
    topics: list[TopicName] = Field(min_length=1)
    # Served only when the `topics` have no work waiting (priority).
    low_priority_topics: list[TopicName] = Field(default_factory=list)
    handler: str | None = None  # "pkg.module:function"
    builtin: Literal["stats", "archive", "forward"] | None = None
    ordering: Literal["key", "partition", "unordered"] = "key"
    concurrency: int = Field(64, ge=1, le=4096)
    # Run a plain (not async) handler on the poll thread itself, no worker threads (`concurrency` unused):
    # cheapest for fast CPU-bound handlers; each call holds up polling while it runs.
    inline: bool = False
    # Run the poll loop and the worker threads on this one CPU (logferry/affinity.py); the Kafka
    # clients' threads keep the CPUs of the thread that called run(). Threads a handler starts, or
    # clients it makes lazily, inherit the pin. Leave unset when handlers do parallel work in C that
    # releases the GIL (compression, numpy), or when other busy processes are pinned to the same CPU.
    pin_to_cpu: PinToCpu = None
    # Backlog inside the process: pause every partition at `max_in_flight`, resume at `resume_at`.
    max_in_flight: int = Field(2_000, ge=1)
    resume_at: int | None = Field(None, ge=0)  # default: half of max_in_flight
    rate_limit: float | None = Field(None, gt=0)  # entries/s for this process
    rate_burst: float | None = Field(None, gt=0)
    batch_size: int = Field(500, ge=1, le=100_000)  # records per consume() call
    # While running, leave the objects that exist at start (imports, clients, config) out of every
    # garbage collection (CPython's gc.freeze; undone at exit): halves the collector's time per record.
    gc_freeze: bool = True
    # Failures: in-place retries (key order kept), then delayed retry topics, then the DLQ.
    retries: int = Field(3, ge=0)
    backoff_initial: float = Field(0.1, ge=0)
    backoff_max: float = Field(10.0, ge=0)
    retry_delays: list[RetryDelay] = Field(default_factory=list)  # seconds; topics <topic>.retry.<delay>
    dead_letter_topic: TopicName | None = None  # default "<group>.dlq"
    filter: FilterSettings = Field(default_factory=FilterSettings)
    commit_interval: float = Field(1.0, gt=0)
    shutdown_grace: float = Field(10.0, ge=0)  # SIGTERM: time for in-flight work before giving up
    revoke_grace: float = Field(5.0, ge=0)  # rebalance: time for a revoked partition's running work
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"  # a new group starts here
    session_timeout_ms: int = Field(10_000, ge=1000)
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    # Live replay: follow `logferry replay` commands on this topic (processors/control.py).
    live_replay: bool = True
    control_topic: TopicName = "logferry.control"
    # Exactly-once: handler results go to `output_topic` in one transaction with the consumed offsets.
    exactly_once: bool = False
    output_topic: TopicName | None = None
    # Stable per member across restarts (transactional.id); default: the host name.
    member_id: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ProcessorSection:
        if self.resume_at is not None and self.resume_at >= self.max_in_flight:
            raise ValueError("resume_at must be below max_in_flight")
        if self.revoke_grace * 1000 >= self.max_poll_interval_ms:
            raise ValueError("revoke_grace must be shorter than max_poll_interval_ms")
        if self.exactly_once and not self.output_topic:
            raise ValueError("exactly_once needs an output_topic for the handler's results")
        # Topics named after others: refused here rather than by the broker when the member starts.
        if self.dead_letter_topic is None and (problem := topic_problem(self.dlq_topic)):
            raise ValueError(f"the dead-letter topic named after the group: {problem}; set dead_letter_topic")
        for topic in [*self.topics, *self.low_priority_topics]:
            for delay in self.retry_delays:
                if problem := topic_problem(retry_topic(topic, delay)):
                    raise ValueError(f"retry topic of {topic!r} after {delay:g} s: {problem}")
        return self

    @property
    def low_watermark(self) -> int:
        return self.resume_at if self.resume_at is not None else self.max_in_flight // 2

    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.group}.dlq"


class ArchiveSettings(StrictModel):
    directory: str
    compresslevel: int = Field(6, ge=1, le=9)


class ForwardSettings(StrictModel):
    topic: TopicName
    filter: FilterSettings = Field(default_factory=FilterSettings)


class ProcessorConfig(StrictModel):
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    processor: ProcessorSection
    archive: ArchiveSettings | None = None
    forward: ForwardSettings | None = None

    @model_validator(mode="after")
    def _builtin_needs_section(self) -> ProcessorConfig:
        b = self.processor.builtin
        if b in ("archive", "forward") and getattr(self, b) is None:
            raise ValueError(f"processor.builtin = {b!r} needs an [{b}] table")
        return self
