"""`syslog:udp://HOST:PORT` and `syslog:tcp://HOST:PORT` — syslog over the network.

UDP: one datagram = one entry (RFC 3164/5424 senders, `logger -d`). TCP: RFC 6587, octet
counting or newline framing detected per frame, many concurrent clients served by one
selector loop. HOST defaults to 127.0.0.1: listening beyond the host is a decision.
This module only delivers frames; the `syslog` parser reads PRI, header and fields.

A TCP client that disconnects in the middle of an octet-counted frame loses that half
frame: it is counted (`half_frame`) and the other clients are unaffected. A final line
without a newline is still an entry.
"""

from __future__ import annotations

import errno
import logging
import select
import selectors
import socket
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field

from logferry.collectors.framing import DEFAULT_MAX_FRAME, OctetFramer
from logferry.collectors.sources.base import Emit, Source
from logferry.collectors.sources.ipcutil import TruncationCounter, Waker, one_message
from logferry.config import StrictModel, validate
from logferry.errors import ConfigError
from logferry.log import LogOnce

log = logging.getLogger("logferry.sources.syslog")
log_once = LogOnce(log)

READ_SIZE = 1 << 16
MAX_DATAGRAM = 65535

ACCEPTS_PER_ROUND = 128


class SyslogOptions(StrictModel):
    max_message_bytes: int = Field(DEFAULT_MAX_FRAME, ge=64)  # longer messages are cut and counted
    max_connections: int = Field(1024, ge=1)  # TCP: further clients are refused and counted
    receive_buffer_bytes: int | None = Field(None, ge=4096)  # SO_RCVBUF; UDP loses datagrams when it overflows
    batch: int = Field(1000, ge=1)  # UDP datagrams handed on together


def parse_address(address: str) -> tuple[Literal["udp", "tcp"], str, int]:
    """`udp://127.0.0.1:5514`, `tcp://[::1]:6514`, `tcp://:5514` (host defaults to 127.0.0.1)."""
    hint = "expected udp://HOST:PORT or tcp://HOST:PORT, e.g. syslog:udp://127.0.0.1:5514"
    try:
        url = urlsplit(address)
        port = url.port
    except ValueError as e:
        raise ConfigError(f"syslog address {address!r}: {e}; {hint}") from None
    if url.scheme not in ("udp", "tcp") or port is None or url.path not in ("", "/"):
        raise ConfigError(f"syslog address {address!r}: {hint}")
    return url.scheme, url.hostname or "127.0.0.1", port  # type: ignore[return-value]


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    stream: str
    framer: OctetFramer
    truncations: TruncationCounter = field(init=False)


