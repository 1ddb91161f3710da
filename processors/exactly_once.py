"""Exactly-once consume-transform-produce: `Processor(..., exactly_once=True, output_topic=...)`.

The handler *returns* its results instead of producing them: None (nothing), bytes or str (one
record), a LogEntry dict (Avro with the codec headers), an `Output` (own key/headers), or a
list of those. Workers keep them beside the record; they are not sent yet. On each commit
tick (and on revoke and stop) the poll thread takes every partition's done prefix, the same
one the at-least-once runtime would commit, and in ONE transaction produces those records'
results (in offset order, so per-key order carries into the output) and sends the consumed
offsets with the group metadata (KIP-447), then commits. So the key-ordered parallelism is
kept: workers run out of order across keys, the transaction always covers a gap-free prefix.

A crash before commit_transaction: the open transaction is aborted (by the restarted member,
whose stable transactional.id fences its predecessor at once, or by the transaction timeout)
and the group resumes from the previous transaction's offsets. A rebalance that fences the
offsets (stale generation) aborts; the new owner redoes the work. read_committed readers of
the output therefore see each input's result exactly once. A delayed-retry copy rides in the
transaction too (it is handled again, so it must not outlive an abort). Dead letters still go
through the runtime's idempotent (non-transactional) producer: at-least-once, like every other mode.
"""

from __future__ import annotations

import functools
import inspect
import logging
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from logferry.errors import LogferryError
from logferry.kafka import KafkaSettings, close_producer
from logferry.log import LogOnce
from logferry.metrics import COMMITTED_OFFSET, RETRIED, TXN_COMMIT_RETRIES
from logferry.processors.config import ProcessorSection
from logferry.processors.context import Context
from logferry.processors.failures import Divert
from logferry.processors.runtime import Runtime
from logferry.processors.tracking import PartitionState, complete_diverted
from logferry.schemas import Codec

log = logging.getLogger("logferry.processors.exactly_once")
once = LogOnce(log)

Record = tuple[bytes | None, bytes, list[tuple[str, bytes]] | None]
TXN_TIMEOUT = 30.0
SEND_OFFSETS_TRIES = 3
# librdkafka refuses at produce() a record whose key + value + headers + framing (<= ~40 bytes of
# varints and attributes, <= 10 per header) exceed message.max.bytes: bounds of that framing.
RECORD_OVERHEAD, HEADER_OVERHEAD = 64, 10


class FencedError(LogferryError):
    """Another member runs with this member's transactional.id (or the producer failed for good)."""


@dataclass(frozen=True)
class Output:
    """A result with its own key or headers (default key: the input record's key)."""

    value: bytes | str | dict[str, Any]
    key: bytes | str | None = None
    headers: list[tuple[str, bytes]] | None = None


def transactional_id(settings: ProcessorSection) -> str:
    """Stable across restarts of one member, distinct between members (a clash fences the older one)."""
    return f"logferry-{settings.group}-{settings.member_id or socket.gethostname()}"


def wire_size(record: Record) -> int:
    """An upper bound of the size librdkafka checks against message.max.bytes."""
    key, value, headers = record
    size = RECORD_OVERHEAD + len(value) + len(key or b"")
    for name, v in headers or ():
        for part in (name, v or b""):
            size += len(part.encode() if isinstance(part, str) else part)
    return size + HEADER_OVERHEAD * len(headers or ())


def _header_types(name: object, value: object) -> bool:
    return isinstance(name, str | bytes) and isinstance(value, str | bytes | None)


def to_records(result: Any, ctx: Context, codec: Codec) -> list[Record]:
    """A handler's return value as output records (raises TypeError/SchemaError: a handler failure)."""
    if result is None:
        return []
    if isinstance(result, list | tuple):
        return [r for item in result for r in to_records(item, ctx, codec)]
    key: bytes | str | None = ctx.key
    headers: list[tuple[str, bytes]] | None = None
    if isinstance(result, Output):
        key, headers, result = (result.key if result.key is not None else ctx.key), result.headers, result.value
    if isinstance(key, str):
        key = key.encode()
    # Checked here, in the worker, so a bad result fails its own input (retries, dead letter): at
    # produce() time it would abort the member's every transaction, or crash it.
    if key is not None and not isinstance(key, bytes):
        raise TypeError(f"result key is {type(key).__name__}; expected bytes, str or None")
    if headers is not None:
        headers = list(headers.items() if isinstance(headers, dict) else headers)
        if not all(isinstance(h, tuple) and len(h) == 2 and _header_types(*h) for h in headers):
            raise TypeError("result headers must be a list of (str, bytes) pairs")
    if isinstance(result, bytes):
        return [(key, result, headers)]
    if isinstance(result, str):
        return [(key, result.encode(), headers)]
    if isinstance(result, dict):
        return [(key, codec.encode(result), [*codec.headers, *(headers or [])])]
    raise TypeError(f"handler returned {type(result).__name__}; expected None, bytes, str, dict, Output or a list")


