"""The bounded buffer between the sources (via the pipeline) and the Kafka sink.

Limits in entries and in bytes; when a batch does not fit, the policy decides:

- `block`: `put` waits for room (the source stops reading, kernel buffers fill, writers
  block). Time spent waiting is counted in logferry_buffer_blocked_seconds_total.
- `drop_newest`: what does not fit is dropped (reason `buffer_full`).
- `drop_oldest`: the oldest entries are dropped to make room (reason `buffer_evicted`).
- `spill`: what does not fit goes to a `Spill` (the disk spool); see that protocol below.

Locking is per batch, not per entry: a source's whole read goes in under one lock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, Literal, Protocol

from logferry.collectors.sources.base import Settle
from logferry.metrics import (
    BUFFER_BYTES,
    BUFFER_ENTRIES,
    BUFFER_LIMIT_BYTES,
    BUFFER_LIMIT_ENTRIES,
    ENTRIES_DROPPED,
    SOURCE_BLOCKED_SECONDS,
)

# One encoded entry, ready for Kafka: (topic, key, value, timestamp_ms, source name, ack token).
# A plain tuple because one is made per entry on the hot path. `timestamp_ms` is the receive
# time (the Kafka record timestamp, and the start of the delivery-latency measurement);
# `ack token` is the source's opaque token (None when the source needs no acknowledgement).
Record = tuple[str, bytes | None, bytes, int, str, Any]
TOPIC, KEY, VALUE, TIMESTAMP, SOURCE, TOKEN = range(6)

Policy = Literal["block", "drop_newest", "drop_oldest", "spill"]


def record_size(r: Record) -> int:
    return len(r[VALUE]) + (len(r[KEY]) if r[KEY] else 0)


_values, _keys = itemgetter(VALUE), itemgetter(KEY)


def records_size(records: Sequence[Record]) -> int:
    """sum(map(record_size, records)) at C speed: it runs for every batch in and out."""
    return sum(map(len, map(_values, records))) + sum(map(len, filter(None, map(_keys, records))))


# Accepted from a source, then neither delivered nor spooled: the shutdown's grace period ran out.
UNDELIVERED = ENTRIES_DROPPED.labels(reason="undelivered")


class Spill(Protocol):
    """Where the `spill` policy puts records that do not fit in memory (the disk spool, issue 4).

    Order is kept: once anything is spilled, every later record is spilled too until
    `refill` has handed all spilled records back, so Kafka sees them in arrival order.
    All calls come with the buffer's lock held; they must not call back into the buffer.
    """

    def spill(self, records: Sequence[Record]) -> None:
        """Persist records durably (they count as accepted: the source may move on)."""

    def refill(self, max_entries: int, max_bytes: int) -> list[Record]:
        """The oldest spilled records, at most this many/this large, removed from the spill's queue."""

    def pending(self) -> int:
        """Records still spilled."""


class BufferClosed(Exception):
    """`put` on a buffer that no longer accepts entries (the agent is stopping without a drain)."""


