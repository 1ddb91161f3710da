"""Sampling the running pipeline: counters from every /metrics endpoint, consumer lag from Kafka itself.

Lag is the log end offset minus the group's committed offset, summed over the partitions,
read from the broker (not from the processors' own gauge), so it is an outside view.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from logferry.kafka import KafkaSettings
from logferry.top import scrape


@dataclass
class Sample:
    t: float  # seconds since the demo's load started
    phase: str
    written: int  # by the load generator
    received: float  # by the agent's sources
    delivered: float  # acknowledged by Kafka to the agent
    processed: float  # handled by the group's members (replays included)
    lag: int  # entries in Kafka not yet committed by the group

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def counter_sums(url: str, *names: str) -> list[float] | None:
    """Each counter summed over its labels, from one scrape of `url`; None when the endpoint did not answer."""
    s = scrape(url, timeout=1.0)
    return None if s.error else [sum(s.get(name).values()) for name in names]


class LagReader:
    def __init__(self, kafka: KafkaSettings, topic: str, group: str, partitions: int) -> None:
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        # Same group id, never subscribed: reads the group's commits without joining it.
        self.consumer = Consumer(kafka.client_config(**{"group.id": group, "enable.auto.commit": False,
                                                        "client.id": f"demo-lag-{uuid.uuid4().hex[:6]}"}))  # fmt: skip

    def ends(self) -> list[int]:
        return [self.consumer.get_watermark_offsets(tp, timeout=5, cached=False)[1] for tp in self.tps]

    def lag(self) -> int:
        ends = self.ends()
        committed = self.consumer.committed(self.tps, timeout=5)
        return sum(end - max(c.offset, 0) for end, c in zip(ends, committed, strict=True))

    def close(self) -> None:
        self.consumer.close()


class Sampler:
    """A thread that appends a Sample every `interval` seconds until stopped."""

    def __init__(
        self, lag: LagReader, agent: str, members: list[str], written: Callable[[], int], interval: float
    ) -> None:
        self.lag_reader = lag
        self.agent = agent
        self.members = members
        self.written = written
        self.interval = interval
        self.phase = "start"
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-sampler", daemon=True)

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sample()
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def sample(self) -> Sample | None:
        prev = self.samples[-1] if self.samples else None
        agent = counter_sums(self.agent, "logferry_source_entries_received_total", "logferry_entries_delivered_total")
        received, delivered = agent if agent is not None else (None, None)
        per_member = [counter_sums(m, "logferry_processor_processed_total") for m in self.members]
        try:
            lag = self.lag_reader.lag()
        except KafkaException:
            lag = prev.lag if prev else 0
        # An endpoint that missed one scrape keeps its last value rather than dropping the curve to 0.
        s = Sample(
            t=time.monotonic() - self.t0, phase=self.phase, written=self.written(),
            received=received if received is not None else (prev.received if prev else 0.0),
            delivered=delivered if delivered is not None else (prev.delivered if prev else 0.0),
            processed=sum(p[0] for p in per_member if p is not None) if None not in per_member
            else (prev.processed if prev else 0.0),
            lag=lag,
        )  # fmt: skip
        self.samples.append(s)
        return s

    @property
    def last(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
