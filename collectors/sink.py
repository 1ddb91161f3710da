"""The Kafka sink: one thread moves records from the buffer into an idempotent producer.

- enable.idempotence with acks=all: librdkafka retries retriable errors itself and keeps
  per-partition order, so the sink never re-produces a record (that could reorder a key).
- A full local queue (BufferError) is waited out with poll() and the same record is
  offered again: order within the sink is the buffer's order.
- Delivery reports drive the counters (delivered, failed by reason, latency from receipt
  to ack, last delivery time, connection state) and the acknowledgements: each source's
  ack tokens are handed back to `Source.delivered()` in the order the source emitted them,
  only up to the first entry not yet settled. An entry Kafka refused for good is settled
  too (counted in logferry_delivery_failures_total), so one poison entry cannot stop a
  file source's checkpoints forever.
- A Python call per delivery report was a third of the sink thread's time. While no source
  wants acknowledgements (sockets, pipes, queues: no checkpoints, no spool) only failures are
  reported (`delivery.report.only.error`, like Vector's acknowledgements being off) and
  deliveries are counted: see `CountedDeliveries`. The first source that wants them (a
  file, the spool, one added by SIGHUP) switches the sink to a report per entry for good,
  once the old producer has delivered all it holds, so no entry overtakes an older one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from logferry import affinity
from logferry.collectors.buffer import TIMESTAMP, TOKEN, TOPIC, VALUE, Buffer, Record
from logferry.collectors.config import SinkSettings
from logferry.collectors.profiling import profiled
from logferry.kafka import KafkaSettings
from logferry.log import LogOnce
from logferry.metrics import (
    DELIVERED,
    DELIVERED_BYTES,
    DELIVERY_FAILURES,
    DELIVERY_LATENCY,
    KAFKA_CONNECTED,
    LAST_DELIVERY,
    SINK_BATCH,
    observe_many,
)
from logferry.schemas import default_codec

log = logging.getLogger("logferry.sink")
AckCallback = Callable[[Sequence[Any]], None]
DeliveryCallback = Callable[[KafkaError | None, Message], None]
GET_BATCH = 10_000
# produce() takes (topic, value, key, partition, callback, on_delivery, timestamp, headers); called with
# positional arguments it skips keyword parsing: 1.4 -> 0.8 us a call, and it is the sink's hottest call.
ANY_PARTITION = -1  # RD_KAFKA_PARTITION_UA: librdkafka's partitioner picks (by key)
_QUEUED, _STOPPING = object(), object()  # outcomes of KafkaSink._offer_again
# Bytes delivered are values' bytes, as a delivery report's len(msg).
_topics, _values, _timestamps, _tokens = itemgetter(TOPIC), itemgetter(VALUE), itemgetter(TIMESTAMP), itemgetter(TOKEN)


class AckTracker:
    """Hands one source's ack tokens back in emit order, as far as every earlier entry is settled."""

    def __init__(self, deliver: AckCallback) -> None:
        self.deliver = deliver
        self._tokens: deque[Any] = deque()
        self._done: deque[bool] = deque()
        self._base = 0  # sequence number of the deque's head

    def add(self, token: Any) -> int:
        self._tokens.append(token)
        self._done.append(False)
        return self._base + len(self._tokens) - 1

    def settle(self, seq: int) -> None:
        self._done[seq - self._base] = True
        if not self._done[0]:
            return
        ready = []
        while self._done and self._done[0]:
            self._done.popleft()
            ready.append(self._tokens.popleft())
            self._base += 1
        try:
            self.deliver(ready)
        except Exception:  # a source's checkpoint problem must not stop deliveries
            log.exception("source acknowledgement callback failed")

    def __len__(self) -> int:
        return len(self._tokens)


