"""What happens when a handler raises: retries in place, delayed retry topics, the dead-letter topic.

In-place retries back off exponentially with full jitter while the worker keeps the lane,
so later records of the same key wait (key order holds). When they are used up the record
goes to the next delayed retry topic `<topic>.retry.<delay>` (if configured: non-blocking,
order not kept) or to the dead-letter topic, with headers that say where it came from and
why. A record is marked done only when Kafka acknowledged that copy, so a crash in between
re-handles it rather than losing it. Undecodable records go straight to the dead letters.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from logferry.log import LogOnce
from logferry.metrics import (
    DEAD_LETTER_SEND_FAILURES,
    DEAD_LETTER_STALLED,
    DEAD_LETTERED,
    FAILED,
    HANDLER_SECONDS,
    RETRIED,
    ThreadHistogram,
)
from logferry.processors.context import Context
from logferry.processors.shaping import TP, PauseSet
from logferry.processors.tracking import complete_diverted

log = logging.getLogger("logferry.processors.failures")
once = LogOnce(log)

H_TOPIC = "logferry-original-topic"
H_PARTITION = "logferry-original-partition"
H_OFFSET = "logferry-original-offset"
H_GROUP = "logferry-group"
H_ATTEMPTS = "logferry-attempts"
H_EXC_TYPE = "logferry-exception-type"
H_EXC_MESSAGE = "logferry-exception-message"
H_REASON = "logferry-reason"
H_DUE = "logferry-retry-due-ms"  # when a delayed retry record may be handled (epoch ms)
OUR_HEADERS = {H_TOPIC, H_PARTITION, H_OFFSET, H_GROUP, H_ATTEMPTS, H_EXC_TYPE, H_EXC_MESSAGE, H_REASON, H_DUE}
MAX_MESSAGE_HEADER = 1000
RESEND_MIN = 0.1  # seconds: the shortest wait before a refused dead-letter/retry send goes again


def format_delay(seconds: float) -> str:
    """5 -> '5s', 60 -> '1m', 90 -> '90s', 3600 -> '1h', 0.5 -> '500ms', 1.5 -> '1500ms'."""
    if seconds < 1 or seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"
    s = round(seconds)
    for unit, size in (("h", 3600), ("m", 60)):
        if s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def retry_topic(topic: str, delay: float) -> str:
    return f"{topic}.retry.{format_delay(delay)}"


def header_str(headers: list[tuple[str, bytes]] | None, name: str) -> str | None:
    for k, v in headers or ():
        if k == name and v is not None:
            return v.decode(errors="replace")
    return None


class Backoff:
    def __init__(self, initial: float, maximum: float, multiplier: float = 2.0) -> None:
        self.initial, self.maximum, self.multiplier = initial, maximum, multiplier

    def delay(self, retry: int) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(max, initial * mult**(retry-1))]."""
        cap = min(self.maximum, self.initial * self.multiplier ** (retry - 1))
        return random.uniform(cap / 2, cap)


@dataclass(eq=False)
class Divert:
    """One record's copy on its way to a retry topic or the dead letters."""

    ctx: Context
    target: str
    headers: list[tuple[str, bytes]]
    kind: str  # "retry" or "dead_letter"
    reason: str
    original: str
    failures: int = 0


