"""What a handler is told about the record it is handling; also the runtime's unit of work.

One object per record, so the hot path allocates nothing else: the runtime's bookkeeping
lives in underscore slots beside the handler-facing properties.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from confluent_kafka import Message

if TYPE_CHECKING:
    from logferry.processors.tracking import PartitionState


class Context:
    """`ctx` in `handler(entry, ctx)`: key, topic, partition, offset, headers, attempt, timestamp."""

    __slots__ = ("_done", "_msg", "_started", "_state", "attempt", "entry", "lane", "offset")

    def __init__(self, msg: Message, state: PartitionState, entry: Any, lane: Hashable, offset: int) -> None:
        self._msg = msg
        self._state = state
        self._started = False
        self._done = False
        self.entry = entry
        self.lane = lane
        self.offset = offset
        # Attempts made before this delivery (carried by delayed retry topics); the executor adds its own.
        self.attempt = 0

    @property
    def key(self) -> bytes | None:
        return self._msg.key()

    @property
    def topic(self) -> str:
        return self._state.topic

    @property
    def partition(self) -> int:
        return self._state.partition

    @property
    def high(self) -> bool:
        """From a high-priority topic (served first)."""
        return self._state.high

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return self._msg.headers() or []

    @property
    def timestamp(self) -> float | None:
        """Record timestamp in seconds since the epoch (None when the record has none)."""
        kind, ms = self._msg.timestamp()
        return ms / 1000.0 if kind else None

    @property
    def value(self) -> bytes | None:
        return self._msg.value()

    @property
    def message(self) -> Message:
        return self._msg

    def __repr__(self) -> str:
        return f"Context({self.topic}[{self.partition}]@{self.offset}, key={self.key!r}, attempt={self.attempt})"
