"""`unixgram:PATH` — a Unix datagram socket, /dev/log style: one datagram is one entry.

`logger -u PATH` and syslog(3)-style writers work unchanged (pick `parser = "syslog"` to
split their PRI/timestamp/tag). Every datagram already queued is read before emitting,
so a burst becomes one batch. A datagram larger than `max_datagram_bytes` arrives cut
by the kernel: it is kept (truncated) and counted as `datagram_truncated`.
"""

from __future__ import annotations

import selectors
import socket
from pathlib import Path

from pydantic import Field

from logferry.collectors.sources.base import Emit, Source
from logferry.collectors.sources.ipcutil import FileMode, Waker, one_message
from logferry.collectors.sources.sockpath import SocketFileOptions, bind_unix, inode, unlink_own
from logferry.config import validate
from logferry.errors import ConfigError

BATCH = 1024  # datagrams per emitted batch at most, so a flood still lets `stop` through


class UnixDatagramOptions(SocketFileOptions):
    mode: FileMode = 0o660  # secure default (issue 9); 0o666 for a /dev/log any local process may use
    max_datagram_bytes: int = Field(256 * 1024, ge=1024)
    receive_buffer_bytes: int | None = Field(4 << 20, ge=4096)  # SO_RCVBUF; None keeps the kernel default


class UnixDatagramSource(Source):
    kind = "unixgram"

    def __init__(self, name: str, address: str, options: dict | None = None) -> None:
        super().__init__(name, address, options)
        self.opts = validate(UnixDatagramOptions, self.options, f"source {name!r} (unixgram) options")
        self.path = Path(address)
        self._sock: socket.socket | None = None
        self._ino: int | None = None
        self._waker = Waker()

    def open(self) -> None:
        if not self.address:
            raise ConfigError(f"source {self.name!r}: unixgram needs a socket path, e.g. unixgram:/run/app.sock")
        self._sock = bind_unix(self.path, socket.SOCK_DGRAM, self.opts, f"source {self.name!r}")
        self._ino = inode(self.path)
        if self.opts.receive_buffer_bytes:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.opts.receive_buffer_bytes)
        self._sock.setblocking(False)

    def run(self, emit: Emit) -> None:
        sock = self._sock
        assert sock is not None, "open() first"
        buf = bytearray(self.opts.max_datagram_bytes)
        view = memoryview(buf)
        limit = len(buf)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        sel.register(self._waker.fd, selectors.EVENT_READ)
        try:
            while True:
                frames: list[bytes] = []
                truncated = 0
                while len(frames) < BATCH:
                    try:
                        # MSG_TRUNC makes the kernel report the datagram's real length.
                        n = sock.recv_into(buf, 0, socket.MSG_TRUNC)
                    except BlockingIOError:
                        break
                    if n > limit:
                        truncated += 1
                        n = limit
                    frame = one_message(bytes(view[:n]))
                    if frame:
                        frames.append(frame)
                for _ in range(truncated):
                    self.error("datagram_truncated")
                self.emit_frames(emit, frames)
                if len(frames) == BATCH and not self.stopping.is_set():
                    continue
                if self.stopping.is_set():
                    return  # queued datagrams were read just above
                sel.select()
                self._waker.drain()
        finally:
            sel.close()

    def wake(self) -> None:
        self._waker.wake()

    def close(self) -> None:
        if self._sock is not None:
            unlink_own(self.path, self._ino)
            self._sock.close()
            self._sock = None
        self._waker.close()