class ExactlyOnceRuntime(Runtime):
    # Seconds one commit_transaction call may block the poll thread; a timed-out commit stays in
    # doubt and is called again on the next tick (librdkafka: a commit that timed out may still
    # complete in the background and must be retried, never aborted).
    commit_timeout: float = TXN_TIMEOUT

    def __init__(self, settings: ProcessorSection, kafka: KafkaSettings, handler: Callable[..., Any],
                 **kwargs: Any) -> None:  # fmt: skip
        # Results of done records not yet in a transaction: partition state -> offset -> (topic, records).
        self._results: dict[PartitionState, dict[int, tuple[str, list[Record]]]] = {}
        # States being revoked: their running work may still finish and be committed, though they
        # are no longer in `states`. Any other state that is not current is retired: late results
        # of its running work are dropped. Empty between rebalances, so nothing accumulates.
        self._releasing: set[PartitionState] = set()
        self._results_lock = threading.Lock()
        # A transaction whose commit timed out: its (state, offset) moves, applied once it commits.
        self._in_doubt: list[tuple[PartitionState, int]] | None = None
        super().__init__(settings, kafka, self._collecting(handler), **kwargs)
        try:  # the consumer and producer exist now: a failure below must close them
            self.router.divert = self._divert
            assert settings.output_topic is not None
            self.output_topic = settings.output_topic
            self.transactional_id = transactional_id(settings)
            txn_config = kafka.client_config(**{
                "transactional.id": self.transactional_id,
                "transaction.timeout.ms": int(TXN_TIMEOUT * 1000),
                "linger.ms": 5,
                "error_cb": self._on_error,
            })  # fmt: skip
            self.max_message_bytes = int(txn_config.get("message.max.bytes", 1_000_000))
            self.txn = Producer(txn_config)  # refused e.g. with [kafka.extra] enable.idempotence = false
            # Fences a predecessor with the same id and aborts its open transaction, if any.
            self.txn.init_transactions(TXN_TIMEOUT)  # fails e.g. with no coordinator within the timeout
        except BaseException:
            self._close_unstarted()
            raise
        log.info("exactly-once: transactional.id %s, results to %s", self.transactional_id, self.output_topic)

    # ---- workers: keep results beside the record -------------------------------------------
    def _collecting(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(handler):

            @functools.wraps(handler)
            async def collect_async(entry: Any, ctx: Context) -> None:
                self._keep(ctx, to_records(await handler(entry, ctx), ctx, self.codec))

            return collect_async

        @functools.wraps(handler)
        def collect(entry: Any, ctx: Context) -> None:
            self._keep(ctx, to_records(handler(entry, ctx), ctx, self.codec))

        return collect

    def _keep(self, ctx: Context, records: list[Record], topic: str | None = None) -> None:
        if not records:
            return
        for r in records:
            if (size := wire_size(r)) > self.max_message_bytes:
                raise ValueError(f"a result of ~{size} bytes exceeds message.max.bytes ({self.max_message_bytes})")
        st = ctx._state
        with self._results_lock:
            if self.states.get((st.topic, st.partition)) is st or st in self._releasing:
                self._results.setdefault(st, {})[ctx.offset] = (topic or self.output_topic, records)

    def _divert(self, d: Divert) -> None:
        """A retry-topic copy goes in the transaction with its input's offset: sent on its own, it
        would outlive an aborted transaction, and the input, handled again, would then yield its
        result twice (once more from the copy). Dead letters stay at-least-once (never re-handled)."""
        copy = (d.ctx.key, d.ctx.value, d.headers)
        if d.kind != "retry" or d.ctx.value is None or wire_size(copy) > self.max_message_bytes:
            self.router.send(d)  # its refusals stall the partition, never the transaction
            return
        self._keep(d.ctx, [copy], d.target)  # type: ignore[list-item]
        RETRIED.labels(self.group, d.original).inc()
        complete_diverted(d.ctx)

    def _retire(self, states: list[PartitionState]) -> None:
        with self._results_lock:
            for st in states:
                self._results.pop(st, None)
                self._releasing.discard(st)

    # ---- the poll thread: one transaction per commit --------------------------------------
    def commit(self, states: list[PartitionState] | None = None, sync: bool = False) -> None:
        # Handled records' results wait in memory for a transaction. While none can commit (in
        # doubt, or aborted: coordinator away, output refused) the member fetches nothing new, so
        # they do not pile up; the next commit that goes through resumes it.
        self.pauses.set_global("transaction", not self._commit(states, sync))

    def _commit(self, states: list[PartitionState] | None, sync: bool) -> bool:
        """True when the transaction committed, or there was nothing to commit."""
        if self._in_doubt is not None and not self._settle(wait=sync):
            return False  # still in doubt (no new transaction may start), or aborted: offered again next tick
        moved: list[tuple[PartitionState, int]] = []
        records: list[tuple[str, Record]] = []
        with self._results_lock:
            for st in states if states is not None else list(self.states.values()):
                c = st.to_commit()
                if c is None:
                    continue
                moved.append((st, c))
                done = self._results.get(st)
                for off in sorted(o for o in done or () if o < c):
                    topic, rs = done[off]  # type: ignore[index]
                    records += [(topic, r) for r in rs]
        if not moved:
            return True
        offsets = [TopicPartition(st.topic, st.partition, c) for st, c in moved]
        if not self._open(records, offsets):
            return False  # aborted: the same prefix is offered again on the next tick (if still ours)
        self._in_doubt = moved
        return self._settle(wait=sync)

    def _open(self, records: list[tuple[str, Record]], offsets: list[TopicPartition]) -> bool:
        """Begin a transaction with the results and the offsets; False when it had to be aborted."""
        txn = self.txn
        try:
            txn.begin_transaction()
            for topic, (key, value, headers) in records:
                while True:
                    try:
                        txn.produce(topic, value=value, key=key, headers=headers)
                        break
                    except BufferError:
                        txn.poll(0.05)
            for attempt in range(SEND_OFFSETS_TRIES):
                try:
                    txn.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), TXN_TIMEOUT)
                    break
                except KafkaException as e:
                    if not _retriable(e.args[0]) or attempt == SEND_OFFSETS_TRIES - 1:
                        raise
            return True
        except KafkaException as e:
            self._abort(e.args[0], len(records))
            return False

    def _settle(self, wait: bool) -> bool:
        """Commit the open transaction; True once it committed (False: aborted to be redone, or in doubt).

        A retriable failure (e.g. the call timed out) leaves it in doubt: it may have committed, so
        it is never aborted then; commit_transaction is called again (idempotent), now while `wait`
        (revoke, stop: up to the transaction timeout), else on the next tick.
        """
        assert self._in_doubt is not None
        deadline = time.monotonic() + (TXN_TIMEOUT if wait else 0.0)
        while True:
            try:
                self.txn.commit_transaction(self.commit_timeout)
                break
            except KafkaException as e:
                err: KafkaError = e.args[0]
                if not _retriable(err):
                    self._in_doubt = None
                    self._abort(err, None)
                    return False
                TXN_COMMIT_RETRIES.labels(self.group).inc()
                once.warning(f"txn-commit:{err.name()}", "exactly-once: commit in doubt (%s); committing it "
                             "again before anything new", err.str())  # fmt: skip
                if time.monotonic() >= deadline:
                    return False
        moved, self._in_doubt = self._in_doubt, None
        with self._results_lock:
            for st, c in moved:
                st.committed = c
                done = self._results.get(st)
                for off in [o for o in done or () if o < c]:
                    del done[off]  # type: ignore[union-attr]
                COMMITTED_OFFSET.labels(self.group, st.topic, str(st.partition)).set(c)
        return True

    def _abort(self, err: KafkaError, results: int | None) -> None:
        """After an abortable error: abort, so the same prefix is offered again. Fatal: stop the member."""
        if err.fatal():
            self.stop_event.set()
            raise FencedError(
                f"exactly-once producer {self.transactional_id} failed for good ({err.str()}); another member "
                "probably runs with the same member_id: give each member its own --member-id"
            ) from None
        what = "transaction" if results is None else f"transaction of {results} result(s)"
        log.warning("exactly-once: %s aborted (%s); its offsets stay uncommitted", what, err.str())
        try:
            self.txn.abort_transaction(TXN_TIMEOUT)
        except KafkaException as abort_err:
            log.warning("exactly-once: abort failed: %s", abort_err)

    # ---- partitions leaving: commit what is done, then drop what is left ------------------
    def seek(self, topic: str, partition: int, offset: int) -> None:
        old = self.states.get((topic, partition))
        if old is not None:
            self.commit([old], sync=True)  # work done before the replay keeps its results
        super().seek(topic, partition, offset)
        if old is not None:
            self._retire([old])

    def _release(self, partitions: list[TopicPartition], commit: bool) -> None:
        states = [st for p in partitions if (st := self.states.get((p.topic, p.partition))) is not None]
        with self._results_lock:
            self._releasing.update(states)
        try:
            super()._release(partitions, commit)  # commits (through self.commit) when revoked, not when lost
        finally:
            self._retire(states)

    def _close_unstarted(self) -> None:
        """__init__ failed: close the clients made so far; the caller raises the cause, so closing
        only logs its own trouble (and close() cannot abort an unfinished init: it would only say so)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                super()._close()
                if (txn := getattr(self, "txn", None)) is not None:
                    close_producer(txn, 5)
        except Exception:
            log.warning("closing the clients of a member that could not start", exc_info=True)

    def _close(self) -> None:
        try:
            super()._close()
            if self._in_doubt is not None:
                self._settle(wait=True)
        finally:  # a fenced member's last commit raises FencedError: the producer is closed all the same
            close_producer(self.txn, 5)  # an open transaction is aborted: its input is handled again


def _retriable(err: KafkaError) -> bool:
    """librdkafka's transactional contract: retry the same call only when retriable and not abortable/fatal."""
    return err.retriable() and not err.txn_requires_abort() and not err.fatal()
