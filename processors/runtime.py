"""The poll thread: assignment, admission, shaping, commits, and a graceful stop.

One thread owns the consumer. It never blocks on handlers: it admits fetched records to
the dispatcher, pauses partitions when the process has enough work (or the rate limit or
priority says so), commits the done prefix of each partition on a timer and on revoke,
and keeps calling consume() so max.poll.interval.ms is never at risk.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from logferry import affinity
from logferry.errors import ConfigError, SchemaError
from logferry.kafka import KafkaSettings, close_producer
from logferry.log import LogOnce
from logferry.metrics import CONSUMED, FILTERED, IN_FLIGHT, LAG, PAUSED_PARTITIONS, PROCESSED, REBALANCES
from logferry.processors.commits import KafkaCommitter, OffsetCommitter
from logferry.processors.config import ProcessorSection
from logferry.processors.context import Context
from logferry.processors.dispatch import AsyncDispatcher, InlineDispatcher, ThreadDispatcher
from logferry.processors.failures import H_ATTEMPTS, H_DUE, Backoff, Executor, FailureRouter, header_str, retry_topic
from logferry.processors.filtering import EntryFilter
from logferry.processors.shaping import TP, CatchUp, PauseSet, TokenBucket, Watermarks
from logferry.processors.tracking import PartitionState
from logferry.schemas import Codec, default_codec

log = logging.getLogger("logferry.processors.runtime")
once = LogOnce(log)

LAG_EVERY = 5.0
# Records handed to the dispatcher at once: handling starts while the rest of a fetch still decodes
# (the last record of a 500-record fetch would otherwise wait ~5 ms for the others' decoding).
SUBMIT_EVERY = 100
ABANDON_WAIT = 1.0  # after the grace: how long running handlers may still finish (and be committed)


@dataclass
class Hooks:
    """Seams for replay and control (all called on the poll thread).

    on_assign(runtime, tps) may return {tp: offset} start positions for newly assigned
    partitions (replay by time); on_poll(runtime) runs once per loop and may call
    runtime.seek() on assigned partitions (live replay via a control topic).
    """

    on_assign: Callable[[Runtime, list[TP]], dict[TP, int] | None] | None = None
    on_poll: Callable[[Runtime], None] | None = None


class Runtime:
    def __init__(
        self,
        settings: ProcessorSection,
        kafka: KafkaSettings,
        handler: Callable[..., Any],
        *,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        hooks: Hooks | None = None,
        codec: Codec | None = None,
        stop_event: threading.Event | None = None,
        committer: Callable[[Consumer], OffsetCommitter] | None = None,
    ) -> None:
        if settings.inline and inspect.iscoroutinefunction(handler):
            raise ConfigError("inline runs the handler on the poll thread: it takes a plain def, not async def")
        self.s = settings
        self.kafka = kafka
        self.group = settings.group
        self.hooks = hooks or Hooks()
        self.codec = codec or default_codec()
        self.filter = EntryFilter(settings.filter, predicate)
        self.stop_event = stop_event or threading.Event()
        self.assigned_event = threading.Event()

        retry_sources = {
            retry_topic(t, d): t
            for t in [*settings.topics, *settings.low_priority_topics]
            for d in settings.retry_delays
        }
        self.retry_topics = set(retry_sources)
        self.high_topics = set(settings.topics) | {r for r, t in retry_sources.items() if t in settings.topics}
        self.low_topics = set(settings.low_priority_topics) - self.high_topics
        self.low_topics |= {r for r, t in retry_sources.items() if t in self.low_topics}

        self._kafka_committer = KafkaCommitter(None, self.group, self._commit_failed)  # type: ignore[arg-type]
        tunable = {
            # A resumed partition is fetched again only when the broker answers the outstanding long
            # poll; librdkafka's 500 ms default would stall every pause/resume cycle that long.
            "fetch.wait.max.ms": 100,
        }
        tunable = {k: v for k, v in tunable.items() if k not in kafka.extra}  # [kafka.extra] wins
        self.consumer = Consumer(
            kafka.client_config(**tunable, **{
                "group.id": settings.group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "partition.assignment.strategy": "cooperative-sticky",
                "auto.offset.reset": settings.auto_offset_reset,
                "session.timeout.ms": settings.session_timeout_ms,
                "max.poll.interval.ms": settings.max_poll_interval_ms,
                "enable.partition.eof": True,  # tells _prioritise an empty high-priority partition is caught up
                "on_commit": self._kafka_committer.on_commit,
                "error_cb": self._on_error,
            })
        )  # fmt: skip
        self._kafka_committer.consumer = self.consumer
        self.committer: OffsetCommitter = committer(self.consumer) if committer else self._kafka_committer
        self.producer = Producer(
            kafka.client_config(**{"enable.idempotence": True, "linger.ms": 5, "error_cb": self._on_error})
        )
        backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self.router = FailureRouter(
            self.producer, self.group, settings.dlq_topic, settings.retry_delays, retry_sources, backoff
        )
        self.abandon = threading.Event()
        self.executor = Executor(handler, self.group, settings.retries, backoff, self.router, self.abandon)
        if inspect.iscoroutinefunction(handler):
            self.dispatcher: ThreadDispatcher | AsyncDispatcher | InlineDispatcher = AsyncDispatcher(
                self.executor.run_async, settings.concurrency, self.abandon, after_take=self.executor.push_metrics
            )
        elif settings.inline:
            self.dispatcher = InlineDispatcher(self.executor.run, self.abandon, after_take=self.executor.push_metrics)
        else:
            self.dispatcher = ThreadDispatcher(
                self.executor.run, settings.concurrency, self.abandon, after_take=self.executor.push_metrics
            )
        # Inline: the poll loop runs the waiting records itself, a slice per poll.
        self._run_waiting = self.dispatcher.run_waiting if isinstance(self.dispatcher, InlineDispatcher) else None

        self.states: dict[TP, PartitionState] = {}
        self.pauses = PauseSet(self.consumer)
        self.catch_up = CatchUp()
        self.watermarks = Watermarks(settings.max_in_flight, settings.low_watermark)
        self.bucket = TokenBucket(settings.rate_limit, settings.rate_burst) if settings.rate_limit else None
        self.held: deque[Message] = deque()  # fetched, waiting for rate-limit tokens
        self.due: dict[TP, float] = {}  # delayed-retry partitions waiting until a record is due (epoch s)
        self._revoke_grace = settings.revoke_grace
        # A retry topic's records share their source topic's lanes: a retried record never runs
        # beside a newer record of the same key.
        self._lane_topic = retry_sources
        source_topics = set(settings.topics) | set(settings.low_priority_topics)
        key_lane = self._key_lane if len(source_topics) == 1 else self._topic_key_lane
        self._lanes = {"key": key_lane, "partition": self._partition_lane, "unordered": self._record_lane}[
            settings.ordering
        ]
        self._consumed: dict[str, Any] = {}
        self._filtered: dict[str, Any] = {}
        self._processed: dict[str, Any] = {}

    # ---- lanes: the ordering unit ---------------------------------------------------------
    @staticmethod
    def _key_lane(msg: Message) -> object:
        key = msg.key()
        return key if key is not None else (msg.topic(), msg.partition())

    def _topic_key_lane(self, msg: Message) -> object:
        # Kafka orders nothing across topics; separate lanes let a high-priority topic overtake a low one.
        key = msg.key()
        topic = self._lane_topic.get(msg.topic(), msg.topic())
        return (topic, key) if key is not None else (msg.topic(), msg.partition())

    @staticmethod
    def _partition_lane(msg: Message) -> object:
        return (msg.topic(), msg.partition())

    @staticmethod
    def _record_lane(msg: Message) -> object:
        return (msg.topic(), msg.partition(), msg.offset())

    def _new_state(self, topic: str, partition: int, start: int | None = None) -> PartitionState:
        return PartitionState(
            topic, partition, start, high=topic not in self.low_topics, retry=topic in self.retry_topics
        )

    # ---- public ---------------------------------------------------------------------------
    def in_flight(self) -> int:
        return sum(st.in_flight for st in self.states.values())

    def assignment(self) -> list[TP]:
        return sorted(self.states)

    def stop(self) -> None:
        self.stop_event.set()

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Poll thread only: continue an assigned partition from `offset` (replay).

        Queued work of the old position is skipped; running work finishes but can no longer
        move the commit point; the next commit records `offset`.
        """
        tp = (topic, partition)
        old = self.states.get(tp)
        if old is None:
            raise ValueError(f"{topic}[{partition}] is not assigned to this member")
        old.closed = True
        self.states[tp] = self._new_state(topic, partition, start=offset)
        self._drop_held({tp})
        self.due.pop(tp, None)
        self.pauses.set_tp(tp, "due", False)
        self.consumer.seek(TopicPartition(topic, partition, offset))

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._ensure_topics()
            # `pin_to_cpu`: pinned once every Kafka client exists, so their threads stay free; the
            # workers start next and inherit it.
            cpus = affinity.pin_calling_thread(self.s.pin_to_cpu)
            try:
                self._run()
            finally:
                affinity.restore(cpus)
        finally:  # also when the topics or the workers could not be set up: no client left open
            self._close()

    def _run(self) -> None:
        self.dispatcher.start()
        self.consumer.subscribe(
            sorted(self.high_topics | self.low_topics),
            on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost,
        )  # fmt: skip
        next_commit = time.monotonic() + self.s.commit_interval
        next_lag = time.monotonic() + LAG_EVERY
        while not self.stop_event.is_set():
            self._step()
            now = time.monotonic()
            if now >= next_commit:
                self.commit(sync=False)
                next_commit = now + self.s.commit_interval
            if now >= next_lag:
                self._export_lag()
                next_lag = now + LAG_EVERY
            if self.hooks.on_poll is not None:
                self.hooks.on_poll(self)
        self._drain()

    def _step(self) -> None:
        paused_all = bool(self.pauses.global_reasons)
        timeout = 0.01 if paused_all else 0.1
        if self.held and self.bucket is not None:
            timeout = min(timeout, max(0.001, self.bucket.wait_time()))
        # consume(n, t) waits until n records or t passed, so a trickle would wait the whole
        # timeout per batch: take what is there, else wait for the first record only.
        msgs = self.consumer.consume(self.s.batch_size, 0)
        if not msgs:
            msgs = self.consumer.consume(1, timeout)
            if msgs and self.s.batch_size > 1:
                msgs += self.consumer.consume(self.s.batch_size - 1, 0)
        self.producer.poll(0)
        self.router.poll(self.pauses)  # refused dead-letter/retry sends go again; their partitions pause
        if msgs:
            self._count(self._consumed, CONSUMED, msgs)
            if self.bucket is None:
                self._admit(msgs)
            else:
                self.held.extend(msgs)
        if self.held:
            assert self.bucket is not None
            granted = self.bucket.take(len(self.held))
            if granted:
                self._admit([self.held.popleft() for _ in range(granted)])
        if self._run_waiting is not None:
            self._run_waiting()
        # Keep fetching while less than a batch waits for tokens, so the flow never stalls on a
        # fetch round trip; past that, pause so the backlog stays in Kafka.
        self.pauses.set_global("rate", len(self.held) >= self.s.batch_size)
        if self.due:
            now = time.time()
            for tp in [tp for tp, at in self.due.items() if at <= now]:
                del self.due[tp]
                self.pauses.set_tp(tp, "due", False)
        if self.low_topics:
            self._prioritise()
        in_flight = self.in_flight()
        self.pauses.set_global("backlog", self.watermarks.update(in_flight))
        self.pauses.apply(self.states)
        for st in self.states.values():
            st.trim()
            if n := st.newly_processed():
                self._processed_metric(st.topic).inc(n)
        IN_FLIGHT.labels(self.group).set(in_flight)
        PAUSED_PARTITIONS.labels(self.group).set(len(self.pauses.paused))

    def _admit(self, msgs: list[Message]) -> None:
        """The hot path: track, decode, filter and queue each fetched record (poll thread)."""
        states, decode, lane_of, filt, due = self.states, self.codec.decode, self._lanes, self.filter, self.due
        check_filter = filt.active
        batch: list[Context] = []
        append = batch.append
        filtered: list[Message] = []
        tp: TP = ("", -1)
        st: PartitionState | None = None
        for msg in msgs:
            if msg.error() is not None:
                self._on_consume_error(msg)
                continue
            topic, partition = msg.topic(), msg.partition()
            if partition != tp[1] or topic != tp[0]:  # a fetch comes in runs of one partition: look up per run
                tp = (topic, partition)
                st = states.get(tp)
            if st is None or (due and tp in due):
                continue  # revoked since the fetch, or a delayed-retry partition waiting (it was seeked back)
            offset = msg.offset()
            if offset <= st.last_seen:
                continue  # fetched twice (librdkafka refetch): tracked already
            if st.retry and self._not_due(msg, tp, offset):
                continue
            try:
                entry = decode(msg.value(), msg.headers())
            except SchemaError as e:
                self._undecodable(msg, st, offset, e)
                continue
            ctx = Context(msg, st, entry, lane_of(msg), offset)
            st.pending.append(ctx)  # PartitionState.admit, inlined: this loop runs once per record
            st.last_seen = offset
            if check_filter and not filt(entry):
                ctx._done = True
                filtered.append(msg)
                continue
            st.admitted += 1
            if st.retry:
                ctx.attempt = int(header_str(msg.headers(), H_ATTEMPTS) or 0)
            append(ctx)
            if len(batch) == SUBMIT_EVERY:
                self.dispatcher.submit(batch)
                batch = []
                append = batch.append
        if batch:
            self.dispatcher.submit(batch)
        if filtered:
            self._count(self._filtered, FILTERED, filtered)

    def _undecodable(self, msg: Message, st: PartitionState, offset: int, e: SchemaError) -> None:
        ctx = Context(msg, st, None, self._lanes(msg), offset)
        ctx._started = True  # done on the DLQ's acknowledgement, like a running record
        st.admit(ctx)
        once.warning("undecodable", "undecodable record %s sent to %s: %s", ctx, self.s.dlq_topic, e)
        self.router.give_up(ctx, e, "undecodable")

    def _not_due(self, msg: Message, tp: TP, offset: int) -> bool:
        """A delayed-retry record before its time: rewind to it and pause its partition until then."""
        due_ms = header_str(msg.headers(), H_DUE)
        due = int(due_ms) / 1000 if due_ms and due_ms.isdigit() else 0.0
        if due <= time.time():
            return False
        self.due[tp] = due
        self.pauses.set_tp(tp, "due", True)
        self.consumer.seek(TopicPartition(tp[0], tp[1], offset))
        self.catch_up.forget(tp)  # rewound: its end is no longer where it is
        # Later records of this partition waiting for rate-limit tokens would otherwise be admitted
        # past the rewound one, which then looks fetched twice and is skipped.
        self._drop_held({tp})
        return True

    def _processed_metric(self, topic: str) -> Any:
        child = self._processed.get(topic)
        if child is None:
            child = self._processed[topic] = PROCESSED.labels(self.group, topic)
        return child

    def _count(self, cache: dict[str, Any], metric: Any, msgs: list[Message]) -> None:
        counts: dict[str, int] = {}
        for m in msgs:
            if m.error() is None:  # partition-EOF and error events are not records
                t = m.topic()
                counts[t] = counts.get(t, 0) + 1
        for t, n in counts.items():
            child = cache.get(t)
            if child is None:
                child = cache[t] = metric.labels(self.group, t)
            child.inc(n)

    def _prioritise(self) -> None:
        """Pause low-priority partitions while any high-priority partition has work, fetched or not.

        A high partition whose position or log end is not known yet counts as having work, so
        the low topics wait for the first answer instead of flooding in at start-up.
        """
        busy = any(st.in_flight for tp, st in self.states.items() if tp[0] in self.high_topics)
        if not busy:  # a delayed-retry partition waiting until due has nothing to do before then
            high = [tp for tp in self.states if tp[0] in self.high_topics and tp not in self.due]
            busy = self.catch_up.busy(self.consumer, self.states, high)
        for tp in self.states:
            if tp[0] in self.low_topics:
                self.pauses.set_tp(tp, "priority", busy)

    # ---- commits --------------------------------------------------------------------------
    def commit(self, states: list[PartitionState] | None = None, sync: bool = False) -> None:
        """Poll thread only: commit every partition's done prefix that moved since the last commit."""
        offsets, moved = [], []
        for st in states if states is not None else list(self.states.values()):
            c = st.to_commit()
            if c is not None:
                offsets.append(TopicPartition(st.topic, st.partition, c))
                moved.append((st, c))
        if offsets and self.committer.commit(offsets, sync):
            for st, c in moved:
                st.committed = c

    def _commit_failed(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            st = self.states.get((tp.topic, tp.partition))
            if st is not None:
                st.committed = None

    def _export_lag(self) -> None:
        for (t, p), st in self.states.items():
            if st.committed is None:
                continue
            _, hi = self.consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)
            if hi >= 0:
                LAG.labels(self.group, t, str(p)).set(max(0, hi - st.committed))

    # ---- rebalances (served inside consume(), on the poll thread) -------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        REBALANCES.labels(self.group, "assign").inc()
        tps = [(p.topic, p.partition) for p in partitions]
        for t, p in tps:
            self.states[(t, p)] = self._new_state(t, p)
        log.info("assigned %s", ", ".join(f"{t}[{p}]" for t, p in tps) or "nothing")
        starts = (self.hooks.on_assign(self, tps) if self.hooks.on_assign else None) or {}
        consumer.incremental_assign(
            [TopicPartition(t, p, starts[(t, p)]) if (t, p) in starts else TopicPartition(t, p) for t, p in tps]
        )
        low = [(t, p) for t, p in tps if t in self.low_topics]
        if low:  # low-priority partitions start paused: the high topics get the first fetch
            for tp in low:
                self.pauses.set_tp(tp, "priority", True)
            self.pauses.apply(self.states)
        if self.states:
            self.assigned_event.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        REBALANCES.labels(self.group, "revoke").inc()
        self._release(partitions, commit=True)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        REBALANCES.labels(self.group, "lost").inc()
        self._release(partitions, commit=False)  # another member owns them already

    def _release(self, partitions: list[TopicPartition], commit: bool) -> None:
        tps = {(p.topic, p.partition) for p in partitions}
        states = [self.states.pop(tp) for tp in tps if tp in self.states]
        for st in states:
            st.closed = True  # queued records of these partitions are skipped from now on
        self._drop_held(tps)
        for tp in tps:
            self.due.pop(tp, None)
        deadline = time.monotonic() + self._revoke_grace
        while any(st.running() for st in states) and time.monotonic() < deadline:
            self.producer.poll(0.01)  # serves dead-letter acknowledgements while running work finishes
        abandoned = sum(st.running() for st in states)
        if abandoned:
            log.warning("revoke: gave up waiting for %d running record(s); they are not committed", abandoned)
        if commit:
            self.commit(states, sync=True)
        self.pauses.forget(tps)
        log.info("revoked %s", ", ".join(f"{t}[{p}]" for t, p in sorted(tps)) or "nothing")

    def _drop_held(self, tps: set[TP]) -> None:
        if self.held:
            self.held = deque(m for m in self.held if (m.topic(), m.partition()) not in tps)

    # ---- errors ---------------------------------------------------------------------------
    def _on_error(self, err: KafkaError) -> None:
        once.warning(f"kafka:{err.name()}", "Kafka client error: %s", err)

    def _on_consume_error(self, msg: Message) -> None:
        err = msg.error()
        if err.code() == KafkaError._PARTITION_EOF:
            tp = (msg.topic(), msg.partition())
            self.catch_up.reached_end(tp, self.states.get(tp), msg.offset())
            return
        once.warning(f"consume:{err.name()}", "consume error on %s[%s]: %s", msg.topic(), msg.partition(), err)

    def _ensure_topics(self) -> None:
        """Create the retry topics and the dead-letter topic if missing (consumers do not auto-create)."""
        admin = self.kafka.admin()
        md = admin.list_topics(timeout=10)
        sources = [*self.s.topics, *self.s.low_priority_topics]
        parts = {t: len(md.topics[t].partitions) for t in sources if t in md.topics and md.topics[t].partitions}
        wanted = {self.s.dlq_topic: max(parts.values(), default=1)}
        for retry, source in self.router.retry_sources.items():
            wanted[retry] = parts.get(source, 1)
        new = [NewTopic(t, num_partitions=n, replication_factor=-1) for t, n in wanted.items() if t not in md.topics]
        for topic, fut in (admin.create_topics(new) if new else {}).items():
            try:
                fut.result(30)
            except Exception as e:  # TOPIC_ALREADY_EXISTS when another member won the race
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise
            log.info("created topic %s", topic)

    # ---- stopping -------------------------------------------------------------------------
    def _drain(self) -> None:
        """Stop fetching, let in-flight work finish within the grace period, commit what is done."""
        log.info("stopping: %d record(s) in flight, up to %.1fs to finish", self.in_flight(), self.s.shutdown_grace)
        self.pauses.set_global("stopping", True)
        self.pauses.apply(self.states)
        self.held.clear()
        deadline = time.monotonic() + self.s.shutdown_grace
        next_commit = time.monotonic() + self.s.commit_interval
        while self.in_flight() and time.monotonic() < deadline:
            if self._run_waiting is not None:
                self._run_waiting()
            self.consumer.consume(self.s.batch_size, 0.02)  # callbacks only: nothing new is admitted
            self.producer.poll(0)
            if time.monotonic() >= next_commit:
                self.commit(sync=False)
                next_commit = time.monotonic() + self.s.commit_interval
        left = self.in_flight()
        if left:
            log.warning("stopping: gave up %d record(s) after %.1fs; they will be handled again", left,
                        self.s.shutdown_grace)  # fmt: skip
        self.abandon.set()  # queued records are skipped from here on
        self.dispatcher.stop(timeout=ABANDON_WAIT)  # a handler finishing now still gets committed
        self.commit(sync=True)

    def _close(self) -> None:
        self.abandon.set()
        self._revoke_grace = 0.0
        try:
            self.consumer.close()  # leaves the group (revoke commits nothing new: all committed above)
        except Exception as e:
            log.warning("closing the consumer: %s", e)
        self.dispatcher.stop(timeout=ABANDON_WAIT)
        left = close_producer(self.producer, 5)  # now, not whenever the garbage collector breaks our cycles
        if left:
            log.warning("%d dead-letter/retry record(s) unsent at exit; their entries were not committed", left)
