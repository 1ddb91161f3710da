"""`logferry bench ipc`: every source kind beside a minimal reader of the same bare OS channel.

For each kind and entry size, one writer process (`python -m logferry.bench.ipc write ...`,
identical for both sides) pushes N entries into the channel; in this process either the
minimal reader (read + count, nothing else) or logferry's Source, with an emit that only
counts, drains it. The clock starts when the writer is told to go (it has already opened
the channel) and stops when the reader has seen the N-th entry; CPU is the reading
thread's own. Target: each source ≥ 0.5x its bare channel.

Stream kinds (stdin pipe, FIFO, unix stream, file) carry newline-terminated lines; message
kinds (unix datagram, POSIX mq, SysV mq, shared-memory ring) carry one entry per message.
The shm "bare" reader is the ring's own `ShmRing.read`: the ring is the channel.
The file source polls every 10 ms here (`poll_interval`), as the bare file reader does.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from logferry.bench.common import (
    DEFAULT_OUT,
    FullOpt,
    OutOpt,
    RepeatOpt,
    Report,
    Run,
    Sample,
    alternate,
    finish,
    machine_info,
    out,
    ratio,
    repetitions,
)
from logferry.bench.ipc_writer import READ_SIZE

KINDS = ("stdin", "fifo", "unix", "unixgram", "file", "posix_mq", "sysv_mq", "shm")
FILE_POLL = 0.01
SHM_SLOT = 2048  # room for a 1 KiB entry plus the slot header


# ---- one channel, set up for one measurement ---------------------------------------------------
@dataclass
class Channel:
    kind: str
    address: str
    size: int
    tmp: Path

    @classmethod
    @contextlib.contextmanager
    def make(cls, kind: str, size: int) -> Iterator[Channel]:
        with tempfile.TemporaryDirectory(prefix="lf-bench-ipc-") as tmp:
            tag = uuid.uuid4().hex[:8]
            address = {
                "stdin": "",
                "fifo": f"{tmp}/ch.fifo",
                "unix": f"{tmp}/ch.sock",
                "unixgram": f"{tmp}/ch.dgram",
                "file": f"{tmp}/ch.log",
                "posix_mq": f"/lf-bench-{tag}",
                "sysv_mq": str(random.randint(0x10000000, 0x7FFFFFFF)),
                "shm": f"lf-bench-{tag}",
            }[kind]
            if kind == "fifo":
                os.mkfifo(address)
            elif kind == "file":
                Path(address).touch()
            try:
                yield cls(kind, address, size, Path(tmp))
            finally:
                _remove(kind, address)

    def source_options(self) -> dict[str, Any]:
        return {
            "file": {"start_at": "beginning", "poll_interval": FILE_POLL, "state_dir": str(self.tmp / "state")},
            "shm": {"slots": 4096, "slot_size": SHM_SLOT},
        }.get(self.kind, {})

    def writer(self, n: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "logferry.bench.ipc_writer", self.kind, self.address, str(self.size), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if self.kind == "stdin" else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        line = proc.stderr.readline()
        if line.strip() != b"ready":
            proc.kill()
            raise RuntimeError(f"ipc writer ({self.kind}) failed: {(line + proc.stderr.read()).decode()[-2000:]}")
        return proc


def _remove(kind: str, address: str) -> None:
    with contextlib.suppress(Exception):
        if kind == "posix_mq":
            import posix_ipc

            posix_ipc.unlink_message_queue(address)
        elif kind == "sysv_mq":
            import sysv_ipc

            sysv_ipc.MessageQueue(int(address)).remove()
        elif kind == "shm":
            from logferry.collectors.shm_ring import ShmRing

            ShmRing.unlink(address)


def _go(proc: subprocess.Popen[bytes]) -> float:
    assert proc.stdin is not None
    t0 = time.perf_counter()
    proc.stdin.write(b"g")
    proc.stdin.flush()
    return t0


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin:
        proc.stdin.close()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError("ipc writer did not finish") from None
    if proc.returncode:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise RuntimeError(f"ipc writer exited {proc.returncode}: {err[-2000:]}")


# ---- the two readers ---------------------------------------------------------------------------
def run_logferry(ch: Channel, n: int) -> Sample:
    """logferry's Source for this kind, its emit only counting frames."""
    from logferry.collectors.sources import source_class

    proc = ch.writer(n) if ch.kind == "stdin" else None
    if proc is not None:  # the stdin source reads the writer's stdout as its stdin
        saved, sys.stdin = sys.stdin, proc.stdout  # type: ignore[assignment]
        try:
            src = source_class(ch.kind)(f"bench-{ch.kind}", ch.address, ch.source_options())
        finally:
            sys.stdin = saved
    else:
        src = source_class(ch.kind)(f"bench-{ch.kind}", ch.address, ch.source_options())
    src.open()
    seen = 0
    t_end = 0.0
    failure: list[BaseException] = []

    def emit(frames: Any) -> None:
        nonlocal seen, t_end
        seen += len(frames.frames)
        if seen >= n and not t_end:
            t_end = time.perf_counter()
            src.stop()

    cpu = [0.0]

    def drain() -> None:
        c0 = time.thread_time()
        try:
            src.run(emit)
        except BaseException as e:  # reported below, in the caller's thread
            failure.append(e)
        cpu[0] = time.thread_time() - c0

    try:
        proc = proc or ch.writer(n)
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        t0 = _go(proc)
        reader.join(120)
        if reader.is_alive():
            src.stop()
            reader.join(10)
            raise RuntimeError(f"logferry {ch.kind} source saw {seen} of {n} entries in 120 s")
        if failure:
            raise failure[0]
        if seen < n:
            raise RuntimeError(f"logferry {ch.kind} source ended after {seen} of {n} entries")
        _reap(proc)
    finally:
        src.close()
    return Sample(n, t_end - t0, cpu_seconds=cpu[0])