class CountedDeliveries:
    """Deliveries of a producer that reports only failures, counted instead of reported.

    After poll(), `produced - len(producer)` entries are settled: librdkafka's count still holds
    an entry until its report was served, so this never counts one too early. Settled entries are
    attributed to topics and receive times in produce order: exact per partition (idempotence keeps
    it), and across partitions the split between topics and latencies can lag by what is in flight.
    A failed entry leaves the count at once (`fail`): settled in produce order, it would be counted
    as the delivery of an older entry, perhaps of another topic and still in flight.
    """

    def __init__(self) -> None:
        self._runs: deque[list[Any]] = deque()  # [topic, entries, bytes, receive time ms] in produce order
        self._failed: dict[str, int] = {}  # topic → failed entries whose place in the runs is not passed yet
        self.produced = 0  # less the failed
        self.settled = 0

    def add(self, records: Sequence[Record]) -> None:
        """Count produced records, as runs of one topic and receive time (one read of a source)."""
        if not records:
            return
        runs = self._runs
        topics = set(map(_topics, records))
        if len(topics) == 1:  # the usual batch: counted at C speed, its bytes split over the runs
            topic = topics.pop()
            nbytes, total = sum(map(len, map(_values, records))), len(records)
            left = nbytes
            for ts, n in Counter(map(_timestamps, records)).items():
                part = nbytes * n // total
                runs.append([topic, n, part, ts])
                left -= part
            runs[-1][2] += left
        else:
            groups: dict[tuple[str, int], list[Any]] = {}
            for topic, _key, value, ts, _source, _token in records:
                run = groups.get((topic, ts))
                if run is None:
                    run = groups[topic, ts] = [topic, 0, 0, ts]
                    runs.append(run)
                run[1] += 1
                run[2] += len(value)
        self.produced += len(records)

    def settle(self, outstanding: int, tallies: dict[str, list[int]], latencies: dict[int, int]) -> None:
        """`outstanding`: len(producer) just after a poll. Adds what settled since the last call."""
        n = self.produced - outstanding - self.settled
        if n <= 0:
            return
        self.settled += n
        runs, failed = self._runs, self._failed
        while n:
            topic, _entries, _bytes, ts = runs[0]
            if failed and (f := failed.get(topic)):  # the topic's oldest entries stand for its failed ones
                skip, part = _take_oldest(runs, f)
                if f == skip:
                    del failed[topic]
                else:
                    failed[topic] = f - skip
                tallies.setdefault(topic, [0, 0])[1] += part  # (their bytes came off the tally when they failed)
                continue
            take, part = _take_oldest(runs, n)
            tally = tallies.setdefault(topic, [0, 0])
            tally[0] += take
            tally[1] += part
            latencies[ts] = latencies.get(ts, 0) + take
            n -= take

    def fail(self, topic: str) -> None:
        """An entry of `topic` failed (its report is being served): not one to count delivered."""
        self.produced -= 1
        self._failed[topic] = self._failed.get(topic, 0) + 1


def _take_oldest(runs: deque[list[Any]], most: int) -> tuple[int, int]:
    """Up to `most` entries off the oldest run: (entries, their share of the run's bytes)."""
    run = runs[0]
    entries, nbytes = run[1], run[2]
    take = min(most, entries)
    part = nbytes if take == entries else nbytes * take // entries
    if take == entries:
        runs.popleft()
    else:
        run[1], run[2] = entries - take, nbytes - part
    return take, part


def failures_only(config: dict[str, Any], on_failure: DeliveryCallback) -> dict[str, Any]:
    """Producer settings that report only failed deliveries, all to `on_failure` (confluent-kafka skips
    successful reports in C, so they cost no Python call)."""
    return {**config, "delivery.report.only.error": True, "on_delivery": on_failure}


WRITE_AHEAD_WINDOW = 10_000  # spooled records handed to the producer at once (spill policy)


def producer_config(kafka: KafkaSettings, sink: SinkSettings, write_ahead: bool = False) -> dict[str, Any]:
    """The producer's settings. `write_ahead` (the `spill` policy): every record waits in the disk
    spool until Kafka acks it, so a delivery timeout would only turn an outage into a settled
    failure and free the spool; librdkafka's 0 = retry until delivered (allowed with idempotence)."""
    return kafka.client_config(
        **{
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": sink.compression,
            "linger.ms": sink.linger_ms,
            "batch.size": sink.batch_size,
            "batch.num.messages": sink.batch_num_messages,
            "message.max.bytes": sink.max_message_bytes,
            "delivery.timeout.ms": 0 if write_ahead else sink.delivery_timeout_ms,
            # With the spool holding everything on disk, only a window of it need sit in
            # librdkafka's memory: memory stays flat however long Kafka is away.
            "queue.buffering.max.messages": min(sink.queue_max_messages, WRITE_AHEAD_WINDOW)
            if write_ahead
            else sink.queue_max_messages,
            "queue.buffering.max.kbytes": 256 * 1024,
        }
    )


