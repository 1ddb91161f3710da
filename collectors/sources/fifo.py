"""`fifo:PATH` — a named pipe that applications write newline-delimited entries into.

The source holds a write descriptor on its own FIFO, so the pipe never reports EOF when
the last writer closes: writers come and go and the reader just waits in poll(), with
no reopen and no EOF busy-loop. The FIFO is one byte stream shared by all writers: a
write of at most PIPE_BUF (4096) bytes is atomic, so writers that send whole lines
never interleave; a writer that dies mid-line leaves its half line joined to the next
writer's data (inherent to FIFOs; use `unix` sockets when writers need separate streams).

The FIFO is left in place on close so writers can find it again after an agent restart.

The pipe's kernel buffer is raised to `pipe_size` (1 MiB; Linux's 64 KiB default makes writer
and reader take turns every 64 KiB) and each read asks for about `LINES_PER_READ` lines, judged
by the line length seen so far: long lines get reads up to 1 MiB, so the per-read cost is spread
over many lines; short lines keep 64 KiB reads, whose lines stay in the CPU cache until emitted.
"""

from __future__ import annotations

import fcntl
import grp
import logging
import os
import select
import stat
from pathlib import Path

from pydantic import Field

from logferry.collectors.framing import DEFAULT_MAX_FRAME, LineFramer
from logferry.collectors.sources.base import Emit, Source
from logferry.collectors.sources.ipcutil import FileMode, TruncationCounter, Waker
from logferry.config import StrictModel, validate
from logferry.errors import ConfigError

log = logging.getLogger("logferry.sources.fifo")

MIN_READ, MAX_READ = 1 << 16, 1 << 20  # bytes per read
LINES_PER_READ = 1024
ROUND_BYTES = 1 << 20  # emitted at once, then poll again, so a constant stream still lets `stop` through


class FifoOptions(StrictModel):
    mode: FileMode = 0o660  # applied when the source creates the FIFO
    group: str | None = None  # group owner of a FIFO the source creates
    max_line_bytes: int = Field(DEFAULT_MAX_FRAME, ge=1)
    # Kernel buffer of the pipe (F_SETPIPE_SZ; capped by /proc/sys/fs/pipe-max-size); 0: leave it.
    pipe_size: int = Field(1 << 20, ge=0, le=1 << 30)


class FifoSource(Source):
    kind = "fifo"

    def __init__(self, name: str, address: str, options: dict | None = None) -> None:
        super().__init__(name, address, options)
        self.opts = validate(FifoOptions, self.options, f"source {name!r} (fifo) options")
        self.path = Path(address)
        self._rfd = -1
        self._wfd = -1
        self._waker = Waker()
        self._read_size = MIN_READ

    def open(self) -> None:
        if not self.address:
            raise ConfigError(f"source {self.name!r}: fifo needs a path, e.g. fifo:/run/app.fifo")
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._create()
        except OSError as e:
            raise ConfigError(f"source {self.name!r}: cannot use fifo {self.path}: {e.strerror}") from None
        else:
            if not stat.S_ISFIFO(st.st_mode):
                raise ConfigError(f"source {self.name!r}: {self.path} exists and is not a FIFO")
        try:
            # Read end first (non-blocking open succeeds without a writer), then our own write end.
            self._rfd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            self._wfd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            if self.opts.pipe_size:
                self._resize_pipe(self.opts.pipe_size)
        except OSError as e:
            self.close()
            raise ConfigError(f"source {self.name!r}: cannot open fifo {self.path}: {e.strerror}") from None

    def _resize_pipe(self, size: int) -> None:
        try:
            fcntl.fcntl(self._rfd, fcntl.F_SETPIPE_SZ, size)
        except OSError as e:  # over pipe-max-size or the user's pipe quota: the pipe works as it is
            log.warning("fifo %s: cannot raise the pipe buffer to %d bytes (%s); keeping %d", self.path, size,
                        e.strerror, fcntl.fcntl(self._rfd, fcntl.F_GETPIPE_SZ))  # fmt: skip

    def _create(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            raise ConfigError(f"source {self.name!r}: directory {parent} does not exist (for fifo {self.path})")
        try:
            os.mkfifo(self.path, 0o600)  # private until mode and group are set
            if self.opts.group is not None:
                os.chown(self.path, -1, grp.getgrnam(self.opts.group).gr_gid)
            os.chmod(self.path, self.opts.mode)
        except KeyError:
            raise ConfigError(f"source {self.name!r}: unknown group {self.opts.group!r}") from None
        except OSError as e:
            raise ConfigError(f"source {self.name!r}: cannot create fifo {self.path}: {e.strerror}") from None
        log.info("created fifo %s (mode %o)", self.path, self.opts.mode)

    def run(self, emit: Emit) -> None:
        framer = LineFramer(self.opts.max_line_bytes)
        truncations = TruncationCounter(self, framer)
        poller = select.poll()
        poller.register(self._rfd, select.POLLIN)
        poller.register(self._waker.fd, select.POLLIN)
        while not self.stopping.is_set():
            poller.poll()
            self._waker.drain()
            self._read_available(framer, emit)
            truncations.check()
        # Whatever writers already put in the pipe is accepted data: take it, then the last partial line.
        while self._read_available(framer, emit):
            pass
        self.emit_frames(emit, framer.flush())
        truncations.check()

    def _read_available(self, framer: LineFramer, emit: Emit) -> bool:
        """Read what the pipe holds (bounded per call); True if the pipe may hold more."""
        frames: list[bytes] = []
        nbytes = 0
        more = True
        while nbytes < ROUND_BYTES:
            try:
                data = os.read(self._rfd, self._read_size)
            except BlockingIOError:
                more = False
                break
            if not data:  # cannot happen while we hold the write end; do not spin if it does
                more = False
                break
            nbytes += len(data)
            got = framer.feed(data)
            if got:  # about LINES_PER_READ lines next time, by this read's line length
                self._read_size = min(MAX_READ, max(MIN_READ, len(data) // len(got) * LINES_PER_READ))
            frames += got
        self.emit_frames(emit, frames, nbytes)
        return more

    def wake(self) -> None:
        self._waker.wake()

    def close(self) -> None:
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1
        self._waker.close()
