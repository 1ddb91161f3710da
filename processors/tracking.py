"""Per-partition offset tracking: the highest offset below which every record is done.

The poll thread appends records in fetch order and computes the committable offset;
workers only flip `ctx._done` (one attribute store, atomic under the GIL) and bump a
completion count under a lock. A revoked or re-seeked partition gets a fresh state, so
late completions of the old one can never move the new one's commit point.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable
from itertools import repeat, takewhile
from operator import attrgetter

from logferry.processors.context import Context

_count_lock = threading.Lock()
_is_done, _state_of = attrgetter("_done"), attrgetter("_state")


class PartitionState:
    __slots__ = (
        "admitted", "closed", "committed", "completed", "diverted", "high", "last_seen", "partition", "pending",
        "reported", "retry", "topic",
    )  # fmt: skip

    def __init__(
        self, topic: str, partition: int, start: int | None = None, high: bool = True, retry: bool = False
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.high = high  # a high-priority topic: its lanes are served first
        self.retry = retry  # a delayed-retry topic: records wait until due
        self.pending: deque[Context] = deque()
        # Highest offset fetched (-1: none); records at or below it are never admitted twice.
        self.last_seen: int = -1 if start is None else start - 1
        self.committed: int | None = None
        self.admitted = 0
        self.completed = 0
        self.diverted = 0  # completed by a dead-letter or retry-topic copy, not by the handler
        self.reported = 0  # handler completions already added to the processed metric
        # Set on revoke, seek or stop: queued work for this state is skipped, never committed past.
        self.closed = False

    def admit(self, ctx: Context, counted: bool = True) -> None:
        """Poll thread only (the runtime inlines this on its hot path). `counted=False`: done on arrival."""
        self.pending.append(ctx)
        self.last_seen = ctx.offset
        if counted:
            self.admitted += 1

    def trim(self) -> None:
        """Poll thread only: forget the done prefix. Called every poll loop, not just at commit time:
        a second's worth of finished records (and their decoded entries) kept alive made every full
        garbage collection crawl through them, which cost more than handling them."""
        pending = self.pending
        if not pending or not pending[0]._done:
            return
        n = len(list(takewhile(_is_done, pending)))  # the done prefix, counted at C speed
        if n == len(pending):
            pending.clear()
        else:
            for _ in repeat(None, n):
                pending.popleft()

    def committable(self) -> int | None:
        """Poll thread only: the next offset to consume after the done prefix (Kafka's commit convention)."""
        self.trim()
        pending = self.pending
        if pending:
            return pending[0].offset
        return None if self.last_seen < 0 else self.last_seen + 1

    def to_commit(self) -> int | None:
        """The committable offset if it moved past the last commit, else None."""
        c = self.committable()
        if c is None or (self.committed is not None and c <= self.committed):
            return None
        return c

    @property
    def in_flight(self) -> int:
        return self.admitted - self.completed

    def newly_processed(self) -> int:
        """Poll thread only: handler completions since the last call (for the processed metric)."""
        n = self.completed - self.diverted - self.reported
        if n <= 0:  # a diverted record counted before its completion: settle next time
            return 0
        self.reported += n
        return n

    def running(self) -> int:
        """Records a worker has started and not finished (revoke waits for these)."""
        return sum(1 for c in self.pending if c._started and not c._done)


def complete(items: Iterable[Context]) -> None:
    """Mark records done. Called by delivery callbacks and tests, in any thread."""
    items = list(items)
    for ctx in items:
        ctx._done = True
    count_completed(items)


def complete_diverted(ctx: Context) -> None:
    """Mark a record done by its dead-letter or retry-topic copy; any thread (the poll thread's
    delivery callbacks, an exactly-once worker), so its count is kept under the lock too."""
    ctx._done = True
    with _count_lock:
        ctx._state.diverted += 1
        ctx._state.completed += 1


def count_completed(items: Iterable[Context]) -> None:
    """Count records already marked done. Workers flip `ctx._done` as each record finishes (so the
    commit point moves at once) and count a lane's worth here, under one lock acquisition."""
    per_state = Counter(map(_state_of, items))
    with _count_lock:
        for st, n in per_state.items():
            st.completed += n
