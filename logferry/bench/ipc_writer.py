"""The writer process of `logferry bench ipc`: the same for the bare reader and the logferry source.

`python -m logferry.bench.ipc_writer KIND ADDRESS SIZE N` opens the channel, says `ready`
on stderr, waits for one byte on stdin (go), then writes N entries of SIZE bytes. Kept
apart from the suite so that it starts fast (no typer, rich or Kafka imports).
"""

from __future__ import annotations

import os
import random
import socket
import sys
from collections.abc import Callable
from typing import Any

STREAM_KINDS = {"stdin", "fifo", "unix", "file"}
READ_SIZE = 1 << 16


def entry(size: int) -> bytes:
    body = b"2026-11-21T06:00:00Z INFO bench " + bytes(random.Random(size).choices(b"abcdefghij ", k=size))
    return body[: size - 1] + b"\n"


def write(kind: str, address: str, size: int, n: int) -> None:
    line = entry(size)
    send = _sender(kind, address, line)
    sys.stderr.write("ready\n")
    sys.stderr.flush()
    sys.stdin.buffer.read(1)  # go
    send(n)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _sender(kind: str, address: str, line: bytes) -> Callable[[int], None]:
    if kind in STREAM_KINDS:
        per_chunk = max(1, READ_SIZE // len(line))
        chunk = line * per_chunk
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(address)
            put: Callable[[bytes], None] = sock.sendall
        else:
            flags = {"stdin": None, "fifo": os.O_WRONLY, "file": os.O_WRONLY | os.O_APPEND}[kind]
            fd = 1 if flags is None else os.open(address, flags)
            put = lambda data: _write_all(fd, data)  # noqa: E731

        def stream(n: int) -> None:
            while n > 0:
                k = min(n, per_chunk)
                put(chunk if k == per_chunk else line * k)
                n -= k

        return stream
    if kind == "unixgram":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.connect(address)
        one: Callable[[bytes], Any] = sock.send  # blocks while the receiver's queue is full
    elif kind == "posix_mq":
        import posix_ipc

        one = posix_ipc.MessageQueue(address).send
    elif kind == "sysv_mq":
        import sysv_ipc

        queue = sysv_ipc.MessageQueue(int(address))
        one = queue.send
    else:
        from logferry.collectors.shm_ring import ShmWriter

        writer = ShmWriter(address, on_full="wait", timeout=60)
        one = writer.write

    def messages(n: int) -> None:
        for _ in range(n):
            one(line)

    return messages


if __name__ == "__main__":
    write(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