class SyslogSource(Source):
    kind = "syslog"
    default_parser = "syslog"  # the agent uses it unless the source's config names a parser

    def __init__(self, name: str, address: str, options: dict | None = None) -> None:
        super().__init__(name, address, options)
        self.opts = validate(SyslogOptions, self.options, f"source {name!r} (syslog) options")
        try:
            self.protocol, self.host, self.port = parse_address(address)
        except ConfigError as e:
            raise ConfigError(f"source {name!r}: {e}") from None
        self.sock: socket.socket | None = None
        self._waker = Waker()
        self._clients: dict[socket.socket, _Client] = {}

    @property
    def bound_address(self) -> tuple[str, int]:
        """Where the socket listens (the real port when the config asked for port 0)."""
        assert self.sock is not None, "open() first"
        return self.sock.getsockname()[:2]

    def open(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        kind = socket.SOCK_DGRAM if self.protocol == "udp" else socket.SOCK_STREAM
        sock = socket.socket(family, kind)
        try:
            if self.protocol == "tcp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old conns linger
            if self.opts.receive_buffer_bytes:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.opts.receive_buffer_bytes)
            sock.bind((self.host, self.port))
            if self.protocol == "tcp":
                sock.listen(128)
        except OSError as e:
            sock.close()
            raise ConfigError(
                f"source {self.name!r}: cannot listen on {self.protocol}://{self.host}:{self.port} ({e.strerror})"
            ) from None
        sock.setblocking(False)
        self.sock = sock

    def run(self, emit: Emit) -> None:
        assert self.sock is not None, "open() first"
        if self.protocol == "udp":
            self._run_udp(emit)
        else:
            self._run_tcp(emit)

    # ---- UDP ------------------------------------------------------------------------------
    def _run_udp(self, emit: Emit) -> None:
        sock = self.sock
        assert sock is not None
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(self._waker.fd, select.POLLIN)
        limit = self.opts.max_message_bytes
        while not self.stopping.is_set():
            poller.poll()
            self._waker.drain()
            received: list[tuple[bytes, str]] = []
            while len(received) < self.opts.batch:
                try:
                    data, peer = sock.recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError as e:  # e.g. ECONNREFUSED from an earlier ICMP error; not fatal
                    self.error("receive_error")
                    log_once.warning("udp_receive", "source %r: udp receive failed: %s", self.name, e)
                    continue
                data = one_message(data)
                if not data:
                    self.error("empty_message")
                    continue
                if len(data) > limit:
                    data = data[:limit]
                    self.error("frame_truncated")
                received.append((data, f"{peer[0]}:{peer[1]}"))
            self._emit_by_peer(emit, received)

    def _emit_by_peer(self, emit: Emit, received: list[tuple[bytes, str]]) -> None:
        """One Frames per run of datagrams from the same sender (its stream for multiline state)."""
        start = 0
        for i in range(1, len(received) + 1):
            if i == len(received) or received[i][1] != received[start][1]:
                self.emit_frames(emit, [d for d, _ in received[start:i]], stream=received[start][1])
                start = i

    # ---- TCP ------------------------------------------------------------------------------
    def _run_tcp(self, emit: Emit) -> None:
        listener = self.sock
        assert listener is not None
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, "accept")
        sel.register(self._waker.fd, selectors.EVENT_READ, "wake")
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select():
                    if key.data == "accept":
                        self._accept(listener, sel)
                    elif key.data == "wake":
                        self._waker.drain()
                    else:
                        self._read(key.data, sel, emit)
        finally:
            for client in list(self._clients.values()):
                # What a client already sent is accepted data; one that keeps sending is cut off.
                for _ in range(64):
                    if not self._read(client, sel, emit):
                        break
                if client.sock in self._clients:
                    self._finish(client, sel, emit)
            sel.close()

    def _accept(self, listener: socket.socket, sel: selectors.BaseSelector) -> None:
        # A bounded number per round, then serve reads: clients that already hung up are let go
        # first, so a storm of short connections is not mistaken for max_connections open ones.
        for _ in range(ACCEPTS_PER_ROUND):
            try:
                conn, peer = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # EMFILE and friends: count, keep serving the clients we have
                self.error("accept_failed")
                log_once.warning("accept", "source %r: accept failed: %s", self.name, e)
                return
            if len(self._clients) >= self.opts.max_connections:
                conn.close()
                self.error("too_many_connections")
                log_once.warning("max_conn", "source %r: refused a client beyond max_connections", self.name)
                continue
            conn.setblocking(False)
            client = _Client(conn, f"{peer[0]}:{peer[1]}", OctetFramer(self.opts.max_message_bytes))
            client.truncations = TruncationCounter(self, client.framer)
            self._clients[conn] = client
            sel.register(conn, selectors.EVENT_READ, client)

    def _read(self, client: _Client, sel: selectors.BaseSelector, emit: Emit) -> bool:
        """One read from a client; False when it had nothing more (and, at its end, is finished)."""
        try:
            data = client.sock.recv(READ_SIZE)
        except BlockingIOError:
            return False
        except OSError as e:
            self.error("connection_reset" if e.errno == errno.ECONNRESET else "receive_error")
            data = b""
        if not data:
            self._finish(client, sel, emit)
            return False
        self.emit_frames(emit, client.framer.feed(data), stream=client.stream)
        client.truncations.check()
        return True

    def _finish(self, client: _Client, sel: selectors.BaseSelector, emit: Emit) -> None:
        """The client is gone (or we stop): its last line is an entry, a half octet frame is counted."""
        if client.framer.has_half_frame:
            self.error("half_frame")
            log_once.warning("half_frame", "source %r: a client left in the middle of a frame", self.name)
        self.emit_frames(emit, client.framer.flush(), stream=client.stream)
        client.truncations.check()
        sel.unregister(client.sock)
        client.sock.close()
        del self._clients[client.sock]

    def wake(self) -> None:
        self._waker.wake()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._waker.close()