class FailureRouter:
    """Sends given-up records onward (retry topic or DLQ); completes them on Kafka's acknowledgement.

    A send Kafka refuses (the topic cannot be created, a record too large for it, an outage longer
    than the producer's own retries) is sent again with back-off for as long as it takes, counted
    and logged: the record was neither handled nor dead-lettered, so its partition must not commit
    past it. Meanwhile the partition is paused (the records behind it would only pile up, done but
    uncommittable) and the stall shows in `logferry_processor_dead_letter_stalled`. A partition
    revoked meanwhile drops its sends: the next owner handles the record again.
    """

    def __init__(
        self, producer: Producer, group: str, dlq_topic: str, retry_delays: list[float], retry_sources: dict[str, str],
        backoff: Backoff | None = None,
    ) -> None:  # fmt: skip
        self.producer = producer
        self.group = group
        self.dlq_topic = dlq_topic
        self.retry_delays = retry_delays
        # retry topic -> (original topic, stage index) so a retry record knows where it came from.
        self.retry_sources = retry_sources
        self.backoff = backoff or Backoff(RESEND_MIN, 30.0)
        self._lock = threading.Lock()
        self._resend: list[tuple[float, int, Divert]] = []  # heap of (monotonic due time, seq, send)
        self._seq = 0
        self._stalled: dict[TP, int] = {}  # partition -> its sends that failed and are not acknowledged yet
        self._paused: set[TP] = set()  # partitions this router asked the poll thread to pause
        self._stalled_gauge = DEAD_LETTER_STALLED.labels(group)
        # Where give_up's copies go; exactly-once puts its retry copies in its transaction instead.
        self.divert: Callable[[Divert], None] = self.send

    def stage_of(self, topic: str) -> tuple[str, int]:
        """(original topic, index of the next retry stage) for a record from `topic`."""
        if topic in self.retry_sources:
            original = self.retry_sources[topic]
            delays = [retry_topic(original, d) for d in self.retry_delays]
            return original, delays.index(topic) + 1
        return topic, 0

    def give_up(self, ctx: Context, exc: BaseException | None, reason: str) -> None:
        original, stage = self.stage_of(ctx.topic)
        if reason == "handler_failed" and stage < len(self.retry_delays):
            delay = self.retry_delays[stage]
            target = retry_topic(original, delay)
            extra = [(H_DUE, str(int((time.time() + delay) * 1000)).encode())]
            kind = "retry"
        else:
            target, extra, kind = self.dlq_topic, [], "dead_letter"
        headers = [(k, v) for k, v in ctx.headers if k not in OUR_HEADERS]
        first = ctx.topic == original
        headers += [
            (H_TOPIC, original.encode()),
            (H_PARTITION, (str(ctx.partition) if first else header_str(ctx.headers, H_PARTITION) or "").encode()),
            (H_OFFSET, (str(ctx.offset) if first else header_str(ctx.headers, H_OFFSET) or "").encode()),
            (H_GROUP, self.group.encode()),
            (H_ATTEMPTS, str(ctx.attempt).encode()),
            (H_REASON, reason.encode()),
            *extra,
        ]
        if exc is not None:
            headers.append((H_EXC_TYPE, type(exc).__qualname__.encode()))
            headers.append((H_EXC_MESSAGE, str(exc)[:MAX_MESSAGE_HEADER].encode(errors="replace")))
        self.divert(Divert(ctx, target, headers, kind, reason, original))

    def send(self, d: Divert) -> None:
        """Any thread. A refusal at produce() (e.g. the record is too large) is retried like a failed delivery."""
        ctx = d.ctx
        while True:
            try:
                self.producer.produce(
                    d.target, value=ctx.value, key=ctx.key, headers=d.headers,
                    on_delivery=lambda err, _msg: self._delivered(d, err),
                )  # fmt: skip
                return
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as e:
                self._failed(d, e.args[0])
                return

    def _delivered(self, d: Divert, err: KafkaError | None) -> None:
        """Delivery callback, served on the poll thread."""
        if err is not None:
            self._failed(d, err)
            return
        if d.kind == "retry":
            RETRIED.labels(self.group, d.original).inc()
        else:
            DEAD_LETTERED.labels(self.group, d.original, d.reason).inc()
        if d.failures:
            log.info("%s written to %s after %d failed send(s); its partition commits again", d.ctx, d.target,
                     d.failures)  # fmt: skip
            self._unstall(d)
        complete_diverted(d.ctx)

    def _failed(self, d: Divert, err: KafkaError) -> None:
        d.failures += 1
        DEAD_LETTER_SEND_FAILURES.labels(self.group, d.kind, err.name()).inc()
        once.warning(f"divert:{d.target}:{err.name()}", "cannot write %s to %s (%s); sending it again with back-off, "
                     "its partition pauses and stops committing until then", d.ctx, d.target, err)  # fmt: skip
        with self._lock:
            if d.failures == 1:
                tp = (d.ctx.topic, d.ctx.partition)
                self._stalled[tp] = self._stalled.get(tp, 0) + 1
                self._stalled_gauge.inc()
            self._seq += 1
            due = time.monotonic() + max(RESEND_MIN, self.backoff.delay(d.failures))
            heapq.heappush(self._resend, (due, self._seq, d))

    def _unstall(self, d: Divert) -> None:
        tp = (d.ctx.topic, d.ctx.partition)
        with self._lock:
            left = self._stalled.get(tp, 0) - 1
            if left > 0:
                self._stalled[tp] = left
            else:
                self._stalled.pop(tp, None)
            self._stalled_gauge.dec()

    def poll(self, pauses: PauseSet) -> None:
        """Poll thread, once per loop: send again what is due; pause exactly the stalled partitions."""
        if not self._resend and not self._paused:
            return
        now = time.monotonic()
        due: list[Divert] = []
        with self._lock:
            while self._resend and self._resend[0][0] <= now:
                due.append(heapq.heappop(self._resend)[2])
        for d in due:
            if d.ctx._state.closed:  # revoked or seeked away: the record is handled again, not committed
                log.info("dropped the pending send of %s to %s: its partition is no longer ours", d.ctx, d.target)
                self._unstall(d)
            else:
                self.send(d)
        with self._lock:
            stalled = set(self._stalled)
        for tp in stalled - self._paused:
            pauses.set_tp(tp, "dead_letter", True)
        for tp in self._paused - stalled:
            pauses.set_tp(tp, "dead_letter", False)
        self._paused = stalled