def run_bare(ch: Channel, n: int) -> Sample:
    """The least a reader of this channel can do: receive and count."""
    closers: list[Callable[[], Any]] = []
    opened = _bare_open(ch, closers)
    try:
        proc = ch.writer(n)
        receive = opened(proc)
        c0 = time.thread_time()
        t0 = _go(proc)
        receive(n)
        t1 = time.perf_counter()
        cpu = time.thread_time() - c0
        _reap(proc)
    finally:
        for close in closers:
            close()
    return Sample(n, t1 - t0, cpu_seconds=cpu)


Receive = Callable[[int], None]


def _count_stream(read: Callable[[], bytes], idle: Callable[[], None] | None = None) -> Receive:
    def receive(n: int) -> None:
        seen = 0
        while seen < n:
            data = read()
            if data:
                seen += data.count(b"\n")
            elif idle is not None:
                idle()
            else:
                raise RuntimeError(f"channel closed after {seen} of {n} entries")

    return receive


def _bare_open(ch: Channel, closers: list[Callable[[], Any]]) -> Callable[[subprocess.Popen[bytes]], Receive]:
    """Open the channel's reading end before the writer starts; return how to drain it once it runs.

    What it opens is closed by the callables it appends to `closers`."""
    kind, address = ch.kind, ch.address
    if kind == "stdin":
        return lambda proc: _count_stream(lambda: os.read(proc.stdout.fileno(), READ_SIZE))  # type: ignore[union-attr]
    if kind == "fifo":
        fd = os.open(address, os.O_RDONLY | os.O_NONBLOCK)  # no writer yet: do not block in open
        closers.append(lambda: os.close(fd))

        def fifo(proc: subprocess.Popen[bytes]) -> Receive:
            os.set_blocking(fd, True)  # the writer holds its end now
            return _count_stream(lambda: os.read(fd, READ_SIZE))

        return fifo
    if kind == "file":
        fd = os.open(address, os.O_RDONLY)
        closers.append(lambda: os.close(fd))
        return lambda proc: _count_stream(lambda: os.read(fd, READ_SIZE), lambda: time.sleep(FILE_POLL))
    if kind == "unix":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(1)
        closers.append(listener.close)

        def unix(proc: subprocess.Popen[bytes]) -> Receive:
            conn, _ = listener.accept()
            closers.append(conn.close)
            return _count_stream(lambda: conn.recv(READ_SIZE))

        return unix
    if kind == "unixgram":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(address)
        closers.append(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # as the source does
        return lambda proc: _count_messages(lambda: sock.recv(1 << 18))
    if kind == "posix_mq":
        import posix_ipc

        q = posix_ipc.MessageQueue(address, posix_ipc.O_CREAT, read=True, write=False)
        closers.append(q.close)
        return lambda proc: _count_messages(q.receive)
    if kind == "sysv_mq":
        import sysv_ipc

        from logferry.collectors.sources.sysv_mq import kernel_msgmax

        sq = sysv_ipc.MessageQueue(int(address), sysv_ipc.IPC_CREAT, max_message_size=kernel_msgmax())
        return lambda proc: _count_messages(sq.receive)
    from logferry.collectors.shm_ring import ShmRing

    ring = ShmRing.create_or_attach(address, 4096, SHM_SLOT)
    closers.append(ring.close)

    def shm(n: int) -> None:
        seen = 0
        while seen < n:
            got = len(ring.read(4096)[0])
            seen += got
            if not got:
                time.sleep(50e-6)

    return lambda proc: shm


def _count_messages(receive_one: Callable[[], Any]) -> Receive:
    def receive(n: int) -> None:
        for _ in range(n):
            receive_one()

    return receive


# ---- the command -------------------------------------------------------------------------------
def measure(kinds: list[str], sizes: list[int], entries: int, repeat: int, full: bool = False) -> Report:
    report = Report(
        "ipc",
        "bare OS channel vs logferry source (counting emit)",
        {"kinds": kinds, "entry_bytes": sizes, "entries_per_run": entries, "repetitions": repeat, "full": full},
        machine_info(),
    )
    for kind in kinds:
        for size in sizes:
            group = f"{kind} {size} B"
            runs = {"bare": Run(f"bare {kind}", size, group), "logferry": Run(f"logferry {kind} source", size, group)}

            def once(reader: Callable[[Channel, int], Sample], kind: str = kind, size: int = size) -> Sample:
                with Channel.make(kind, size) as ch:
                    return reader(ch, entries)

            with out.status(f"ipc {group}…"):
                alternate({"bare": lambda: once(run_bare), "logferry": lambda: once(run_logferry)}, runs, repeat)
            report.runs += [runs["bare"], runs["logferry"]]
            report.ratios.append(ratio(f"{group}: logferry / bare", runs["logferry"], runs["bare"], 0.5))
    report.notes.append("CPU s / M entries is the reading thread's own CPU; the writer is a separate process.")
    return report


def ipc(
    kinds: Annotated[str, typer.Option(help="Comma-separated source kinds.")] = ",".join(KINDS),
    sizes: Annotated[str, typer.Option(help="Comma-separated entry sizes in bytes.")] = "100,1024",
    entries: Annotated[int | None, typer.Option(help="Entries per run (default 100000, --full 1000000).")] = None,
    repeat: RepeatOpt = None,
    full: FullOpt = False,
    out_dir: OutOpt = DEFAULT_OUT,
) -> None:
    """Every IPC source vs its bare channel: entries/s and MB/s at 100 B and 1 KiB (target ≥ 0.5x)."""
    chosen = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = sorted(set(chosen) - set(KINDS))
    if unknown:
        raise typer.BadParameter(f"unknown kind(s) {unknown}; known: {', '.join(KINDS)}", param_hint="--kinds")
    n = entries or (1_000_000 if full else 100_000)
    finish(measure(chosen, [int(s) for s in sizes.split(",")], n, repetitions(repeat, full), full), out_dir)
