"""Checkpoint registry and contiguous-ack tracking (no Kafka needed)."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from logferry.collectors.checkpoint import AckTracker, CheckpointStore, FileCheckpoint, fingerprint


def test_offset_moves_only_over_the_fully_acknowledged_prefix() -> None:
    t = AckTracker(0)
    t.add(100, 2)
    t.add(200, 3)
    t.add(300, 1)
    assert not t.ack(300)  # a later partition acked first
    for _ in range(3):
        t.ack(200)
    assert t.committed == 0
    t.ack(100)
    assert t.committed == 0
    assert t.ack(100)
    assert t.committed == 300
    assert t.in_flight == 0


@given(chunks=st.lists(st.integers(1, 5), min_size=1, max_size=30), seed=st.integers(0, 2**32))
def test_committed_is_always_the_acknowledged_prefix(chunks: list[int], seed: int) -> None:
    t = AckTracker(0)
    acks = []
    for i, n in enumerate(chunks):
        t.add((i + 1) * 10, n)
        acks += [(i + 1) * 10] * n
    random.Random(seed).shuffle(acks)
    remaining = {(i + 1) * 10: n for i, n in enumerate(chunks)}
    for end in acks:
        t.ack(end)
        remaining[end] -= 1
        done = 0
        for e in sorted(remaining):
            if remaining[e]:
                break
            done = e
        assert t.committed == done


def test_store_is_atomic_private_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "state" / "checkpoints" / "src.json"
    log = tmp_path / "app.log"
    log.write_bytes(b"hello\nworld\n")
    fd = os.open(log, os.O_RDONLY)
    try:
        st_ = os.fstat(fd)
        fp, n = fingerprint(fd)
        store = CheckpointStore(path)
        store.set(FileCheckpoint(str(log), st_.st_dev, st_.st_ino, fp, n, 6))
        assert store.save(force=True)
        assert not store.save(force=True)  # nothing changed: no write
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert not list(path.parent.glob(".*.tmp"))
        assert REGISTRY.get_sample_value("logferry_checkpoint_last_timestamp_seconds") > 0
        again = CheckpointStore(path)
        cp = again.lookup(st_.st_dev, st_.st_ino, fd)
        assert cp is not None and cp.offset == 6
    finally:
        os.close(fd)


def test_inode_reuse_is_not_mistaken_for_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    log = tmp_path / "app.log"
    log.write_bytes(b"first file\n")
    fd = os.open(log, os.O_RDONLY)
    st_ = os.fstat(fd)
    store = CheckpointStore(path)
    store.set(FileCheckpoint(str(log), st_.st_dev, st_.st_ino, *fingerprint(fd), 11))
    os.close(fd)
    # same device and inode, other content: what a reused inode looks like
    log.write_bytes(b"another file entirely\n")
    fd = os.open(log, os.O_RDONLY)
    try:
        assert store.lookup(st_.st_dev, st_.st_ino, fd) is None
        assert store.entries() == []
    finally:
        os.close(fd)


def test_unreadable_registry_is_set_aside_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "cp.json"
    path.write_text('{"version": 1, "files": [{"path": "x"')
    store = CheckpointStore(path)
    assert store.entries() == []
    assert (tmp_path / "cp.json.bad").exists()
    store.set(FileCheckpoint("/x", 1, 2, "00000000", 0, 0))
    store.save(force=True)
    assert json.loads(path.read_text())["files"][0]["ino"] == 2


def test_concurrent_saves_never_collide(tmp_path):
    # The source thread and the sink's delivery path both save; they once shared a temp file
    # and one of them crashed the file source with FileNotFoundError mid-rotation.
    import threading

    store = CheckpointStore(tmp_path / "cp" / "files.json", interval=0)
    errors: list[BaseException] = []

    def hammer(ino: int) -> None:
        try:
            for i in range(200):
                store.set(FileCheckpoint("p", 1, ino, "00000000", 0, i))
                store.save(force=True)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    reloaded = CheckpointStore(tmp_path / "cp" / "files.json")
    assert sorted(c.offset for c in reloaded.entries()) == [199] * 4
