"""Checkpoints of tailed files: how far each file is safely in Kafka.

The registry is one small JSON file per file source, replaced atomically (fsync'd) so a
crash leaves the old or the new version, never a torn one. A file is identified by
device + inode plus a CRC32 fingerprint of its first bytes: after inode reuse the
fingerprint differs and the old offset is not applied to a new file.

An offset only advances when Kafka acknowledged every entry before it. Entries of one
file go to different partitions and are acknowledged out of order, so `AckTracker`
keeps the read chunks in order and moves the committed offset over the acknowledged
prefix only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from logferry.collectors.fsutil import atomic_write, private_dir
from logferry.metrics import CHECKPOINT_LAG, CHECKPOINT_LAST

log = logging.getLogger("logferry.checkpoint")

FINGERPRINT_BYTES = 1024
VERSION = 1


def fingerprint(fd: int, length: int = FINGERPRINT_BYTES) -> tuple[str, int]:
    """CRC32 (hex) of the first `length` bytes of an open file, and how many bytes it covers."""
    head = os.pread(fd, length, 0)
    return f"{zlib.crc32(head):08x}", len(head)


def same_start(fd: int, fp: str, fp_len: int) -> bool:
    """Does the file still begin with the bytes the fingerprint was taken of?"""
    return fingerprint(fd, fp_len) == (fp, fp_len)


@dataclass
class FileCheckpoint:
    path: str
    dev: int
    ino: int
    fingerprint: str
    fp_len: int
    offset: int
    updated: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.dev}:{self.ino}"


class CheckpointStore:
    """The registry file; thread-safe; `save` writes only when something changed."""

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self._lock = threading.Lock()
        # Saves come from the source thread and the sink's delivery path at once: one writer at
        # a time, so they never share the temp file and a newer body is never replaced by an older.
        self._write_lock = threading.Lock()
        self._entries: dict[str, FileCheckpoint] = {}
        self._dirty = False
        self._saved_at = 0.0
        private_dir(path.parent)
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            for item in data["files"]:
                cp = FileCheckpoint(**item)
                self._entries[cp.key] = cp
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError) as e:
            # Never crash on our own state: start over (files are then read per start_at) and say so.
            bad = self.path.with_name(self.path.name + ".bad")
            os.replace(self.path, bad)
            log.error("checkpoint file %s unreadable (%s); moved to %s", self.path, e, bad)

    def lookup(self, dev: int, ino: int, fd: int) -> FileCheckpoint | None:
        """The checkpoint of this open file, if the device, inode and first bytes all match."""
        with self._lock:
            cp = self._entries.get(f"{dev}:{ino}")
            if cp is None:
                return None
            if not same_start(fd, cp.fingerprint, cp.fp_len):
                del self._entries[cp.key]  # inode reuse: a different file now lives there
                self._dirty = True
                return None
            return cp

    def entries(self) -> list[FileCheckpoint]:
        with self._lock:
            return list(self._entries.values())

    def set(self, cp: FileCheckpoint) -> None:
        with self._lock:
            cp.updated = time.time()
            self._entries[cp.key] = cp
            self._dirty = True

    def forget(self, dev: int, ino: int) -> None:
        with self._lock:
            if self._entries.pop(f"{dev}:{ino}", None) is not None:
                self._dirty = True

    def save(self, force: bool = False) -> bool:
        """Write the registry if it changed and `interval` passed (or `force`). Returns whether it wrote."""
        with self._write_lock:
            with self._lock:
                if not self._dirty or (not force and time.monotonic() - self._saved_at < self.interval):
                    return False
                body = json.dumps({"version": VERSION, "files": [asdict(c) for c in self._entries.values()]}, indent=1)
                self._dirty = False
                self._saved_at = time.monotonic()
            atomic_write(self.path, body.encode())
        CHECKPOINT_LAST.set(time.time())
        return True


class AckTracker:
    """Committed offset of one file = end of the longest prefix of read chunks Kafka fully acknowledged.

    Every frame of a chunk carries the chunk's end offset as its ack token; a chunk is done
    when as many acks as frames arrived. Memory is bounded by what is in flight.
    """

    def __init__(self, committed: int) -> None:
        self.committed = committed
        self._chunks: deque[list[int]] = deque()  # [end offset, frames not yet acked]
        self._by_end: dict[int, list[int]] = {}

    def add(self, end: int, frames: int) -> None:
        chunk = self._by_end.get(end)
        if chunk is not None:  # another emit ending at the same offset (e.g. a flushed last line)
            chunk[1] += frames
            return
        chunk = [end, frames]
        self._chunks.append(chunk)
        self._by_end[end] = chunk

    def ack(self, end: int, n: int = 1) -> bool:
        """Count n acks for the chunk ending at `end`; True when the committed offset moved."""
        chunk = self._by_end.get(end)
        if chunk is None:
            return False  # from before a truncation/restart: nothing to do
        chunk[1] -= n
        moved = False
        while self._chunks and self._chunks[0][1] <= 0:
            done = self._chunks.popleft()
            del self._by_end[done[0]]
            self.committed = done[0]
            moved = True
        return moved

    def reset(self, committed: int) -> None:
        """The file was truncated: what was in flight no longer maps to offsets of this file."""
        self._chunks.clear()
        self._by_end.clear()
        self.committed = committed

    @property
    def in_flight(self) -> int:
        return sum(c[1] for c in self._chunks)


def set_lag(path: str, size: int, committed: int) -> None:
    CHECKPOINT_LAG.labels(path=path).set(max(0, size - committed))


def clear_lag(path: str) -> None:
    with contextlib.suppress(KeyError):
        CHECKPOINT_LAG.remove(path)
