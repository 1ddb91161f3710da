"""What every source is: a small object that turns one IPC channel into framed entries.

A source reads its channel and hands frames (bytes, one log entry each, not yet parsed)
to `emit`, in batches when the channel gives several at once. `emit` may block: that is
the `block` full-policy pushing back, and a source must then simply stop reading (the
kernel buffer fills and writers wait). A source never parses, never touches Kafka and
never counts drops: the pipeline does that once for all sources.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from logferry.metrics import SOURCE_BYTES, SOURCE_ENTRIES, SOURCE_ERRORS


def now_micros() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True)
class Frames:
    """A batch of frames read together from one stream of one source."""

    frames: Sequence[bytes]
    source: str
    # Identifies the stream inside the source (a client connection, a file) so multiline
    # joining and per-stream state never mix two writers' lines.
    stream: str = ""
    received_at: int = field(default_factory=now_micros)
    # Source-level fields every frame of the batch carries (e.g. the SysV message type).
    attributes: dict[str, str] | None = None
    # Opaque per-frame tokens handed back to Source.delivered() once Kafka acked the entry
    # (file offsets for checkpoints). None when the source needs no acknowledgement.
    ack_tokens: Sequence[Any] | None = None


Emit = Callable[[Frames], None]
# Hands ack tokens of entries that will never reach Kafka (filtered, dropped by a policy) back to
# their source by name: such an entry is settled, so a checkpoint must not wait for it.
Settle = Callable[[str, Sequence[Any]], None]


class Joined(tuple):
    """The ack tokens of the lines a multiline join merged into one entry; settled together."""


def flatten_tokens(tokens: Sequence[Any]) -> list[Any]:
    return [t for tok in tokens for t in (tok if isinstance(tok, Joined) else (tok,))]


class Source(ABC):
    """Base of every source module. Subclasses implement `run` and, if reads block, `wake`."""

    kind: ClassVar[str]
    # True for sources that end on their own (stdin at EOF); the agent exits when all
    # finite sources are done and there is no other source.
    finite: ClassVar[bool] = False

    def __init__(self, name: str, address: str, options: dict[str, Any] | None = None) -> None:
        self.name = name
        self.address = address
        self.options = options or {}
        self.stopping = threading.Event()
        self._entries = SOURCE_ENTRIES.labels(source=name, kind=self.kind)
        self._bytes = SOURCE_BYTES.labels(source=name, kind=self.kind)

    def open(self) -> None:  # noqa: B027 - optional hook
        """Create/bind the channel. Errors here (missing dir, bad queue) abort agent start-up."""

    @abstractmethod
    def run(self, emit: Emit) -> None:
        """Read until `self.stopping` is set (or the channel ends, for finite sources)."""

    def stop(self) -> None:
        self.stopping.set()
        self.wake()

    def wake(self) -> None:  # noqa: B027 - optional hook
        """Unblock a read that is waiting for data so `run` sees `stopping`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the channel (close sockets, unlink what we created)."""

    def delivered(self, tokens: Sequence[Any]) -> None:  # noqa: B027 - optional hook
        """Kafka acknowledged the entries carrying these ack tokens (in order per stream)."""

    # ---- helpers for subclasses --------------------------------------------------------
    def count(self, frames: Sequence[bytes], nbytes: int | None = None) -> None:
        self._entries.inc(len(frames))
        self._bytes.inc(sum(map(len, frames)) if nbytes is None else nbytes)

    def error(self, reason: str) -> None:
        SOURCE_ERRORS.labels(source=self.name, kind=self.kind, reason=reason).inc()

    def emit_frames(self, emit: Emit, frames: Sequence[bytes], nbytes: int | None = None, **meta: Any) -> None:
        """`nbytes`: what a stream source read for these frames (newlines included); the frames' sizes
        by default. Stream sources pass it: it counts a read that completed no line, and costs no pass."""
        if frames:
            self.count(frames, nbytes)
            emit(Frames(frames, self.name, **meta))
        elif nbytes:
            self._bytes.inc(nbytes)