class KafkaSink:
    def __init__(
        self,
        kafka: KafkaSettings,
        settings: SinkSettings,
        buffer: Buffer,
        acks: dict[str, AckCallback] | None = None,
        free_cpus: set[int] | None = None,
    ) -> None:
        """`free_cpus`: the agent's threads are pinned (`pin_to_cpu`); producers start their threads on these."""
        self.buffer = buffer
        self.free_cpus = free_cpus
        self.settings = settings
        self.headers = default_codec().headers
        write_ahead = bool(getattr(buffer.spill, "write_ahead", False))
        self._config = {**producer_config(kafka, settings, write_ahead), "error_cb": self._on_error}
        self._trackers = {name: AckTracker(cb) for name, cb in (acks or {}).items()}
        # None: every delivery is reported (some source wants acknowledgements); else only failures.
        self.counted: CountedDeliveries | None = None if self._trackers else CountedDeliveries()
        self._wants_reports = False  # a record with an ack token reached the counting producer
        self.producer = self._new_producer()
        self._thread = threading.Thread(target=profiled(self._run, "kafka-sink"), name="kafka-sink", daemon=True)
        self._stop = threading.Event()
        self._drain_deadline: float | None = None
        self._log_once = LogOnce(log)
        # Per-poll tallies, pushed to Prometheus once per poll instead of once per entry.
        self._tallies: dict[str, list[int]] = {}  # topic → [entries, bytes] acked since the last push
        self._callbacks: dict[str, DeliveryCallback] = {}  # topic → its delivery callback
        self._latencies: dict[int, int] = {}  # record timestamp (ms) → entries acked in this poll
        self.delivered_total = 0
        self.failed_total = 0
        self.produced_total = 0
        KAFKA_CONNECTED.set(0)

    def _new_producer(self, every_delivery: bool = False) -> Producer:
        if every_delivery or self.counted is None:
            # Some source checkpoints on acknowledgements (a file; the spool): a delivery timeout would
            # settle an outage's entries as failures and move its checkpoint past them. They wait for
            # Kafka instead (librdkafka's 0 = until delivered); only what Kafka refuses for good fails.
            config = {**self._config, "delivery.timeout.ms": 0}
        else:
            config = failures_only(self._config, self._on_failed_report)
        with affinity.unpinned(self.free_cpus):  # made on the sink thread when reports switch on
            return Producer(config)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> KafkaSink:
        self._thread.start()
        return self

    def drain(self, grace: float) -> int:
        """Deliver what the buffer and producer hold, for at most `grace` seconds; return what is left."""
        self._drain_deadline = time.monotonic() + grace
        self._thread.join(grace)
        self._stop.set()  # also ends a produce waiting on librdkafka's full queue (its batch goes back)
        self._thread.join(5)
        return self._left()

    def stop_now(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self._left()

    def _left(self) -> int:
        """Entries the buffer and the producer still hold, the sink thread stopped. librdkafka's
        len() also counts callbacks waiting to be served (with Kafka away, an error event per
        failed connection), so they are served first: each would be counted as an entry."""
        if not self._thread.is_alive():  # else its poll() serves them: callbacks stay on one thread
            while self.producer.poll(0):
                pass
            self._flush_tallies()
        return len(self.buffer) + len(self.producer)

    def close(self) -> None:
        """Release the producer; what it still holds is purged (counted as failures, reason _PURGE_QUEUE)."""
        self.producer.purge()
        self.producer.poll(0)
        self._flush_tallies()
        self.producer.close()  # holds nothing now: its flush returns at once

    def set_ack(self, source: str, deliver: AckCallback) -> None:
        """A (re)started source's acknowledgement callback; entries in flight go to the new one."""
        tracker = self._trackers.get(source)
        if tracker is None:
            self._trackers[source] = AckTracker(deliver)
        else:
            tracker.deliver = deliver

    @property
    def in_flight(self) -> int:
        return len(self.producer)

    # ---- the loop -----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._step():
                    return
            except Exception:  # a bug in a callback must not silently stop all deliveries
                log.exception("Kafka sink: unexpected error; continuing")

    def _step(self) -> bool:
        """One round: move what librdkafka has room for, serve callbacks. True when the drain is over."""
        if self.counted is not None and (self._trackers or self._wants_reports) and not self._report_every_delivery():
            return self._drain_over()
        # Take only what librdkafka has room for: the rest waits in the buffer, where its
        # limits and full-policy apply, rather than piling up unbounded in this thread.
        room = min(GET_BATCH, self.settings.queue_max_messages - len(self.producer))
        records = self.buffer.get(room, 0.05) if room > 0 else []
        if room <= 0:
            self.producer.poll(0.05)
        if records:
            SINK_BATCH.observe(len(records))
            self._produce_all(records)
        self.producer.poll(0)
        self._flush_tallies()
        return self._drain_over(bool(records))

    def _drain_over(self, produced: bool = False) -> bool:
        deadline = self._drain_deadline
        if deadline is None:
            return False
        if not produced and len(self.buffer) == 0:
            self.producer.flush(min(max(0.0, deadline - time.monotonic()), 0.5))
            self._flush_tallies()
            if len(self.producer) == 0:
                return True
        return time.monotonic() >= deadline

    def _report_every_delivery(self) -> bool:
        """Switch to a report per entry (a source wants acknowledgements): the old producer delivers
        what it holds first, so no entry overtakes an older one. False while that is not done."""
        old = self.producer
        if len(old):
            old.flush(0.1)
        self._flush_tallies()
        if len(old):
            return False
        self.producer = self._new_producer(every_delivery=True)  # made first: if it fails, the switch is tried again
        self.counted = None
        old.close()
        log.info("Kafka sink: a source wants acknowledgements; every delivery is reported from now on")
        return True

    def _produce_all(self, records: list[Record]) -> None:
        if self.counted is not None:
            self._produce_counted(records)
            return
        produce, headers = self.producer.produce, self.headers
        callbacks, trackers = self._callbacks, self._trackers
        for topic, key, value, ts, source, token in records:
            callback = callbacks.get(topic) or self._delivery_callback(topic)
            if token is not None and (tracker := trackers.get(source)) is not None:
                seq = tracker.add(token)
                callback = self._ack_callback(tracker, seq, callback)
            try:
                produce(topic, value, key, ANY_PARTITION, callback, None, ts, headers)
            except (BufferError, KafkaException) as e:
                outcome = self._offer_again(e, (topic, value, key, ANY_PARTITION, callback, None, ts, headers))
                if outcome is _STOPPING:
                    self._give_back(records, value)
                    return
                if outcome is not _QUEUED and token is not None and source in trackers:
                    callback(outcome if outcome is not None else KafkaError(KafkaError._INVALID_ARG), None)
        self.produced_total += len(records)

    def _produce_counted(self, records: list[Record]) -> None:
        """`_produce_all` without a report per entry: the batch is counted once it is queued."""
        tokens = list(map(_tokens, records))
        if tokens.count(None) != len(tokens):  # a source wants acknowledgements: switch first (see _step)
            first = next(i for i, t in enumerate(tokens) if t is not None)
            self._wants_reports = True
            self.buffer.unget(records[first:])
            records = records[:first]
        produce, headers, counted = self.producer.produce, self.headers, self.counted
        assert counted is not None
        refused: set[int] = set()  # ids of records Kafka refused before queueing (not produced)
        for record in records:
            topic, key, value, ts, _source, _token = record
            try:
                produce(topic, value, key, ANY_PARTITION, None, None, ts, headers)
            except (BufferError, KafkaException) as e:
                outcome = self._offer_again(e, (topic, value, key, ANY_PARTITION, None, None, ts, headers))
                if outcome is _STOPPING:
                    start = self._give_back(records, value)
                    counted.add([r for r in records[:start] if id(r) not in refused])
                    return
                if outcome is not _QUEUED:
                    refused.add(id(record))
        counted.add([r for r in records if id(r) not in refused] if refused else records)
        self.produced_total += len(records)

    def _offer_again(self, exc: Exception, args: tuple[Any, ...]) -> object:
        """The slow path of one produce(): librdkafka's queue is full (let deliveries free it, then offer
        the record again) or the record was refused before queueing (e.g. an invalid topic name).
        Returns _QUEUED, _STOPPING (stopped while waiting: the caller gives the batch back) or, refused,
        the KafkaError (None if Kafka named none), counted as a delivery failure."""
        while isinstance(exc, BufferError):
            self.producer.poll(0.05)
            self._flush_tallies()
            if self._stop.is_set():
                return _STOPPING
            try:
                self.producer.produce(*args)
                return _QUEUED
            except (BufferError, KafkaException) as e:
                exc = e
        err = exc.args[0] if exc.args else None
        self._failed(args[0], err)
        return err

    def _give_back(self, records: list[Record], offered: bytes) -> int:
        """Stopping with librdkafka's queue full: the batch from the record being offered on goes back
        to the buffer, where a drain's count of what is left (and a spill's copy) still sees it."""
        start = next(i for i, r in enumerate(records) if r[VALUE] is offered)
        self.buffer.unget(records[start:])
        return start

    @staticmethod
    def _ack_callback(
        tracker: AckTracker, seq: int, on_delivery: DeliveryCallback
    ) -> Callable[[KafkaError | None, Message | None], None]:
        def callback(err: KafkaError | None, msg: Message | None) -> None:
            if msg is not None:
                on_delivery(err, msg)
            if err is not None and err.code() == KafkaError._PURGE_QUEUE:
                return  # purged at close, never sent: its source must not checkpoint past it
            tracker.settle(seq)

        return callback

    # ---- callbacks (run inside poll(), on the sink thread) -------------------------------
    def _delivery_callback(self, topic: str) -> DeliveryCallback:
        """One callback per topic, bound to its tally: a delivery report is the hottest Python
        call after produce() itself, so it does no lookups it can avoid."""
        tally = self._tallies.setdefault(topic, [0, 0])
        latencies, failed = self._latencies, self._failed

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                failed(topic, err)
                return
            tally[0] += 1
            tally[1] += len(msg)
            ts = msg.timestamp()[1]
            latencies[ts] = latencies.get(ts, 0) + 1

        self._callbacks[topic] = on_delivery
        return on_delivery

    def _on_failed_report(self, err: KafkaError | None, msg: Message) -> None:
        """The only report a counting producer sends: its entry is settled, not delivered."""
        if err is None:  # not sent with delivery.report.only.error; harmless if it ever is
            return
        topic = msg.topic() or "?"
        self._failed(topic, err)
        if self.counted is not None:  # out of the count before it settles (see CountedDeliveries)
            self.counted.fail(topic)
        self._tallies.setdefault(topic, [0, 0])[1] -= len(msg)

    def _failed(self, topic: str, err: KafkaError | None) -> None:
        reason = err.name() if isinstance(err, KafkaError) else "unknown"
        DELIVERY_FAILURES.labels(topic=topic, reason=reason).inc()
        self.failed_total += 1
        self._log_once.warning(f"delivery:{reason}", "Kafka refused an entry for topic %s: %s", topic, err)

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            KAFKA_CONNECTED.set(0)
        if err.fatal():
            log.error("Kafka producer fatal error: %s", err)
        else:
            self._log_once.warning(f"kafka:{err.name()}", "Kafka: %s", err)

    def _flush_tallies(self) -> None:
        latencies = self._latencies
        if self.counted is not None:
            self.counted.settle(len(self.producer), self._tallies, latencies)
        if not latencies:  # nothing acked since the last push (every ack adds a latency)
            return
        now = time.time()
        now_ms = now * 1000
        delivered = 0
        for topic, tally in self._tallies.items():
            count, nbytes = tally
            if count > 0:  # (a counting producer's failure can be subtracted before its entry settles)
                DELIVERED.labels(topic=topic).inc(count)
                DELIVERED_BYTES.labels(topic=topic).inc(max(nbytes, 0))
                delivered += count
                tally[0] = 0  # in place: the topic's callback holds this list
                tally[1] = min(nbytes, 0)
        observed: dict[float, int] = {}
        for ts, n in latencies.items():  # receive times after now (a clock stepped back) all observe 0
            if n:
                seconds = max(0.0, (now_ms - ts) / 1000)
                observed[seconds] = observed.get(seconds, 0) + n
        observe_many(DELIVERY_LATENCY, observed)
        latencies.clear()
        if delivered:
            self.delivered_total += delivered
            LAST_DELIVERY.set(now)
            KAFKA_CONNECTED.set(1)
