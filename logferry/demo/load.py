"""The load generator: services writing numbered JSON lines into the agent's IPC sources at a set rate.

Service i writes through source i % len(SOURCES); every entry carries `seq`, the service's own
counter from 0, so the processors' records show per-key order and completeness. One thread per
source, paced by a shared target rate the demo changes (steady, burst, stop). A full queue or
socket blocks its writer: that is the agent's backpressure, and what was written is still counted.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import posix_ipc
import sysv_ipc

from logferry.demo.plan import SOURCES

MAX_BATCH_S = 0.25  # a writer that fell behind catches up at most this much time in one go
TICK_S = 0.005


class Channel:
    """One way into the agent; `send` blocks while the agent's side is full."""

    def send(self, lines: list[bytes]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class UnixChannel(Channel):
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def send(self, lines: list[bytes]) -> None:
        self.sock.sendall(b"".join(lines))

    def close(self) -> None:
        self.sock.close()


class FifoChannel(Channel):
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY)

    def send(self, lines: list[bytes]) -> None:
        data = memoryview(b"".join(lines))
        while data:
            data = data[os.write(self.fd, data) :]

    def close(self) -> None:
        os.close(self.fd)


class FileChannel(Channel):
    """Appends to the file the agent tails."""

    def __init__(self, path: str) -> None:
        self.f = Path(path).open("ab", buffering=0)  # noqa: SIM115 -- open for the writer's lifetime, closed in close()

    def send(self, lines: list[bytes]) -> None:
        self.f.write(b"".join(lines))

    def close(self) -> None:
        self.f.close()


class PosixMqChannel(Channel):
    def __init__(self, name: str, stop: threading.Event) -> None:
        self.queue = posix_ipc.MessageQueue(name, write=True, read=False)
        self.stop = stop

    def send(self, lines: list[bytes]) -> None:
        for line in lines:
            while True:
                try:
                    self.queue.send(line, timeout=0.2)
                    break
                except posix_ipc.BusyError:
                    if self.stop.is_set():
                        return

    def close(self) -> None:
        self.queue.close()


class SysvMqChannel(Channel):
    def __init__(self, key: int, stop: threading.Event) -> None:
        self.queue = sysv_ipc.MessageQueue(key)
        self.stop = stop

    def send(self, lines: list[bytes]) -> None:
        for line in lines:
            while True:
                try:
                    self.queue.send(line, block=False, type=1)
                    break
                except sysv_ipc.BusyError:  # the queue's byte limit: wait for the agent to read
                    if self.stop.is_set():
                        return
                    time.sleep(0.001)


def open_channel(kind: str, address: str, stop: threading.Event) -> Channel:
    if kind == "unix":
        return UnixChannel(address)
    if kind == "fifo":
        return FifoChannel(address)
    if kind == "file":
        return FileChannel(address)
    if kind == "posix_mq":
        return PosixMqChannel(address, stop)
    if kind == "sysv_mq":
        return SysvMqChannel(int(address, 0), stop)
    raise ValueError(f"no demo writer for source kind {kind!r}")


def service_name(i: int) -> str:
    return f"svc-{i:02d}"


def entry_line(service: str, seq: int, via: str) -> bytes:
    level = "warning" if seq % 50 == 49 else "info"
    return (json.dumps({"service": service, "level": level, "seq": seq, "via": via,
                        "message": f"{service} request {seq} done"}) + "\n").encode()  # fmt: skip


class LoadGenerator:
    """Writers for every source; `rate` (entries/s over all services) is read on each tick."""

    def __init__(self, addresses: dict[str, str], services: int) -> None:
        self.addresses = addresses
        self.services = services
        self.rate = 0.0
        self.stop_event = threading.Event()
        self.sent = [0] * services  # entries written per service; also each service's next seq
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []

    @property
    def written(self) -> int:
        return sum(self.sent)

    def start(self) -> None:
        for n, kind in enumerate(SOURCES):
            mine = list(range(n, self.services, len(SOURCES)))
            t = threading.Thread(target=self._run, args=(kind, mine), name=f"load-{kind}", daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, kind: str, services: list[int]) -> None:
        try:
            channel = open_channel(kind, self.addresses[kind], self.stop_event)
        except (OSError, posix_ipc.Error, sysv_ipc.Error) as e:
            self.errors.append(f"{kind}: cannot open {self.addresses[kind]}: {e}")
            return
        share = len(services) / self.services
        credit, last, turn = 0.0, time.monotonic(), 0
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                rate = self.rate * share
                credit = min(credit + rate * (now - last), max(1.0, rate * MAX_BATCH_S))
                last = now
                lines = []
                while credit >= 1:
                    i = services[turn % len(services)]
                    turn += 1
                    lines.append(entry_line(service_name(i), self.sent[i], kind))
                    self.sent[i] += 1
                    credit -= 1
                if lines:
                    channel.send(lines)
                self.stop_event.wait(TICK_S)
        except (OSError, posix_ipc.Error, sysv_ipc.Error) as e:
            self.errors.append(f"{kind}: write failed: {e}")
        finally:
            channel.close()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self._threads:
            t.join(5)
