"""`file:GLOB` — tail files, across rotation, resuming exactly at the acknowledged offset.

Polling (stat + pread every `poll_interval`) keeps this simple and correct on every file
system. Each file is known by device + inode, with a fingerprint of its first bytes to
tell inode reuse apart:

- rename + create: the old inode stays open and is read to its end; it is let go once it
  has been idle `rotate_wait` seconds and no longer sits at a watched path (or was deleted,
  so the disk space is freed). The new file at the path is read from its first byte.
- copytruncate: a file that shrank or whose first bytes changed was truncated. The unread
  rest of the old content is taken from the copy (a sibling file starting with the same
  fingerprint), then the file is read again from 0.
- Every frame's ack token is (file id, end offset of its chunk); `delivered` feeds the
  per-file AckTracker and the checkpoint moves over the acknowledged prefix only.
- Limit of polling: a file created and rotated away entirely between two polls is never seen
  (logrotate runs minutes to days apart; the default poll is 0.25 s).
- Start-up: a file with a checkpoint resumes at it; rotated files that still hold unread
  checkpointed data are found by inode next to the watched paths. `start_at` ("end" by
  default) applies only to the very first run; files that appear later are read whole.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logferry.collectors.checkpoint import (
    FINGERPRINT_BYTES,
    AckTracker,
    CheckpointStore,
    FileCheckpoint,
    clear_lag,
    fingerprint,
    same_start,
    set_lag,
)
from logferry.collectors.framing import DEFAULT_MAX_FRAME, LineFramer
from logferry.collectors.fsutil import default_state_dir
from logferry.collectors.sources.base import Emit, Source, flatten_tokens
from logferry.errors import ConfigError

log = logging.getLogger("logferry.source.file")

_ids = itertools.count(1)


@dataclass
class Tailed:
    path: str
    dev: int
    ino: int
    fd: int
    offset: int
    fp: str
    fp_len: int
    framer: LineFramer
    tracker: AckTracker
    fid: int = field(default_factory=lambda: next(_ids))
    size: int = 0
    mtime: int = 0
    gone_since: float | None = None  # rotated away from its path, or deleted
    idle_since: float = field(default_factory=time.monotonic)
    released: bool = False  # fd closed; kept until its in-flight entries are acknowledged
    saved: tuple[int, str] = (-1, "")  # (offset, fingerprint) last handed to the store

    def checkpoint(self) -> FileCheckpoint:
        return FileCheckpoint(self.path, self.dev, self.ino, self.fp, self.fp_len, self.tracker.committed)


class FileSource(Source):
    kind = "file"

    def __init__(self, name: str, address: str, options: dict[str, Any] | None = None) -> None:
        super().__init__(name, address, options)
        o = self.options
        unknown = set(o) - {"start_at", "poll_interval", "rotate_wait", "read_bytes", "max_line_bytes", "state_dir",
                            "checkpoint_interval"}  # fmt: skip
        if unknown:
            raise ConfigError(f"source {name}: unknown file option(s) {sorted(unknown)}")
        if not address:
            raise ConfigError(f"source {name}: file needs a path or glob, e.g. file:/var/log/app/*.log")
        self.start_at = o.get("start_at", "end")
        if self.start_at not in ("end", "beginning"):
            raise ConfigError(f"source {name}: start_at {self.start_at!r}: expected 'end' or 'beginning'")
        try:
            self.poll_interval = float(o.get("poll_interval", 0.25))
            self.rotate_wait = float(o.get("rotate_wait", 5.0))
            self.read_bytes = int(o.get("read_bytes", 256 << 10))
            self.max_line = int(o.get("max_line_bytes", DEFAULT_MAX_FRAME))
            interval = float(o.get("checkpoint_interval", 1.0))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"source {name}: bad file option value ({e})") from None
        state_dir = Path(o.get("state_dir") or default_state_dir())
        self.store = CheckpointStore(state_dir / "checkpoints" / f"{name}.json", interval)
        self._files: dict[tuple[int, int], Tailed] = {}
        self._by_fid: dict[int, Tailed] = {}
        self._lock = threading.Lock()
        self._first_run = not self.store.entries()
        self.scanned = threading.Event()  # the first scan is done: files appearing later are read whole

    # ---- the loop -----------------------------------------------------------------------------
    def open(self) -> None:
        parent = os.path.dirname(self.address) or "."
        if not glob.glob(parent):
            log.warning("file source %s: %s does not exist (yet); watching for it", self.name, parent)

    def run(self, emit: Emit) -> None:
        self._rewind()
        self._scan(first=True)
        self.scanned.set()
        while not self.stopping.is_set():
            read = False
            for t in list(self._files.values()):
                if self.stopping.is_set():
                    break
                read |= self._read(t, emit)
            self._scan(first=False)
            self._release_idle(emit)
            self._commit()
            if not read:
                self.stopping.wait(self.poll_interval)
        self._commit(force=True)

    def _rewind(self) -> None:
        """run() again after a crash: what was read but not acknowledged may be lost; read it again."""
        with self._lock:
            for t in self._files.values():
                if t.released or t.offset == t.tracker.committed:
                    continue
                del self._by_fid[t.fid]
                t.fid = next(_ids)  # acks of the old reads are ignored from now on
                self._by_fid[t.fid] = t
                t.offset = t.tracker.committed
                t.framer = LineFramer(self.max_line)
                t.tracker.reset(t.offset)

    def delivered(self, tokens: Sequence[Any]) -> None:
        with self._lock:
            for (fid, end), n in Counter(flatten_tokens(tokens)).items():
                t = self._by_fid.get(fid)
                if t is not None:
                    t.tracker.ack(end, n)
        self._commit()

    def close(self) -> None:
        self._commit(force=True)
        with self._lock:
            for t in self._files.values():
                if not t.released:
                    os.close(t.fd)
                    t.released = True

    # ---- discovery ------------------------------------------------------------------------------
    def _scan(self, first: bool) -> None:
        now = time.monotonic()
        tracked = False
        # `start_at` is for files seen by the very first scan only: after a crash + restart, a file
        # that appeared meanwhile (e.g. rotated in) is new and read whole.
        from_end = first and self._first_run and self.start_at == "end"
        self._first_run = False
        at_paths: set[tuple[int, int]] = set()
        for path in sorted(glob.glob(self.address)):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            key = (st.st_dev, st.st_ino)
            at_paths.add(key)
            t = self._files.get(key)
            if t is not None:
                t.path, t.gone_since = path, None
                continue
            tracked |= self._track(path, start_default=st.st_size if from_end else 0) is not None
        for key, t in self._files.items():
            if key not in at_paths and t.gone_since is None:
                t.gone_since = now
        if first:
            self._recover_rotated()
        if tracked:  # a file's identity is on disk before any of it is read: a crash + rotation can find it
            self.store.save(force=True)

    def _track(self, path: str, start_default: int, offset: int | None = None) -> Tailed | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self.error("open_failed")
            log.warning("file %s: cannot open (%s)", path, e.strerror)
            return None
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in self._files:  # the path moved under us between stat and open
            os.close(fd)
            return None
        if offset is None:
            cp = self.store.lookup(st.st_dev, st.st_ino, fd)
            offset = cp.offset if cp is not None else start_default
            if offset > st.st_size:  # truncated while we were not running
                offset = 0
        fp, fp_len = fingerprint(fd)
        t = Tailed(path, st.st_dev, st.st_ino, fd, offset, fp, fp_len, LineFramer(self.max_line), AckTracker(offset))
        t.size = st.st_size
        with self._lock:
            self._files[key] = t
            self._by_fid[t.fid] = t
        self.store.set(t.checkpoint())
        return t

    def _recover_rotated(self) -> None:
        """Checkpointed files no longer at a watched path: find them by inode next to it, read the rest."""
        missing = {(cp.dev, cp.ino): cp for cp in self.store.entries() if (cp.dev, cp.ino) not in self._files}
        if not missing:
            return
        for d in glob.glob(os.path.dirname(self.address) or "."):
            with contextlib.suppress(OSError), os.scandir(d) as it:
                for entry in it:
                    cp = missing.get(_identity(entry))
                    if cp is not None and entry.is_file(follow_symlinks=False):
                        t = self._track(entry.path, 0, offset=None)
                        if t is not None:
                            t.gone_since = time.monotonic()
                            log.info("file %s: rotated while stopped, reading from %d", entry.path, t.offset)
        for key in missing:
            if key not in self._files:
                self.store.forget(*key)  # gone for good (deleted, or not next to the watched path)

    # ---- reading --------------------------------------------------------------------------------
    def _read(self, t: Tailed, emit: Emit) -> bool:
        if t.released:
            return False
        try:
            st = os.fstat(t.fd)
        except OSError:
            return False
        if st.st_nlink == 0 and t.gone_since is None:
            t.gone_since = time.monotonic()
        # A rewrite to the same size still changes mtime; the first bytes tell a truncation from appends.
        if (st.st_size != t.size or st.st_mtime_ns != t.mtime) and self._truncated(t, st.st_size):
            self._handle_truncation(t, emit)
            st = os.fstat(t.fd)
        t.size, t.mtime = st.st_size, st.st_mtime_ns
        if t.fp_len < FINGERPRINT_BYTES and t.size > t.fp_len:
            t.fp, t.fp_len = fingerprint(t.fd)
        budget = 8 * self.read_bytes  # then give the other files a turn
        chunks: list[bytes] = []
        pos = t.offset
        while budget > 0 and pos < t.size and not self.stopping.is_set():
            data = os.pread(t.fd, min(self.read_bytes, t.size - pos), pos)
            if not data:
                break
            chunks.append(data)
            pos += len(data)
            budget -= len(data)
        if not chunks:
            return False
        # copytruncate may have happened while we read: then some chunks hold the new content at old
        # offsets. Emit only what is verified as the old file; otherwise take it all from the copy.
        if os.fstat(t.fd).st_size < pos or not same_start(t.fd, t.fp, t.fp_len):
            self._handle_truncation(t, emit)
            return True
        for data in chunks:
            t.offset += len(data)
            self._emit(t, emit, t.framer.feed(data), t.offset - t.framer.pending)
        t.idle_since = time.monotonic()
        return True

    def _emit(self, t: Tailed, emit: Emit, frames: list[bytes], end: int) -> None:
        if not frames:
            return
        with self._lock:
            t.tracker.add(end, len(frames))
        tokens = [(t.fid, end)] * len(frames)
        self.emit_frames(emit, frames, stream=f"{t.dev}:{t.ino}", attributes={"path": t.path}, ack_tokens=tokens)

    def _truncated(self, t: Tailed, size: int) -> bool:
        return size < t.offset or (t.fp_len > 0 and size >= t.fp_len and not same_start(t.fd, t.fp, t.fp_len))

    def _handle_truncation(self, t: Tailed, emit: Emit) -> None:
        """copytruncate: finish the old content from the copy, then restart this file at 0."""
        resume = t.offset - t.framer.pending
        copy = self._find_copy(t, resume)
        if copy is not None:
            log.info("file %s: truncated; reading the rest of the old content from %s", t.path, copy.path)
        else:
            log.info("file %s: truncated; reading again from the start", t.path)
        with self._lock:
            del self._by_fid[t.fid]
            t.fid = next(_ids)
            self._by_fid[t.fid] = t
            t.tracker.reset(0)
        t.offset, t.size, t.framer = 0, 0, LineFramer(self.max_line)
        t.fp, t.fp_len = fingerprint(t.fd)
        self.store.set(t.checkpoint())
        if copy is not None:
            self._read(copy, emit)

    def _find_copy(self, t: Tailed, resume: int) -> Tailed | None:
        d = os.path.dirname(t.path) or "."
        with contextlib.suppress(OSError), os.scandir(d) as it:
            for entry in it:
                if entry.inode() == t.ino or not entry.is_file(follow_symlinks=False):
                    continue
                ident = _identity(entry)
                if ident is None or ident in self._files:
                    continue
                try:
                    fd = os.open(entry.path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    match = os.fstat(fd).st_size >= resume and same_start(fd, t.fp, t.fp_len)
                finally:
                    os.close(fd)
                if match:
                    copy = self._track(entry.path, 0, offset=resume)
                    if copy is not None:
                        copy.gone_since = time.monotonic()
                    return copy
        return None

    # ---- letting go ------------------------------------------------------------------------------
    def _release_idle(self, emit: Emit) -> None:
        now = time.monotonic()
        for key, t in list(self._files.items()):
            idle = t.gone_since is not None and now - max(t.gone_since, t.idle_since) >= self.rotate_wait
            if not t.released and idle and t.offset >= t.size:
                self._emit(t, emit, t.framer.flush(), t.size)  # a last line without newline is an entry too
                os.close(t.fd)
                t.released = True
                log.info("file %s (inode %d): read to its end and released", t.path, t.ino)
            if t.released and t.tracker.in_flight == 0:
                with self._lock:
                    del self._files[key]
                    del self._by_fid[t.fid]
                self.store.forget(t.dev, t.ino)
                clear_lag(t.path)

    def _commit(self, force: bool = False) -> None:
        with self._lock:
            for t in self._files.values():
                if t.released and t.tracker.in_flight == 0:
                    continue
                set_lag(t.path, t.size, t.tracker.committed)
                if t.saved != (t.tracker.committed, t.fp):
                    t.saved = (t.tracker.committed, t.fp)
                    self.store.set(t.checkpoint())
        self.store.save(force=force)


def _identity(entry: os.DirEntry[str]) -> tuple[int, int] | None:
    """(device, inode) of a directory entry; None when it vanished mid-scan (logrotate deleting
    an old generation), which must skip that entry only, not end the whole scan."""
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino
