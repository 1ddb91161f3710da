"""The fifo, posix_mq, sysv_mq, shm and syslog sources, driven directly (no agent, no Kafka).

Each source runs in a thread with an `emit` that collects Frames; tests wait for
conditions with deadlines and check exact counts, order and the counted outcomes.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import posix_ipc
import pytest
import sysv_ipc
from prometheus_client import REGISTRY

from logferry.collectors.shm_ring import RingError, ShmRing, ShmWriter
from logferry.collectors.sources.base import Frames, Source
from logferry.collectors.sources.fifo import FifoSource
from logferry.collectors.sources.posix_mq import PosixMqSource
from logferry.collectors.sources.shm import ShmSource
from logferry.collectors.sources.syslog import SyslogSource
from logferry.collectors.sources.sysv_mq import SysvMqSource
from logferry.errors import ConfigError

DEADLINE = 20.0


class Collected:
    """The `emit` of a test: keeps every batch and lets the test wait for a condition."""

    def __init__(self) -> None:
        self.batches: list[Frames] = []
        self._cond = threading.Condition()
        self.gate = threading.Event()  # cleared: emit blocks, like the buffer's `block` policy
        self.gate.set()
        self.thread: threading.Thread | None = None  # the source's thread, for tests that measure it

    def __call__(self, frames: Frames) -> None:
        self.gate.wait()
        with self._cond:
            self.batches.append(frames)
            self._cond.notify_all()

    @property
    def frames(self) -> list[bytes]:
        with self._cond:
            return [f for b in self.batches for f in b.frames]

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
        # Re-check at least every 10 ms: some conditions read metrics, which do not notify us.
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (ok := condition()) and time.monotonic() < deadline:
                self._cond.wait(0.01)
        assert ok, f"timed out after {timeout}s waiting for {what}; have {len(self.frames)} frames"

    def wait_for(self, n: int, timeout: float = DEADLINE) -> list[bytes]:
        self.wait_until(lambda: sum(len(b.frames) for b in self.batches) >= n, f"{n} frames", timeout)
        return self.frames


@contextmanager
def running(source: Source) -> Iterator[Collected]:
    """Open and run `source` in a thread; on exit stop it, require a prompt clean end, close it."""
    source.open()
    out = Collected()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            source.run(out)
        except BaseException as e:  # surfaced in the test, not lost in the thread
            failures.append(e)

    thread = threading.Thread(target=run, name=f"source-{source.name}", daemon=True)
    thread.start()
    out.thread = thread
    try:
        yield out
    finally:
        source.stop()
        thread.join(10)
        source.close()
        assert not thread.is_alive(), "source did not stop within 10 s of stop()"
        assert not failures, f"source raised: {failures[0]!r}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def errors(source: Source, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "logferry_source_errors_total", {"source": source.name, "kind": source.kind, "reason": reason}
    )
    return value or 0.0


def received(source: Source) -> float:
    labels = {"source": source.name, "kind": source.kind}
    return REGISTRY.get_sample_value("logferry_source_entries_received_total", labels) or 0.0


def lines(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix} line {i:05d}".encode() for i in range(n)]


def thread_cpu_seconds(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


# ---- fifo -------------------------------------------------------------------------------------
def test_fifo_is_created_and_reads_writers_coming_and_going_without_busy_looping(tmp_path: Path):
    path = tmp_path / "app.fifo"
    source = FifoSource(unique("fifo"), str(path))
    expected: list[bytes] = []
    with running(source) as out:
        assert stat.S_ISFIFO(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        for writer in range(5):  # one after the other; each closes, so the reader sees no writer in between
            batch = lines(f"writer{writer}", 200)
            with open(path, "wb") as f:
                f.write(b"\n".join(batch) + b"\n")
            expected += batch
            out.wait_for(len(expected))
        # Idle with no writer at all: an EOF busy-loop would burn a core here.
        thread = out.thread
        assert thread is not None
        before, started = thread_cpu_seconds(thread), time.monotonic()
        threading.Event().wait(0.5)  # a measured idle window, not a wait for an outcome
        idle_cpu = thread_cpu_seconds(thread) - before
        elapsed = time.monotonic() - started
        with open(path, "wb") as f:  # and a writer that comes back is still read
            f.write(b"after the idle\n")
        expected.append(b"after the idle")
        out.wait_for(len(expected))
    assert out.frames == expected
    assert received(source) == len(expected)
    assert idle_cpu < 0.1 * elapsed, f"reader used {idle_cpu:.3f}s CPU in {elapsed:.3f}s idle"


def test_fifo_concurrent_writers_keep_whole_lines_and_stop_drains_the_pipe(tmp_path: Path):
    path = tmp_path / "app.fifo"
    source = FifoSource(unique("fifo"), str(path), {"mode": "0600"})
    per_writer = 500

    def writer(w: int) -> None:
        with open(path, "wb", buffering=0) as f:
            for line in lines(f"w{w}", per_writer):
                f.write(line + b"\n")  # < PIPE_BUF: atomic, never interleaved

    with running(source) as out:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.wait_for(4 * per_writer)
        # Data still in the pipe when stop() comes, including a last line without newline, is kept.
        with open(path, "wb") as f:
            f.write(b"pending 1\npending 2\nno newline")
    frames = out.frames
    assert len(frames) == 4 * per_writer + 3
    for w in range(4):  # each writer's lines arrive whole and in its order
        assert [f for f in frames if f.startswith(f"w{w} ".encode())] == lines(f"w{w}", per_writer)
    assert frames[-3:] == [b"pending 1", b"pending 2", b"no newline"]


def _pipe_size(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    finally:
        os.close(fd)


def test_fifo_raises_its_pipe_buffer_and_keeps_lines_whole_as_read_sizes_change(tmp_path: Path):
    """Long lines make the source read up to 1 MiB at a time and short ones 64 KiB: every line
    still arrives whole and in order across the changes, split between reads or not."""
    path = tmp_path / "app.fifo"
    source = FifoSource(unique("fifo"), str(path))
    long_a = [f"long {i:04d} ".encode() + b"a" * 20_000 for i in range(200)]
    short = lines("short", 20_000)
    long_b = [f"long again {i:04d} ".encode() + b"b" * 9_000 for i in range(300)]
    expected = long_a + short + long_b

    with running(source) as out:
        assert _pipe_size(path) == 1 << 20
        with open(path, "wb") as f:  # ~9 MB: blocks until the source has read all but the last MiB
            f.write(b"".join(line + b"\n" for line in expected))
        out.wait_for(len(expected))
    assert out.frames == expected


def test_fifo_pipe_size_zero_leaves_the_kernel_default(tmp_path: Path):
    path = tmp_path / "app.fifo"
    r, w = os.pipe()
    default = fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
    os.close(r)
    os.close(w)
    with running(FifoSource(unique("fifo"), str(path), {"pipe_size": 0})):
        assert _pipe_size(path) == default


def test_fifo_long_line_is_cut_and_counted(tmp_path: Path):
    path = tmp_path / "app.fifo"
    source = FifoSource(unique("fifo"), str(path), {"max_line_bytes": 100})
    with running(source) as out:
        with open(path, "wb") as f:
            f.write(b"x" * 250_000 + b"\nshort\n")
        out.wait_for(2)
    assert out.frames == [b"x" * 100, b"short"]
    assert errors(source, "frame_truncated") == 1


def test_fifo_bad_paths_are_clear_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"directory .*missing-dir does not exist"):
        FifoSource("f", str(tmp_path / "missing-dir" / "app.fifo")).open()
    regular = tmp_path / "regular"
    regular.write_text("")
    with pytest.raises(ConfigError, match="exists and is not a FIFO"):
        FifoSource("f", str(regular)).open()
    with pytest.raises(ConfigError, match="octal file mode"):
        FifoSource("f", str(tmp_path / "x"), {"mode": "rw-rw----"})
    with pytest.raises(ConfigError, match="unknown key"):
        FifoSource("f", str(tmp_path / "x"), {"mdoe": "0660"})


# ---- posix_mq ---------------------------------------------------------------------------------
@pytest.fixture
def mq_name() -> Iterator[str]:
    name = "/" + unique("logferry-test")
    yield name
    with suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_message_queue(name)


def test_posix_mq_thousand_messages_in_order(mq_name: str):
    source = PosixMqSource(unique("pmq"), mq_name)
    expected = lines("pmq", 1000)
    with running(source) as out:
        queue = posix_ipc.MessageQueue(mq_name)  # created by the source (10 messages deep)
        for i, msg in enumerate(expected):
            queue.send(msg + b"\n" if i % 2 else msg)  # a trailing newline is not part of the entry
        queue.send(b"")
        queue.send(b"the end")
        out.wait_for(1001)
        queue.close()
    assert out.frames == [*expected, b"the end"]
    assert errors(source, "empty_message") == 1


def test_posix_mq_missing_queue_and_bad_names_are_clear_errors(mq_name: str):
    with pytest.raises(ConfigError, match=rf"queue '{mq_name}' does not exist \(create = false"):
        PosixMqSource("p", mq_name, {"create": False}).open()
    with pytest.raises(ConfigError, match="one leading slash"):
        PosixMqSource("p", "no-slash").open()
    with pytest.raises(ConfigError, match="msg_max"):
        PosixMqSource("p", mq_name, {"max_messages": 10**9}).open()


# ---- sysv_mq ----------------------------------------------------------------------------------
@pytest.fixture
def sysv_key() -> Iterator[int]:
    key = 0x4C460000 + int(uuid.uuid4().hex[:4], 16)
    yield key
    with suppress(sysv_ipc.ExistentialError):
        sysv_ipc.MessageQueue(key).remove()


def test_sysv_mq_thousand_messages_with_their_type(sysv_key: int):
    source = SysvMqSource(unique("svq"), hex(sysv_key))
    expected = [(msg, 1 + i % 3) for i, msg in enumerate(lines("svq", 1000))]
    with running(source) as out:
        queue = sysv_ipc.MessageQueue(sysv_key)
        for msg, mtype in expected:
            queue.send(msg, type=mtype)
        out.wait_for(1000)
    got = [(f, int(b.attributes["mq_type"])) for b in out.batches for f in b.frames if b.attributes]
    assert got == expected


def test_sysv_mq_type_filter_and_queue_removed_under_us(sysv_key: int):
    source = SysvMqSource(unique("svq"), str(sysv_key), {"type": 7})
    with running(source) as out:
        queue = sysv_ipc.MessageQueue(sysv_key)
        queue.send(b"other type", type=3)
        queue.send(b"wanted", type=7)
        out.wait_for(1)
        queue.remove()  # ipcrm while the source reads: counted, queue recreated, reading goes on
        out.wait_until(lambda: errors(source, "queue_removed") == 1, "the removal to be counted")
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                sysv_ipc.MessageQueue(sysv_key).send(b"after removal", type=7)
                break
            except sysv_ipc.ExistentialError:
                assert time.monotonic() < deadline, "the source did not recreate the queue"
        out.wait_for(2)
    assert out.frames == [b"wanted", b"after removal"]
    assert errors(source, "queue_removed") == 1


def test_sysv_mq_bad_keys_and_missing_queue_are_clear_errors(sysv_key: int):
    for bad in ("abc", "0", str(1 << 33)):
        with pytest.raises(ConfigError, match="sysv_mq key"):
            SysvMqSource("s", bad).open()
    with pytest.raises(ConfigError, match=rf"key {sysv_key} does not exist \(create = false"):
        SysvMqSource("s", str(sysv_key), {"create": False}).open()


# ---- shm ring -------------------------------------------------------------------------------
@pytest.fixture
def ring_name() -> Iterator[str]:
    name = unique("logferry-test")
    yield name
    ShmRing.unlink(name)


WRITER_PROCESS = """
import sys
from logferry.collectors.shm_ring import ShmWriter
name, prefix, n, on_full = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with ShmWriter(name, on_full=on_full, timeout=30) as w:
    for i in range(n):
        assert w.write(f"{prefix} {i:07d}".encode())
"""


def write_in_process(name: str, prefix: str, n: int, on_full: str = "wait") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER_PROCESS, name, prefix, str(n), on_full])


def test_shm_ring_wraps_around_between_processes_without_loss(ring_name: str):
    source = ShmSource(unique("shm"), ring_name, {"slots": 64, "slot_size": 64})
    n = 20_000  # 300+ times round a 64-slot ring, the writer waiting for the reader
    with running(source) as out:
        proc = write_in_process(ring_name, "p", n)
        assert proc.wait(DEADLINE) == 0
        frames = out.wait_for(n)
    assert frames == [f"p {i:07d}".encode() for i in range(n)]
    assert REGISTRY.get_sample_value("logferry_shm_overwrites_total", {"source": source.name}) in (None, 0)
    # The writer process exited: the ring must still exist (no resource-tracker unlink).
    ShmRing.attach(ring_name).close()


def test_shm_overwrite_counts_exactly_and_keeps_the_newest(ring_name: str):
    slots = 32
    source = ShmSource(unique("shm"), ring_name, {"slots": slots, "slot_size": 64})
    source.open()  # create the ring, but do not read yet: the writer laps the reader
    with ShmWriter(ring_name, on_full="overwrite") as w:
        assert all(w.write(f"e{i}") for i in range(3 * slots + 5))
        assert w.ring.counters["overwrites"] == 2 * slots + 5
    source.close()
    with running(source) as out:
        frames = out.wait_for(slots)
    assert frames == [f"e{i}".encode() for i in range(2 * slots + 5, 3 * slots + 5)]
    assert REGISTRY.get_sample_value("logferry_shm_overwrites_total", {"source": source.name}) == 2 * slots + 5


def test_shm_reader_racing_an_overwriting_writer_never_sees_torn_entries(ring_name: str):
    """delivered + counted-as-overwritten == written, every delivered entry intact and in order."""
    source = ShmSource(unique("shm"), ring_name, {"slots": 16, "slot_size": 256, "batch": 7})
    n = 50_000
    with running(source) as out:
        proc = write_in_process(ring_name, "x" * 180, n, on_full="overwrite")  # long: copies take time
        assert proc.wait(DEADLINE) == 0
        overwrites = lambda: REGISTRY.get_sample_value("logferry_shm_overwrites_total", {"source": source.name}) or 0  # noqa: E731
        out.wait_until(lambda: len(out.frames) + overwrites() >= n, "every entry delivered or counted")
    frames = out.frames
    numbers = [int(f.rsplit(b" ", 1)[1]) for f in frames]
    assert all(f == b"x" * 180 + f" {k:07d}".encode() for f, k in zip(frames, numbers, strict=True))
    assert numbers == sorted(set(numbers)), "out of order or duplicated"
    assert len(frames) + overwrites() == n
    assert numbers[-1] == n - 1
    assert overwrites() > 0, "the writer never lapped the reader: this test raced nothing"


def test_shm_writer_never_waits_longer_than_its_timeout_and_drops_are_counted(ring_name: str):
    source = ShmSource(unique("shm"), ring_name, {"slots": 4, "slot_size": 64})
    source.open()
    with ShmWriter(ring_name, on_full="wait", timeout=0.05) as w:
        assert all(w.write(f"fill {i}") for i in range(4))
        started = time.monotonic()
        assert w.write("no room") is False
        waited = time.monotonic() - started
        assert w.write(b"y" * 200) is False
        assert (w.dropped, w.ring.counters["timeouts"]) == (2, 2)
    source.close()
    assert 0.05 <= waited < 1.0
    with running(source) as out:
        assert out.wait_for(4) == [f"fill {i}".encode() for i in range(4)]
        out.gate.clear()  # the pipeline pushes back: the reader stops reading
        with ShmWriter(ring_name, timeout=0) as w:
            assert w.write("taken, then the reader blocks")
            out.wait_until(lambda: received(source) == 5, "the reader to take it and block in emit")
            assert all(w.write(f"queued {i}") for i in range(4))
            assert w.write("no room again") is False  # timeout=0: never waits
            out.gate.set()
            out.wait_for(9)
            out.wait_until(lambda: errors(source, "shm_writer_timeout") == 1, "the new drop to be counted")
    # The two drops from before this run were reported to their writer (False), not counted again here.
    assert out.frames[4:] == [b"taken, then the reader blocks", *(f"queued {i}".encode() for i in range(4))]


def test_shm_entry_longer_than_a_slot_is_cut_flagged_and_counted(ring_name: str):
    source = ShmSource(unique("shm"), ring_name, {"slots": 8, "slot_size": 64})
    with running(source) as out, ShmWriter(ring_name) as w:
        assert w.write(b"z" * 100) and w.write(b"fits")
        assert out.wait_for(2) == [b"z" * 48, b"fits"]  # 64-byte slot, 16 of it slot header
        assert w.ring.counters["truncated"] == 1
    assert errors(source, "frame_truncated") == 1


def test_shm_several_writer_processes_with_the_lock(ring_name: str):
    source = ShmSource(unique("shm"), ring_name, {"slots": 128, "slot_size": 64, "multi_writer": True})
    per_writer = 5000
    with running(source) as out:
        procs = [write_in_process(ring_name, f"w{k}", per_writer) for k in range(3)]
        assert [p.wait(DEADLINE) for p in procs] == [0, 0, 0]
        frames = out.wait_for(3 * per_writer)
    assert len(frames) == 3 * per_writer
    for k in range(3):
        assert [f for f in frames if f.startswith(f"w{k} ".encode())] == [
            f"w{k} {i:07d}".encode() for i in range(per_writer)
        ]


def test_shm_reader_resumes_at_its_tail_after_a_restart(ring_name: str):
    name = unique("shm")
    with running(ShmSource(name, ring_name)) as out:
        with ShmWriter(ring_name) as w:
            for i in range(10):
                w.write(f"first {i}")
        out.wait_for(10)
    with ShmWriter(ring_name) as w:  # agent down: entries wait in the ring
        for i in range(5):
            w.write(f"second {i}")
    with running(ShmSource(name, ring_name)) as out2:
        assert out2.wait_for(5) == [f"second {i}".encode() for i in range(5)]


def test_shm_bad_names_geometry_and_missing_ring_are_clear_errors(ring_name: str):
    with pytest.raises(RingError, match="does not exist: start the agent with source shm:"):
        ShmWriter(ring_name)
    with pytest.raises(ConfigError, match="use letters, digits"):
        ShmSource("s", "bad/name").open()
    with pytest.raises(ConfigError, match="multiple of 8"):
        ShmSource("s", ring_name, {"slot_size": 100})
    first = ShmSource("s", ring_name, {"slots": 8})
    first.open()
    first.close()
    with pytest.raises(ConfigError, match="exists with slots=8"):
        ShmSource("s", ring_name, {"slots": 16}).open()


# ---- syslog ---------------------------------------------------------------------------------
RFC3164 = "<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8 #{i}"
RFC5424 = "<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 - msg #{i}"


def test_syslog_udp_one_datagram_is_one_entry():
    source = SyslogSource(unique("syslog"), "udp://127.0.0.1:0")
    assert source.default_parser == "syslog"
    expected: list[bytes] = []
    with running(source) as out:
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind(("127.0.0.1", 0))
        sender_address = f"127.0.0.1:{sender.getsockname()[1]}"
        for burst in range(10):  # bursts the socket buffer surely holds; UDP itself may drop beyond
            for i in range(burst * 100, burst * 100 + 100):
                msg = (RFC3164 if i % 2 else RFC5424).format(i=i).encode() + (b"\n" if i % 3 == 0 else b"")
                sender.sendto(msg, source.bound_address)
                expected.append(msg.rstrip(b"\n"))
            out.wait_for(len(expected))
        sender.sendto(b"multi\nline\nstack trace", source.bound_address)  # a datagram is never split
        out.wait_for(len(expected) + 1)
    sender.close()
    assert out.frames == [*expected, b"multi\nline\nstack trace"]
    assert {b.stream for b in out.batches} == {sender_address}  # the sender is the stream


def test_syslog_udp_empty_and_oversized_datagrams_are_counted():
    source = SyslogSource(unique("syslog"), "udp://127.0.0.1:0", {"max_message_bytes": 64})
    with running(source) as out, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for datagram in (b"", b"\n", b"<13>" + b"y" * 500, b"<13>fine"):
            sender.sendto(datagram, source.bound_address)
        out.wait_for(2)
        out.wait_until(lambda: errors(source, "empty_message") == 2, "the empty datagrams to be counted")
    assert out.frames == [b"<13>" + b"y" * 60, b"<13>fine"]
    assert errors(source, "frame_truncated") == 1


def octet(msg: bytes) -> bytes:
    return str(len(msg)).encode() + b" " + msg


def test_syslog_tcp_many_clients_both_framings_and_a_client_vanishing_mid_frame():
    source = SyslogSource(unique("syslog"), "tcp://127.0.0.1:0")
    clients, per_client = 20, 100

    def client(c: int) -> None:
        with socket.create_connection(source.bound_address) as s:
            payload = b""
            for i in range(per_client):
                msg = RFC5424.format(i=f"{c}-{i}").encode()
                payload += octet(msg) if c % 2 else msg + b"\n"  # odd clients octet-count
            for k in range(0, len(payload), 777):  # arbitrary TCP segments
                s.sendall(payload[k : k + 777])

    with running(source) as out:
        with socket.create_connection(source.bound_address) as vanishing:
            vanishing.sendall(octet(b"<13>complete before vanishing") + b"120 <13>only half of this fra")
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.wait_for(clients * per_client + 1)
        out.wait_until(lambda: errors(source, "half_frame") == 1, "the half frame to be counted")
    frames = out.frames
    assert len(frames) == clients * per_client + 1
    assert b"<13>complete before vanishing" in frames
    for c in range(clients):
        mine = [f for f in frames if f" msg #{c}-".encode() in f]
        assert mine == [RFC5424.format(i=f"{c}-{i}").encode() for i in range(per_client)]
    streams = {b.stream for b in out.batches}
    assert len(streams) == clients + 1  # each connection is its own stream


def test_syslog_tcp_stop_keeps_what_connected_clients_already_sent():
    source = SyslogSource(unique("syslog"), "tcp://127.0.0.1:0")
    with running(source) as out:
        client = socket.create_connection(source.bound_address)
        client.sendall(b"first\n")
        out.wait_for(1)
        out.gate.clear()  # the reader blocks in emit: the next lines stay in the kernel until stop
        client.sendall(b"second\n")
        out.wait_until(lambda: received(source) == 2, "the reader to take the second line and block")
        client.sendall(b"third\nlast, no newline")
        source.stop()
        out.gate.set()
    client.close()
    assert out.frames == [b"first", b"second", b"third", b"last, no newline"]


def test_syslog_bad_addresses_and_busy_port_are_clear_errors():
    for bad in ("127.0.0.1:514", "http://127.0.0.1:514", "udp://127.0.0.1", "tcp://127.0.0.1:99999"):
        with pytest.raises(ConfigError, match="syslog address"):
            SyslogSource("s", bad)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot listen on tcp://127.0.0.1:{port} \(Address already in use\)"):
            SyslogSource("s", f"tcp://127.0.0.1:{port}").open()
    finally:
        taken.close()


def test_syslog_tcp_refuses_clients_beyond_max_connections():
    source = SyslogSource(unique("syslog"), "tcp://127.0.0.1:0", {"max_connections": 2})
    with running(source) as out:
        keep = [socket.create_connection(source.bound_address) for _ in range(2)]
        for i, s in enumerate(keep):
            s.sendall(f"client {i}\n".encode())
        out.wait_for(2)
        extra = socket.create_connection(source.bound_address)
        extra.settimeout(DEADLINE)
        assert extra.recv(10) == b""  # closed by the source
        out.wait_until(lambda: errors(source, "too_many_connections") == 1, "the refusal to be counted")
        for s in [*keep, extra]:
            s.close()
    assert sorted(out.frames) == [b"client 0", b"client 1"]


def test_posix_and_fifo_sources_stop_promptly_when_idle(tmp_path: Path, mq_name: str):
    """stop() wakes a reader blocked in poll(); `running` fails if the thread takes over 10 s."""
    for source in (FifoSource(unique("fifo"), str(tmp_path / "f")), PosixMqSource(unique("pmq"), mq_name)):
        started = time.monotonic()
        with running(source):
            pass
        assert time.monotonic() - started < 5


def test_fifo_path_in_missing_directory_leaves_nothing_behind(tmp_path: Path):
    with pytest.raises(ConfigError):
        FifoSource("f", str(tmp_path / "nope" / "f")).open()
    assert not (tmp_path / "nope").exists()
    assert os.listdir(tmp_path) == []


def test_message_frames_strips_one_line_ending_and_counts_empty_messages():
    from logferry.collectors.sources.ipcutil import message_frames, one_message

    messages = [b"a\r\n", b"b\n", b"", b"\n", b"\r\n", b"c", b"d\n\n", b"\r"]
    frames, empty = message_frames(messages)
    assert frames == [f for f in map(one_message, messages) if f]  # the per-message rule, batched
    assert empty == sum(1 for m in messages if not one_message(m))
