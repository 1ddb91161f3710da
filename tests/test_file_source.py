"""The file source on its own: rotation in both modes, truncation, checkpoints, restart (no Kafka)."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from logferry.collectors.checkpoint import CheckpointStore
from logferry.collectors.sources.base import Frames
from logferry.collectors.sources.file import FileSource


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Running:
    """A FileSource in a thread; emitted frames are collected and (optionally) acked out of order."""

    def __init__(self, address: str, state: Path, ack: bool = True, **options: Any) -> None:
        opts = {"state_dir": str(state), "poll_interval": 0.02, "rotate_wait": 0.3, "checkpoint_interval": 0.05}
        self.source = FileSource("files", address, {**opts, **options})
        self.lines: list[bytes] = []
        self.pending: list[Any] = []
        self.ack = ack
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.source.run, args=(self.emit,), daemon=True)

    def emit(self, fr: Frames) -> None:
        assert fr.ack_tokens is not None and len(fr.ack_tokens) == len(fr.frames)
        with self.lock:
            self.lines += fr.frames
            self.pending += fr.ack_tokens
            if self.ack and len(self.pending) > 50:
                self._ack_locked()

    def _ack_locked(self) -> None:
        random.shuffle(self.pending)  # partitions acknowledge independently
        tokens, self.pending = self.pending, []
        self.source.delivered(tokens)

    def ack_all(self) -> None:
        with self.lock:
            self._ack_locked()

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.ack:
            self.ack_all()
        self.source.stop()
        self.thread.join(10)
        self.source.close()


def line(i: int, tag: str = "l") -> bytes:
    return f"{tag}{i:07d} some log text".encode()


def test_start_at_end_or_beginning_for_files_seen_the_first_time(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"".join(line(i) + b"\n" for i in range(10)))
    with Running(str(log), tmp_path / "s1", start_at="beginning") as r:
        wait_for(lambda: len(r.lines) == 10)
    with Running(str(log), tmp_path / "s2", start_at="end") as r:
        wait_for(lambda: r.source._files, what="file tracked")
        with log.open("ab") as f:
            f.write(line(10) + b"\n")
        wait_for(lambda: r.lines == [line(10)])


def test_glob_picks_up_new_files_from_their_first_byte(tmp_path: Path) -> None:
    with Running(str(tmp_path / "*.log"), tmp_path / "s") as r:
        assert r.source.scanned.wait(5)
        for n in range(3):
            (tmp_path / f"{n}.log").write_bytes(line(n) + b"\n")
        wait_for(lambda: sorted(r.lines) == [line(n) for n in range(3)])


def writer_with_rotation(log: Path, n: int, rotate: Callable[[int], None], every: int) -> None:
    f = log.open("ab", buffering=0)
    rotations = 0
    for i in range(n):
        f.write(line(i) + b"\n")
        if i and i % every == 0:
            rotations += 1
            f = rotate(rotations) or f
    f.close()


@pytest.mark.parametrize("mode", ["create", "copytruncate"])
def test_rotation_while_writing_delivers_every_line_once(tmp_path: Path, mode: str) -> None:
    log = tmp_path / "app.log"
    log.touch()
    n, every = 30_000, 7_000

    def rotate(k: int) -> Any:
        # Rotations run far apart in real life; here the next one waits until the source has read into
        # the current generation (a file written and rotated away between two polls is never seen: file.py).
        wait_for(lambda: len(r.lines) >= (k - 1) * every + 2, what="current generation seen")
        if mode == "create":  # logrotate `create`: rename, new file, the app reopens
            os.rename(log, tmp_path / f"app.log.{k}")
            return log.open("ab", buffering=0)
        # copytruncate: copy then truncate in place; the app keeps its O_APPEND descriptor.
        # (Writes between copy and truncate are lost by logrotate itself, so the writer waits.)
        shutil.copyfile(log, tmp_path / f"app.log.{k}")
        os.truncate(log, 0)
        return None

    with Running(str(log), tmp_path / "state", start_at="beginning") as r:
        writer_with_rotation(log, n, rotate, every)
        wait_for(lambda: len(r.lines) >= n, what=f"{n} lines")
        wait_for(lambda: len(r.source._files) == 1, what="rotated files released")
    counts = Counter(r.lines)
    assert set(counts) == {line(i) for i in range(n)}
    assert [ln for ln, c in counts.items() if c > 1] == []


def test_restart_resumes_exactly_at_the_acknowledged_offset(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"".join(line(i) + b"\n" for i in range(100)))
    with Running(str(log), tmp_path / "s", start_at="beginning") as r:
        wait_for(lambda: len(r.lines) == 100)
    with log.open("ab") as f:
        f.write(b"".join(line(i) + b"\n" for i in range(100, 150)))
    with Running(str(log), tmp_path / "s", ack=False) as r:
        wait_for(lambda: len(r.lines) == 50)
        assert r.lines == [line(i) for i in range(100, 150)]
        # nothing acknowledged: the checkpoint must not move
    with Running(str(log), tmp_path / "s") as r:
        wait_for(lambda: len(r.lines) == 50)
        assert r.lines == [line(i) for i in range(100, 150)]
        r.ack_all()
        size = log.stat().st_size
        wait_for(lambda: [cp.offset for cp in r.source.store.entries()] == [size], what="checkpoint at end of file")
    with Running(str(log), tmp_path / "s") as r:
        wait_for(lambda: r.source._files, what="file tracked")
        assert next(iter(r.source._files.values())).offset == size
        assert r.lines == []


def test_rotated_while_stopped_the_rest_of_the_old_file_is_read(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"".join(line(i) + b"\n" for i in range(10)))
    with Running(str(log), tmp_path / "s", start_at="beginning") as r:
        wait_for(lambda: len(r.lines) == 10)
    with log.open("ab") as f:
        f.write(b"".join(line(i) + b"\n" for i in range(10, 20)))
    os.rename(log, tmp_path / "app.log.1")
    log.write_bytes(b"".join(line(i) + b"\n" for i in range(20, 25)))
    with Running(str(log), tmp_path / "s") as r:
        wait_for(lambda: len(r.lines) == 15)
        assert sorted(r.lines) == [line(i) for i in range(10, 25)]


def test_truncation_restarts_at_zero(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    with Running(str(log), tmp_path / "s", start_at="beginning") as r:
        log.write_bytes(b"".join(line(i) + b"\n" for i in range(50)))
        wait_for(lambda: len(r.lines) == 50)
        with log.open("r+b") as f:
            f.truncate(0)
            f.write(line(99, "new") + b"\n")
        wait_for(lambda: len(r.lines) == 51)
        assert r.lines[-1] == line(99, "new")


def test_deleted_file_is_released_and_forgotten(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(line(1) + b"\n" + b"no newline at the end")
    with Running(str(log), tmp_path / "s", start_at="beginning") as r:
        wait_for(lambda: len(r.lines) == 1)
        log.unlink()
        wait_for(lambda: (r.ack_all(), not r.source._files)[1], what="file released after grace, acked, forgotten")
        assert r.lines == [line(1), b"no newline at the end"]
        assert not any("app.log" in os.readlink(f"/proc/self/fd/{fd}") for fd in _fds())
        assert r.source.store.entries() == []


def _fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
            out.append(fd)
        except OSError:
            pass
    return out


def test_a_crash_in_emit_rereads_what_was_not_acknowledged(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(b"".join(line(i) + b"\n" for i in range(100)))
    src = FileSource("files", str(log), {"state_dir": str(tmp_path / "s"), "start_at": "beginning"})
    got: list[bytes] = []
    calls = 0

    def emit(fr: Frames) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a pipeline bug")  # the agent logs it and calls run() again
        got.extend(fr.frames)
        src.delivered(fr.ack_tokens or [])

    with pytest.raises(RuntimeError):
        src.run(emit)
    thread = threading.Thread(target=src.run, args=(emit,))
    thread.start()
    try:
        wait_for(lambda: len(got) >= 100)
    finally:
        src.stop()
        thread.join(10)
        src.close()
    assert got == [line(i) for i in range(100)]
    assert [cp.offset for cp in src.store.entries()] == [log.stat().st_size]


class Restartable:
    """A FileSource driven like the agent drives it: `run` in a thread, called again after a crash.

    Emitted ack tokens are held (in flight) until `deliver` hands them back, as the sink would.
    """

    def __init__(self, log: Path, state: Path, **options: Any) -> None:
        opts = {"state_dir": str(state), "poll_interval": 0.02, "rotate_wait": 0.3, "checkpoint_interval": 0.05}
        self.source = FileSource("files", str(log), {**opts, **options})
        self.lines: Counter[bytes] = Counter()
        self.held: list[Any] = []
        self.auto_ack = False
        self.lock = threading.Lock()
        self.crashed: list[BaseException] = []
        self.thread: threading.Thread | None = None

    def emit(self, fr: Frames) -> None:
        with self.lock:
            self.lines.update(fr.frames)
            self.held += fr.ack_tokens or []
            if not self.auto_ack:
                return
            tokens, self.held = self.held, []
        self.source.delivered(tokens)

    def deliver(self, tokens: list[Any]) -> None:
        self.source.delivered(tokens)

    def start(self) -> None:
        def run() -> None:
            try:
                self.source.run(self.emit)
            except Exception as e:  # the agent logs it and calls run() again
                self.crashed.append(e)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait_crash(self) -> None:
        assert self.thread is not None
        self.thread.join(10)
        assert not self.thread.is_alive() and len(self.crashed) == 1, "the injected crash did not happen"

    def stop(self) -> None:
        self.source.stop()
        if self.thread is not None:
            self.thread.join(10)
        self.source.close()


def lines(r: range) -> bytes:
    return b"".join(line(i) + b"\n" for i in r)


def test_a_crash_at_rotation_loses_nothing_of_what_was_in_flight(tmp_path: Path, monkeypatch) -> None:
    """The checkpoint save right after a rename+create rotation fails (once): run() dies with reads of
    the rotated file emitted but not acknowledged. Those acks arrive after the restart; every line
    must still be delivered (re-reading the in-flight part is fine)."""
    log = tmp_path / "app.log"
    log.touch()
    r = Restartable(log, tmp_path / "s", start_at="beginning")
    armed = threading.Event()
    save = CheckpointStore.save

    def failing_save(self: CheckpointStore, force: bool = False) -> bool:
        if force and armed.is_set():
            armed.clear()
            raise FileNotFoundError("injected: checkpoint temp file vanished")
        return save(self, force)

    monkeypatch.setattr(CheckpointStore, "save", failing_save)
    r.start()
    try:
        assert r.source.scanned.wait(5)
        with log.open("ab") as f:
            f.write(lines(range(100)))
        wait_for(lambda: len(r.lines) == 100, what="first generation read")
        armed.set()  # the scan that tracks the new file saves (forced) and fails
        os.rename(log, tmp_path / "app.log.1")
        log.write_bytes(lines(range(100, 200)))
        r.wait_crash()
        in_flight = list(r.held)
        assert len(in_flight) == 100
        r.held.clear()
        r.auto_ack = True
        r.start()
        wait_for(lambda: sum(r.lines.values()) >= 300, what="both generations read after the restart")
        r.deliver(in_flight)  # the sink delivers what the crashed run emitted
        size = log.stat().st_size
        wait_for(lambda: [cp.offset for cp in r.source.store.entries()] == [size], what="only the new file, at its end")
    finally:
        r.stop()
    assert set(r.lines) == {line(i) for i in range(200)}
    assert sum(r.lines.values()) - len(r.lines) <= len(in_flight)  # duplicates: only what was in flight


def test_a_file_rotated_in_while_crashed_is_read_whole_with_start_at_end(tmp_path: Path) -> None:
    """start_at=end is for the very first scan only: after a crash, the file a rotation put at the
    path during the restart delay is new and read from its first byte."""
    log = tmp_path / "app.log"
    log.write_bytes(lines(range(10)))  # before the first run: skipped (start_at=end)
    r = Restartable(log, tmp_path / "s", start_at="end")
    r.auto_ack = True
    calls = 0
    emit = r.emit

    def crash_once(fr: Frames) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a pipeline bug")
        emit(fr)

    r.emit = crash_once  # type: ignore[method-assign]
    r.start()
    try:
        assert r.source.scanned.wait(5)
        with log.open("ab") as f:
            f.write(lines(range(10, 20)))
        r.wait_crash()
        os.rename(log, tmp_path / "app.log.1")  # rotated while the source is down
        log.write_bytes(lines(range(20, 30)))
        r.start()
        wait_for(lambda: set(r.lines) >= {line(i) for i in range(10, 30)}, what="lines 10..29", timeout=5)
    finally:
        r.stop()
    assert set(r.lines) == {line(i) for i in range(10, 30)}
