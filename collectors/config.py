"""The agent's config file (`logferry collect --config agent.toml`).

Every section is validated up front: unknown keys, unknown source kinds or parsers, bad
regexes and topic templates naming unknown fields fail before anything starts, with a
message naming the key.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from logferry.collectors.spill import SpoolSettings
from logferry.config import PinToCpu, StrictModel, topic_problem
from logferry.kafka import KafkaSettings

ParserKind = Literal["raw", "json", "syslog", "logfmt", "regex"]
Level = Literal["trace", "debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]
# Fields of a LogEntry a template, a key or a filter may name; anything else is an attribute.
ENTRY_FIELDS = ("host", "source", "service", "level", "message")


def _check_regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
    return value


class MetricsSettings(StrictModel):
    address: str = "127.0.0.1:9464"
    enabled: bool = True


class ParserSettings(StrictModel):
    kind: ParserKind = "raw"
    # regex parser: named groups become fields (message, level, service, timestamp, host) or attributes.
    pattern: str | None = None
    # json/logfmt: which keys hold the standard fields (first one present wins).
    timestamp_keys: list[str] = Field(default_factory=lambda: ["timestamp", "time", "ts", "@timestamp"])
    level_keys: list[str] = Field(default_factory=lambda: ["level", "severity", "lvl", "loglevel"])
    message_keys: list[str] = Field(default_factory=lambda: ["message", "msg", "log"])
    service_keys: list[str] = Field(default_factory=lambda: ["service", "app", "service_name"])

    _pattern = field_validator("pattern")(_check_regex)

    @model_validator(mode="after")
    def _regex_needs_pattern(self) -> ParserSettings:
        if self.kind == "regex" and not self.pattern:
            raise ValueError("parser kind 'regex' needs `pattern` (named groups become fields)")
        return self


class MultilineSettings(StrictModel):
    """Join continuation lines (stack traces) to the line before. Off unless start_pattern is set."""

    start_pattern: str | None = None  # a line matching this starts a new entry
    max_lines: int = Field(500, ge=1)
    timeout: float = Field(1.0, gt=0)  # flush a pending entry after this many idle seconds

    _start = field_validator("start_pattern")(_check_regex)


class SourceSettings(StrictModel):
    kind: str
    address: str = ""
    name: str | None = None
    parser: ParserSettings | None = None  # None: the agent-wide [parser]
    multiline: MultilineSettings | None = None  # None: the agent-wide [multiline]
    attributes: dict[str, str] = Field(default_factory=dict)  # static, added to every entry
    options: dict[str, Any] = Field(default_factory=dict)  # kind-specific (mode, owner, framing, ...)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        from logferry.collectors.sources import KINDS, known_kinds

        if v not in KINDS:
            raise ValueError(f"unknown source kind {v!r}; known kinds: {known_kinds()}")
        return v


class FilterSettings(StrictModel):
    min_level: Level | None = None  # drop entries below this level (entries without level are kept)
    drop_levels: list[Level] = Field(default_factory=list)
    drop_regex: str | None = None  # drop entries whose message matches
    keep_regex: str | None = None  # keep only entries whose message matches
    # field (entry field or attribute) → regex; an entry must match every one to be kept.
    keep_fields: dict[str, str] = Field(default_factory=dict)
    drop_fields: dict[str, str] = Field(default_factory=dict)

    _regex = field_validator("drop_regex", "keep_regex")(_check_regex)

    @field_validator("keep_fields", "drop_fields")
    @classmethod
    def _field_regexes(cls, v: dict[str, str]) -> dict[str, str]:
        for pattern in v.values():
            _check_regex(pattern)
        return v


class RouteSettings(StrictModel):
    # Placeholders name entry fields or attributes: "logs.{service}", "logs.{host}.{level}".
    topic: str = "logs"
    default_value: str = Field("unknown", min_length=1)  # for a missing field; made topic-safe like any value
    priority_topic: str | None = None  # entries at or above priority_level go here
    priority_level: Level = "error"

    @field_validator("topic", "priority_topic")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            parts = list(string.Formatter().parse(v))
        except ValueError as e:
            raise ValueError(f"bad topic template {v!r}: {e}") from None
        fields = [(name, conversion, spec) for _, name, spec, conversion in parts if name is not None]
        if any(not n or not re.fullmatch(r"[A-Za-z_][\w.-]*", n) or c or s for n, c, s in fields):
            raise ValueError(
                f"bad topic template {v!r}: placeholders are bare field names like {{service}} (no !r or :spec)"
            )
        # The template's own text must be legal: Kafka would refuse every entry routed to it.
        # (A rendered topic is cut to Kafka's length limit: only a fixed name's length is checked.)
        literal = "".join(text + ("x" if name else "") for text, name, _, _ in parts)
        if (problem := topic_problem(literal[:249] if fields else literal)) is not None:
            raise ValueError(f"bad topic template {v!r}: {problem}")
        return v

    @field_validator("default_value")
    @classmethod
    def _default(cls, v: str) -> str:
        if set(v) == {"."}:  # "{service}" would become "." or "..": names Kafka refuses
            raise ValueError(f"default_value {v!r} can render a topic of dots only, which Kafka refuses")
        return v


class KeySettings(StrictModel):
    field: str | None = "service"  # entry field or attribute; None: no key (round-robin)


class BufferSettings(StrictModel):
    max_entries: int = Field(100_000, ge=1)
    max_bytes: int = Field(64 << 20, ge=1024)
    # spill needs the disk spool (collectors.spool); the others keep everything in memory.
    policy: Literal["block", "drop_newest", "drop_oldest", "spill"] = "block"


class SinkSettings(StrictModel):
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "zstd"
    linger_ms: float = Field(20, ge=0)
    batch_size: int = Field(1_000_000, ge=1)  # bytes per partition batch
    batch_num_messages: int = Field(10_000, ge=1)
    max_message_bytes: int = Field(1_000_000, ge=1024)  # the topic's max.message.bytes
    oversize: Literal["truncate", "drop"] = "truncate"
    delivery_timeout_ms: int = Field(300_000, ge=1000)
    queue_max_messages: int = Field(500_000, ge=1)  # librdkafka's local queue


class AgentSettings(StrictModel):
    host: str | None = None  # None: this machine's host name
    attributes: dict[str, str] = Field(default_factory=dict)  # static, added to every entry
    grace_period: float = Field(10.0, ge=0)  # seconds to drain into Kafka on SIGTERM
    # Checkpoints and the spool live here. None: $LOGFERRY_STATE_DIR, else /var/lib/logferry for root,
    # else ~/.local/state/logferry/agent (collectors.fsutil.default_state_dir).
    state_dir: Path | None = None
    # Run the source and sink threads on this one CPU (logferry/affinity.py); the Kafka producer's
    # threads keep the CPUs of the thread that called run(). Unset: the kernel places them. Give each
    # pinned process its own CPU. A change takes effect at the next start, not on SIGHUP.
    pin_to_cpu: PinToCpu = None


class AgentConfig(StrictModel):
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    sources: list[SourceSettings] = Field(default_factory=list)
    parser: ParserSettings = Field(default_factory=ParserSettings)
    multiline: MultilineSettings = Field(default_factory=MultilineSettings)
    filter: FilterSettings = Field(default_factory=FilterSettings)
    route: RouteSettings = Field(default_factory=RouteSettings)
    key: KeySettings = Field(default_factory=KeySettings)
    buffer: BufferSettings = Field(default_factory=BufferSettings)
    sink: SinkSettings = Field(default_factory=SinkSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)

    @field_validator("sources")
    @classmethod
    def _unique_source_names(cls, sources: list[SourceSettings]) -> list[SourceSettings]:
        seen: set[str] = set()
        for i, s in enumerate(sources):
            if s.name is None:
                s.name = f"{s.kind}-{i}" if s.kind != "stdin" else "stdin"
            if s.name in seen:
                raise ValueError(f"two sources are named {s.name!r}; give each a unique `name`")
            seen.add(s.name)
        return sources
