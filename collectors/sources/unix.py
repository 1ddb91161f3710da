"""`unix:PATH` — a Unix stream socket; many clients at once, each its own stream.

Frames are newline-delimited by default; `framing = "octet"` also accepts RFC 6587
octet-counted frames (auto-detected per frame, as rsyslog does). One thread serves every
client through a selector, and each read is emitted as one batch. When `emit` blocks
(the buffer's `block` policy) no client is read: their kernel buffers fill and their
writes block, which is the backpressure the operator asked for.

A client that disconnects mid-frame: a partial line still becomes an entry; a partial
octet-counted frame is dropped and counted (`half_frame`), since its length says it is
incomplete. On stop, whatever clients already wrote into the socket is read and emitted
before the connections close.
"""

from __future__ import annotations

import logging
import selectors
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from logferry.collectors.framing import DEFAULT_MAX_FRAME, LineFramer, OctetFramer
from logferry.collectors.sources.base import Emit, Source
from logferry.collectors.sources.ipcutil import TruncationCounter, Waker
from logferry.collectors.sources.sockpath import SocketFileOptions, bind_unix, inode, unlink_own
from logferry.config import validate
from logferry.errors import ConfigError

log = logging.getLogger("logferry.sources.unix")
READ_SIZE = 1 << 18


class UnixStreamOptions(SocketFileOptions):
    framing: Literal["newline", "octet"] = "newline"
    max_frame_bytes: int = Field(DEFAULT_MAX_FRAME, ge=1)
    max_clients: int = Field(1024, ge=1)
    backlog: int = Field(128, ge=1)


@dataclass(slots=True)
class _Client:
    sock: socket.socket
    stream: str
    framer: LineFramer | OctetFramer
    truncations: TruncationCounter


class UnixStreamSource(Source):
    kind = "unix"

    def __init__(self, name: str, address: str, options: dict | None = None) -> None:
        super().__init__(name, address, options)
        self.opts = validate(UnixStreamOptions, self.options, f"source {name!r} (unix) options")
        self.path = Path(address)
        self._listener: socket.socket | None = None
        self._ino: int | None = None
        self._waker = Waker()
        self._clients: dict[int, _Client] = {}
        self._next_client = 0
        self._listening = False

    def open(self) -> None:
        if not self.address:
            raise ConfigError(f"source {self.name!r}: unix needs a socket path, e.g. unix:/run/app.sock")
        self._listener = bind_unix(
            self.path, socket.SOCK_STREAM, self.opts, f"source {self.name!r}", backlog=self.opts.backlog
        )
        self._ino = inode(self.path)
        self._listener.setblocking(False)

    def run(self, emit: Emit) -> None:
        assert self._listener is not None, "open() first"
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        self._listening = True
        sel.register(self._waker.fd, selectors.EVENT_READ, "wake")
        # run() again after a crash: the clients connected before it are still ours (and their fds
        # open); serve them again rather than leave them hanging.
        for client in self._clients.values():
            sel.register(client.sock, selectors.EVENT_READ, client)
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select():
                    if key.data is None:
                        self._accept(sel)
                    elif key.data == "wake":
                        self._waker.drain()
                    else:
                        self._read(sel, key.data, emit)
            if self._listening:  # connections still in the kernel's backlog wrote to us too
                self._accept(sel)
            for client in list(self._clients.values()):  # what clients already sent is ours to deliver
                while self._read(sel, client, emit, final=True):
                    pass
                self._disconnect(sel, client, emit)
        finally:
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        assert self._listener is not None
        # At most `backlog` per round, then serve reads: clients that already left are let go
        # before more come in, so a storm of short connections never fills max_clients.
        for _ in range(self.opts.backlog):
            if len(self._clients) >= self.opts.max_clients:
                # Full: further clients wait in the kernel's backlog (their connect blocks) until
                # one leaves; accepting and closing them would lose what they wrote.
                self.error("too_many_clients")
                sel.unregister(self._listener)
                self._listening = False
                return
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE and friends: count, keep serving the clients we have
                self.error("accept_failed")
                log.warning("source %s: accept failed: %s", self.name, e)
                return
            conn.setblocking(False)
            self._next_client += 1
            framer = (
                OctetFramer(self.opts.max_frame_bytes)
                if self.opts.framing == "octet"
                else LineFramer(self.opts.max_frame_bytes)
            )
            client = _Client(conn, f"client-{self._next_client}", framer, TruncationCounter(self, framer))
            self._clients[conn.fileno()] = client
            sel.register(conn, selectors.EVENT_READ, client)

    def _read(self, sel: selectors.BaseSelector, client: _Client, emit: Emit, final: bool = False) -> bool:
        """One read from a client; False when nothing more is available right now."""
        try:
            data = client.sock.recv(READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:  # ECONNRESET: the client vanished; what we framed so far is kept
            self.error("connection_reset")
            data = b""
        if not data:
            if not final:
                self._disconnect(sel, client, emit)
            return False
        frames = client.framer.feed(data)
        client.truncations.check()
        self.emit_frames(emit, frames, len(data), stream=client.stream)
        return True

    def _disconnect(self, sel: selectors.BaseSelector, client: _Client, emit: Emit) -> None:
        framer = client.framer
        if isinstance(framer, OctetFramer) and framer.has_half_frame:
            self.error("half_frame")
        self.emit_frames(emit, framer.flush(), stream=client.stream)
        client.truncations.check()
        self._clients.pop(client.sock.fileno(), None)
        sel.unregister(client.sock)
        client.sock.close()
        if not self._listening and self._listener is not None:  # room again: take waiting clients
            sel.register(self._listener, selectors.EVENT_READ, None)
            self._listening = True

    def wake(self) -> None:
        self._waker.wake()

    def close(self) -> None:
        for client in self._clients.values():
            client.sock.close()
        self._clients.clear()
        if self._listener is not None:
            unlink_own(self.path, self._ino)
            self._listener.close()
            self._listener = None
        self._waker.close()
