"""`stdin` — `app | logferry collect --source stdin ...`: newline-delimited entries until EOF.

A finite source: at EOF the last partial line becomes an entry and `run` returns; the
agent then drains the buffer into Kafka and exits 0 once everything read is delivered.
"""

from __future__ import annotations

import os
import selectors
import sys

from pydantic import Field

from logferry.collectors.framing import DEFAULT_MAX_FRAME, LineFramer
from logferry.collectors.sources.base import Emit, Source
from logferry.collectors.sources.ipcutil import TruncationCounter, Waker
from logferry.config import StrictModel, validate

READ_SIZE = 1 << 18


class StdinOptions(StrictModel):
    max_line_bytes: int = Field(DEFAULT_MAX_FRAME, ge=1)


class StdinSource(Source):
    kind = "stdin"
    finite = True

    def __init__(self, name: str, address: str = "", options: dict | None = None) -> None:
        super().__init__(name, address, options)
        self.opts = validate(StdinOptions, self.options, f"source {name!r} (stdin) options")
        self.fd = sys.stdin.fileno() if sys.stdin is not None else 0
        self._waker = Waker()

    def run(self, emit: Emit) -> None:
        framer = LineFramer(self.opts.max_line_bytes)
        truncations = TruncationCounter(self, framer)
        sel = selectors.DefaultSelector()
        try:
            sel.register(self.fd, selectors.EVENT_READ)
        except PermissionError:  # a regular file on stdin: always readable, select() refuses it
            sel = None
        else:
            sel.register(self._waker.fd, selectors.EVENT_READ)
        try:
            while not self.stopping.is_set():
                if sel is not None:
                    sel.select()
                    if self.stopping.is_set():
                        break
                try:
                    data = os.read(self.fd, READ_SIZE)
                except BlockingIOError:
                    continue
                if not data:
                    break
                self.emit_frames(emit, framer.feed(data), len(data))
                truncations.check()
            self.emit_frames(emit, framer.flush())
            truncations.check()
        finally:
            if sel is not None:
                sel.close()

    def wake(self) -> None:
        self._waker.wake()

    def close(self) -> None:
        self._waker.close()
