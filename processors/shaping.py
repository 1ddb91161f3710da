"""Peak shaving: in-flight watermarks, a token-bucket rate limit, and the set of paused partitions.

Everything here runs on the poll thread. The consumer keeps polling while partitions are
paused, so a slow downstream makes lag grow in Kafka, never memory in the process and
never a missed max.poll.interval.ms.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping

from confluent_kafka import Consumer, KafkaException, TopicPartition

TP = tuple[str, int]


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate limit must be > 0 entries/s")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._tokens = self.burst
        self._at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, wanted: int) -> int:
        """Take up to `wanted` whole tokens; return how many were granted."""
        self._refill()
        granted = min(wanted, int(self._tokens))
        self._tokens -= granted
        return granted

    def wait_time(self) -> float:
        """Seconds until one token is available."""
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate


class Watermarks:
    """Hysteresis on in-flight records: paused above `high`, resumed at or below `low`."""

    def __init__(self, high: int, low: int) -> None:
        if not 0 <= low < high:
            raise ValueError(f"watermarks need 0 <= low < high (got low={low}, high={high})")
        self.high = high
        self.low = low
        self.paused = False

    def update(self, in_flight: int) -> bool:
        if self.paused and in_flight <= self.low:
            self.paused = False
        elif not self.paused and in_flight >= self.high:
            self.paused = True
        return self.paused


class PauseSet:
    """Why each partition is paused; pause/resume calls only when the answer changes.

    Reasons are either global (`backlog`, `rate`, `stopping`: every assigned partition) or
    per partition (`priority`, `due` for delayed retries). A partition runs only when it has none.
    """

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self.global_reasons: set[str] = set()
        self.per_tp: dict[TP, set[str]] = {}
        self.paused: set[TP] = set()

    def set_global(self, reason: str, on: bool) -> None:
        (self.global_reasons.add if on else self.global_reasons.discard)(reason)

    def set_tp(self, tp: TP, reason: str, on: bool) -> None:
        reasons = self.per_tp.setdefault(tp, set())
        (reasons.add if on else reasons.discard)(reason)

    def forget(self, tps: Iterable[TP]) -> None:
        """Revoked partitions: librdkafka drops their pause state with the assignment."""
        for tp in tps:
            self.per_tp.pop(tp, None)
            self.paused.discard(tp)

    def apply(self, assigned: Iterable[TP]) -> None:
        assigned = set(assigned)
        want = set(assigned) if self.global_reasons else {tp for tp in assigned if self.per_tp.get(tp)}
        to_pause = want - self.paused
        to_resume = (self.paused - want) & assigned
        if to_pause:
            self._consumer.pause([TopicPartition(t, p) for t, p in to_pause])
        if to_resume:
            tps = [TopicPartition(t, p) for t, p in to_resume]
            self._consumer.resume(tps)
            self._wake_fetcher(tps)
        self.paused = want

    def _wake_fetcher(self, tps: list[TopicPartition]) -> None:
        """Seek resumed partitions to where they are, so the fetcher starts now.

        librdkafka's broker thread idles while all its partitions are paused and does not
        notice resume() until its next periodic wake-up (up to ~1 s, measured); a seek is an
        op it serves at once. Seeking to the current position re-delivers nothing.
        """
        for tp in self._consumer.position(tps):
            if tp.offset >= 0:
                with contextlib.suppress(KafkaException):  # not fetching yet: it starts on its own
                    self._consumer.seek(tp)


class CatchUp:
    """Which high-priority partitions have nothing left to fetch (low-priority topics wait for these).

    A partition that delivered nothing since it was assigned has no known position, so the
    position alone would count an empty partition (say an idle retry topic) as busy forever.
    librdkafka's partition-EOF event (`enable.partition.eof`) says where the fetcher reached the
    log end; it also covers ends past transaction markers, which a position never reaches.
    An end is remembered per partition state, so a seek (new state) or revoke forgets it.
    """

    def __init__(self) -> None:
        self._ends: dict[TP, tuple[object, int]] = {}

    def reached_end(self, tp: TP, state: object, offset: int) -> None:
        self._ends[tp] = (state, offset)

    def forget(self, tp: TP) -> None:
        self._ends.pop(tp, None)

    def busy(self, consumer: Consumer, states: Mapping[TP, object], tps: list[TP]) -> bool:
        """True while any of `tps` may have records to fetch (unknown counts as yes)."""
        if not tps:
            return False
        for tp in consumer.position([TopicPartition(t, p) for t, p in tps]):
            key = (tp.topic, tp.partition)
            _, hi = consumer.get_watermark_offsets(tp, cached=True)
            state, end = self._ends.get(key, (None, -1))
            at = max(tp.offset, end if state is states.get(key) else -1)
            if hi < 0 or at < 0 or hi > at:
                return True
        return False