class Executor:
    """Runs the handler for one record with in-place retries; True when the record is done now."""

    def __init__(
        self, handler: Callable[..., Any], group: str, retries: int, backoff: Backoff, router: FailureRouter,
        abandon: threading.Event,
    ) -> None:  # fmt: skip
        self.handler = handler
        self.group = group
        self.retries = retries
        self.backoff = backoff
        self.router = router
        self.abandon = abandon
        self._seconds = ThreadHistogram(HANDLER_SECONDS.labels(group))  # pushed by `push_metrics`

    def _failed(self, ctx: Context, exc: BaseException, retry: int) -> float | None:
        """Count a failure; the back-off delay before the next attempt, or None to give up."""
        FAILED.labels(self.group, ctx.topic).inc()
        once.warning(f"handler:{type(exc).__name__}", "handler raised %s on %s: %s", type(exc).__name__, ctx, exc)
        if retry > self.retries or ctx._state.closed:
            return None
        RETRIED.labels(self.group, ctx.topic).inc()
        return self.backoff.delay(retry)

    def push_metrics(self) -> None:
        """The calling worker's handler timings since its last push (dispatchers call it after each take)."""
        self._seconds.push()

    def run(self, ctx: Context) -> bool:
        ctx.attempt += 1
        t0 = perf_counter()
        try:
            self.handler(ctx.entry, ctx)
        except Exception as exc:
            self._seconds.observe(perf_counter() - t0)
            return self._retry(ctx, exc)
        self._seconds.observe(perf_counter() - t0)
        return True

    def _retry(self, ctx: Context, exc: Exception) -> bool:
        """The slow path: back off and call again in place, up to `retries` times, then give up."""
        for retry in range(1, self.retries + 2):
            delay = self._failed(ctx, exc, retry)
            if delay is None:
                if not ctx._state.closed:  # revoked mid-retry: the next owner handles it, no dead letter
                    self.router.give_up(ctx, exc, "handler_failed")
                return False
            if self.abandon.wait(delay):
                return False  # stopping: not done, re-handled by whoever owns the partition next
            ctx.attempt += 1
            t0 = perf_counter()
            try:
                self.handler(ctx.entry, ctx)
            except Exception as again:
                exc = again
                continue
            finally:
                self._seconds.observe(perf_counter() - t0)
            return True
        raise AssertionError("unreachable: the last retry gives up")

    async def run_async(self, ctx: Context) -> bool:
        for retry in range(1, self.retries + 2):
            ctx.attempt += 1
            t0 = perf_counter()
            try:
                await self.handler(ctx.entry, ctx)
            except Exception as exc:
                self._seconds.observe(perf_counter() - t0)
                delay = self._failed(ctx, exc, retry)
                if delay is None:
                    if not ctx._state.closed:  # revoked mid-retry: the next owner handles it, no dead letter
                        self.router.give_up(ctx, exc, "handler_failed")
                    return False
                await asyncio.sleep(delay)
                if self.abandon.is_set():
                    return False
                continue
            self._seconds.observe(perf_counter() - t0)
            return True
        raise AssertionError("unreachable: the last retry gives up")


AsyncRun = Callable[[Context], Awaitable[bool]]