class Buffer:
    def __init__(
        self,
        max_entries: int,
        max_bytes: int,
        policy: Policy = "block",
        spill: Spill | None = None,
        settle: Settle | None = None,
    ) -> None:
        """`settle`: receives the ack tokens of entries a drop policy discarded, by source name."""
        if policy == "spill" and spill is None:
            raise ValueError("buffer policy 'spill' needs a Spill (the disk spool)")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.policy = policy
        self.spill = spill
        self.settle = settle
        self._q: deque[Record] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self.refused = 0  # entries offered after close(): counted as undelivered
        self._dropped_full = ENTRIES_DROPPED.labels(reason="buffer_full")
        self._dropped_evicted = ENTRIES_DROPPED.labels(reason="buffer_evicted")
        BUFFER_LIMIT_ENTRIES.set(max_entries)
        BUFFER_LIMIT_BYTES.set(max_bytes)
        self._gauges()

    # ---- producer side (source threads) -------------------------------------------------
    def put(self, records: Sequence[Record], timeout: float | None = None) -> Sequence[Record]:
        """Take `records`; returns those not taken, which is only ever the tail of a `block` put whose
        `timeout` ran out (the caller keeps them and offers them again). After close(): BufferClosed."""
        if not records:
            return ()
        if self.policy == "spill" and getattr(self.spill, "write_ahead", False):
            # Durable first, outside the lock: a full spool (when_full=block) waits here while the sink drains.
            self.spill.spill(records)  # type: ignore[union-attr]
            with self._lock:
                self._not_empty.notify()
            return ()
        total = records_size(records)
        rest: Sequence[Record] = ()
        with self._lock:
            if self._closed:
                self._refuse(records)
            q = self._q
            if (
                len(q) + len(records) <= self.max_entries
                and self._bytes + total <= self.max_bytes
                and not (self.spill is not None and self.spill.pending())
            ):
                q.extend(records)  # the common case: the whole batch fits, no per-entry checks
                self._bytes += total
            else:
                sizes = list(map(record_size, records))
                if self.policy == "block":
                    deadline = None if timeout is None else time.monotonic() + timeout
                    rest = self._put_blocking(records, sizes, deadline)
                elif self.policy == "drop_newest":
                    self._put_drop_newest(records, sizes)
                elif self.policy == "drop_oldest":
                    self._put_drop_oldest(records, sizes)
                else:
                    self._put_spill(records, sizes)
            self._gauges()
            self._not_empty.notify()
        return rest

    def _fits(self, size: int) -> bool:
        # An empty buffer takes any one entry, so an entry larger than max_bytes cannot wedge it.
        return not self._q or (len(self._q) < self.max_entries and self._bytes + size <= self.max_bytes)

    def _append(self, record: Record, size: int) -> None:
        self._q.append(record)
        self._bytes += size

    def _put_blocking(self, records: Sequence[Record], sizes: list[int], deadline: float | None) -> Sequence[Record]:
        for i, (record, size) in enumerate(zip(records, sizes, strict=True)):
            while not self._fits(size):
                if self._closed:
                    self._refuse(records[i:])
                wait = 0.5
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return records[i:]
                t0 = time.monotonic()
                self._gauges()
                self._not_empty.notify()
                self._not_full.wait(wait)
                # Counted per wait, so a source stuck for minutes shows up while it is stuck.
                SOURCE_BLOCKED_SECONDS.inc(time.monotonic() - t0)
            self._append(record, size)
        return ()

    def _refuse(self, records: Sequence[Record]) -> None:
        """Closed: these entries will not be delivered. Counted (their sources stay unacknowledged)."""
        self.refused += len(records)
        UNDELIVERED.inc(len(records))
        raise BufferClosed

    def _put_drop_newest(self, records: Sequence[Record], sizes: list[int]) -> None:
        dropped: list[Record] = []
        for record, size in zip(records, sizes, strict=True):
            if self._fits(size):
                self._append(record, size)
            else:
                dropped.append(record)
        if dropped:
            self._dropped_full.inc(len(dropped))
            self._settle(dropped)

    def _put_drop_oldest(self, records: Sequence[Record], sizes: list[int]) -> None:
        evicted: list[Record] = []
        q = self._q
        for record, size in zip(records, sizes, strict=True):
            while not self._fits(size):
                old = q.popleft()
                self._bytes -= record_size(old)
                evicted.append(old)
            self._append(record, size)
        if evicted:
            self._dropped_evicted.inc(len(evicted))
            self._settle(evicted)

    def _settle(self, dropped: list[Record]) -> None:
        """A dropped entry is accounted for (counted): its source's checkpoint may move past it."""
        if self.settle is None:
            return
        by_source: dict[str, list[Any]] = {}
        for r in dropped:
            if r[TOKEN] is not None:
                by_source.setdefault(r[SOURCE], []).append(r[TOKEN])
        for source, tokens in by_source.items():
            self.settle(source, tokens)

    def _put_spill(self, records: Sequence[Record], sizes: list[int]) -> None:
        assert self.spill is not None
        i = 0
        if not self.spill.pending():
            while i < len(records) and self._fits(sizes[i]):
                self._append(records[i], sizes[i])
                i += 1
        if i < len(records):
            self.spill.spill(records[i:])

    # ---- consumer side (the sink thread) ------------------------------------------------
    def get(self, max_entries: int, timeout: float) -> list[Record]:
        """Up to `max_entries` records, oldest first; waits up to `timeout` for the first one."""
        with self._lock:
            if not self._q and not self._refill() and timeout > 0:
                self._not_empty.wait(timeout)
            q = self._q
            n = min(max_entries, len(q))
            if n == len(q):
                out = list(q)
                q.clear()
                self._bytes = 0
            else:
                out = [q.popleft() for _ in range(n)]
                self._bytes -= records_size(out)
            if out:
                self._refill()
                self._gauges()
                self._not_full.notify_all()
            return out

    def _refill(self) -> bool:
        if self.spill is None or not self.spill.pending():
            return False
        room_entries = self.max_entries - len(self._q)
        room_bytes = self.max_bytes - self._bytes
        if room_entries <= 0 or room_bytes <= 0:
            return False
        back = self.spill.refill(room_entries, room_bytes)
        for r in back:
            self._append(r, record_size(r))
        return bool(back)

    def unget(self, records: Sequence[Record]) -> None:
        """Records the sink took but could not hand to Kafka go back to the front, in order (beyond the
        limits if need be: they were within them when taken)."""
        with self._lock:
            self._q.extendleft(reversed(records))
            self._bytes += records_size(records)
            self._gauges()
            self._not_empty.notify()

    def close(self) -> None:
        """Refuse further puts (a source stuck in `put` gets BufferClosed; what it held is counted)."""
        with self._lock:
            self._closed = True
            self._not_full.notify_all()
            self._not_empty.notify_all()

    def discard(self) -> int:
        """At the end of a shutdown: count what only this buffer holds as undelivered (a write-ahead
        spill keeps its own copy of every record) and let it go. Returns that count."""
        with self._lock:
            n = 0 if getattr(self.spill, "write_ahead", False) else len(self._q)
            UNDELIVERED.inc(n)
            self._q.clear()
            self._bytes = 0
            self._gauges()
            return n

    def _gauges(self) -> None:
        BUFFER_ENTRIES.set(len(self._q))
        BUFFER_BYTES.set(self._bytes)

    def __len__(self) -> int:
        return len(self._q) + (self.spill.pending() if self.spill else 0)

    @property
    def bytes(self) -> int:
        return self._bytes
