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
the output therefore see each input's result exactly once. Dead letters still go through the
runtime's idempotent (non-transactional) producer: at-least-once, like every other mode.
"""

from __future__ import annotations

import functools
import inspect
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from logferry.errors import LogferryError
from logferry.kafka import KafkaSettings
from logferry.metrics import COMMITTED_OFFSET
from logferry.processors.config import ProcessorSection
from logferry.processors.context import Context
from logferry.processors.runtime import Runtime
from logferry.processors.tracking import PartitionState
from logferry.schemas import Codec

log = logging.getLogger("logferry.processors.exactly_once")

Record = tuple[bytes | None, bytes, list[tuple[str, bytes]] | None]
TXN_TIMEOUT = 30.0
COMMIT_TRIES = 3


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
    if isinstance(result, bytes):
        return [(key, result, headers)]
    if isinstance(result, str):
        return [(key, result.encode(), headers)]
    if isinstance(result, dict):
        return [(key, codec.encode(result), [*codec.headers, *(headers or [])])]
    raise TypeError(f"handler returned {type(result).__name__}; expected None, bytes, str, dict, Output or a list")


class ExactlyOnceRuntime(Runtime):
    def __init__(self, settings: ProcessorSection, kafka: KafkaSettings, handler: Callable[..., Any],
                 **kwargs: Any) -> None:  # fmt: skip
        # Results of done records not yet in a transaction: partition state -> offset -> records.
        self._results: dict[PartitionState, dict[int, list[Record]]] = {}
        # States revoked or seeked away: late results of their running work are dropped.
        self._retired: set[PartitionState] = set()
        self._results_lock = threading.Lock()
        super().__init__(settings, kafka, self._collecting(handler), **kwargs)
        assert settings.output_topic is not None
        self.output_topic = settings.output_topic
        self.transactional_id = transactional_id(settings)
        self.txn = Producer(
            kafka.client_config(**{
                "transactional.id": self.transactional_id,
                "transaction.timeout.ms": int(TXN_TIMEOUT * 1000),
                "linger.ms": 5,
                "error_cb": self._on_error,
            })
        )  # fmt: skip
        # Fences a predecessor with the same id and aborts its open transaction, if any.
        self.txn.init_transactions(TXN_TIMEOUT)
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

    def _keep(self, ctx: Context, records: list[Record]) -> None:
        if not records:
            return
        with self._results_lock:
            if ctx._state not in self._retired:
                self._results.setdefault(ctx._state, {})[ctx.offset] = records

    def _retire(self, states: list[PartitionState]) -> None:
        with self._results_lock:
            for st in states:
                self._results.pop(st, None)
                self._retired.add(st)

    # ---- the poll thread: one transaction per commit --------------------------------------
    def commit(self, states: list[PartitionState] | None = None, sync: bool = False) -> None:
        moved: list[tuple[PartitionState, int]] = []
        records: list[Record] = []
        with self._results_lock:
            for st in states if states is not None else list(self.states.values()):
                c = st.to_commit()
                if c is None:
                    continue
                moved.append((st, c))
                done = self._results.get(st)
                if done:
                    records += [r for off in sorted(o for o in done if o < c) for r in done[off]]
        if not moved:
            return
        offsets = [TopicPartition(st.topic, st.partition, c) for st, c in moved]
        if not self._transact(records, offsets):
            return  # aborted: the same prefix is offered again on the next tick (if still ours)
        with self._results_lock:
            for st, c in moved:
                st.committed = c
                done = self._results.get(st)
                for off in [o for o in done or () if o < c]:
                    del done[off]  # type: ignore[union-attr]
                COMMITTED_OFFSET.labels(self.group, st.topic, str(st.partition)).set(c)

    def _transact(self, records: list[Record], offsets: list[TopicPartition]) -> bool:
        txn = self.txn
        try:
            txn.begin_transaction()
            for key, value, headers in records:
                while True:
                    try:
                        txn.produce(self.output_topic, value=value, key=key, headers=headers)
                        break
                    except BufferError:
                        txn.poll(0.05)
            txn.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), TXN_TIMEOUT)
            for attempt in range(COMMIT_TRIES):
                try:
                    txn.commit_transaction(TXN_TIMEOUT)
                    return True
                except KafkaException as e:
                    if not e.args[0].retriable() or attempt == COMMIT_TRIES - 1:
                        raise
            return False
        except KafkaException as e:
            err: KafkaError = e.args[0]
            if err.fatal():
                self.stop_event.set()
                raise FencedError(
                    f"exactly-once producer {self.transactional_id} failed for good ({err.str()}); another member "
                    "probably runs with the same member_id: give each member its own --member-id"
                ) from None
            log.warning("exactly-once: transaction of %d result(s) aborted (%s); its offsets stay uncommitted",
                        len(records), err.str())  # fmt: skip
            try:
                txn.abort_transaction(TXN_TIMEOUT)
            except KafkaException as abort_err:
                log.warning("exactly-once: abort failed: %s", abort_err)
            return False

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
        super()._release(partitions, commit)  # commits (through self.commit) when revoked, not when lost
        self._retire(states)

    def _close(self) -> None:
        super()._close()
        self.txn.flush(5)
