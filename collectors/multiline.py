"""Multiline joining per stream: continuation lines (stack traces) join the line that started them.

A line matching `start_pattern` starts a new entry; any other line is appended to the
pending one. A pending entry is released when the next start line arrives, when it
reaches `max_lines`, or when its stream has been quiet for `timeout` seconds (the agent
calls `expired()` periodically). Each stream (client connection, file) has its own
pending entry, so two writers' traces never interleave.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from logferry.collectors.config import MultilineSettings
from logferry.collectors.sources.base import Frames, Joined


@dataclass(slots=True)
class _Pending:
    lines: list[bytes] = field(default_factory=list)
    tokens: list[Any] = field(default_factory=list)
    received_at: int = 0
    attributes: dict[str, str] | None = None
    touched: float = 0.0

    def joined_token(self) -> Any:
        """One line: its own token; several: all of them, so the checkpoint sees every line settle."""
        return self.tokens[0] if len(self.tokens) == 1 else Joined(self.tokens)


class Joiner:
    def __init__(self, settings: MultilineSettings) -> None:
        assert settings.start_pattern is not None
        self.start = re.compile(settings.start_pattern.encode())
        self.max_lines = settings.max_lines
        self.timeout = settings.timeout
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._lock = threading.Lock()

    def feed(self, batch: Frames) -> Frames:
        """The complete entries of `batch` (continuations joined); the last one may stay pending."""
        out: list[bytes] = []
        tokens: list[Any] | None = [] if batch.ack_tokens is not None else None
        key = (batch.source, batch.stream)
        match = self.start.match
        with self._lock:
            p = self._pending.get(key)
            for i, line in enumerate(batch.frames):
                if p is not None and (match(line) is not None or len(p.lines) >= self.max_lines):
                    out.append(b"\n".join(p.lines))
                    if tokens is not None:
                        tokens.append(p.joined_token())
                    p = None
                if p is None:
                    p = _Pending(received_at=batch.received_at, attributes=batch.attributes)
                p.lines.append(line)
                if batch.ack_tokens is not None:
                    p.tokens.append(batch.ack_tokens[i])
            if p is not None:
                p.touched = time.monotonic()
                self._pending[key] = p
        return Frames(out, batch.source, batch.stream, batch.received_at, batch.attributes, tokens)

    def expired(self, now: float | None = None) -> list[Frames]:
        """Pending entries whose stream has been quiet for `timeout` (all of them when now=inf)."""
        now = time.monotonic() if now is None else now
        out: list[Frames] = []
        with self._lock:
            for key, p in list(self._pending.items()):
                if now - p.touched >= self.timeout:
                    del self._pending[key]
                    tokens = [p.joined_token()] if p.tokens else None
                    out.append(Frames([b"\n".join(p.lines)], key[0], key[1], p.received_at, p.attributes, tokens))
        return out

    def flush(self) -> list[Frames]:
        return self.expired(float("inf"))

    @property
    def pending(self) -> int:
        return len(self._pending)
