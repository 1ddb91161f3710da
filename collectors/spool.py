"""The on-disk write-ahead spool behind the `spill` buffer policy.

Layout of a spool directory (0700, files 0600):

    0000000000000001.seg   segment files, appended in order, never rewritten by the agent
    cursor.json            the ack cursor {"segment", "offset"}: everything before it is in Kafka
    lock                   flock'd while an agent owns the spool (two agents never share one)

A record is an 18-byte header `<HIIq` (magic 0x4C46 "LF", payload length, CRC32 over length,
timestamp and payload, receive time in µs) followed by the payload. The magic
lets a reader resynchronise after a damaged region, so one flipped byte costs one record,
not the rest of the segment. Damaged regions are skipped and counted (SPOOL_CORRUPT);
nothing here raises on bad bytes.

Records leave the spool only when Kafka acknowledged them: `read` hands out records with
their `Position`, `ack` marks positions done (in any order), and the cursor advances over
the longest acknowledged prefix. A segment is deleted once the cursor passes its end; the
cursor file is rewritten atomically at most every `cursor_interval` seconds and before any
segment is deleted, so a crash re-delivers at most that window (at-least-once, bounded).
Memory stays flat: records are streamed from the files; only positions handed out and not
yet acknowledged are held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

from logferry.collectors.fsutil import FILE_MODE, atomic_write, fsync_dir, private_dir
from logferry.errors import ConfigError
from logferry.log import LogOnce
from logferry.metrics import ENTRIES_DROPPED, SPOOL_BYTES, SPOOL_CORRUPT, SPOOL_ENTRIES, SPOOL_OLDEST, SPOOL_SEGMENTS

log = logging.getLogger("logferry.spool")
_log_once = LogOnce(log)

MAGIC = 0x4C46
HEADER = struct.Struct("<HIIq")  # magic, payload length, crc32, received_at (µs)
_CRC_PART = struct.Struct("<Iq")
MAX_RECORD = 64 << 20
_DAMAGED = (
    -1
)  # in-flight marker for a skipped damaged span (no entry behind it)  # a length beyond this is damage, not data
SEGMENT_SUFFIX = ".seg"
CURSOR_FILE = "cursor.json"
LOCK_FILE = "lock"

FsyncPolicy = Literal["batch", "interval", "never"]
FullPolicy = Literal["block", "drop_oldest"]


class Position(NamedTuple):
    """Where a record ends: (segment number, byte offset just after the record)."""

    segment: int
    offset: int


class SpoolItem(NamedTuple):
    position: Position
    received_at: int
    payload: bytes


def encode_record(payload: bytes, received_at: int) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(len(payload), received_at)))
    return HEADER.pack(MAGIC, len(payload), crc, received_at) + payload


# ---- scanning: one routine for the reader, open, check and repair ---------------------------
class Scanned(NamedTuple):
    start: int
    end: int
    received_at: int
    payload: bytes | None  # None: bytes start..end are damaged and skipped


def scan(f: BinaryIO, start: int, end: int) -> Iterator[Scanned]:
    """Records of f between start and end (a known-complete length); damaged spans as payload None."""
    pos = start
    while pos < end:
        rec = _record_at(f, pos, end)
        if rec is not None:
            yield rec
            pos = rec.end
            continue
        nxt = _resync(f, pos + 1, end)
        yield Scanned(pos, nxt, 0, None)
        pos = nxt


def _record_at(f: BinaryIO, pos: int, end: int) -> Scanned | None:
    if end - pos < HEADER.size:
        return None
    f.seek(pos)
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    magic, length, crc, ts = HEADER.unpack(head)
    stop = pos + HEADER.size + length
    if magic != MAGIC or length > MAX_RECORD or stop > end:
        return None
    payload = f.read(length)
    if len(payload) != length or zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(length, ts))) != crc:
        return None
    return Scanned(pos, stop, ts, payload)


def _resync(f: BinaryIO, pos: int, end: int) -> int:
    """The next offset at which a valid record starts, or `end`."""
    magic = struct.pack("<H", MAGIC)
    while pos < end:
        f.seek(pos)
        chunk = f.read(min(1 << 16, end - pos))
        i = chunk.find(magic)
        while i >= 0:
            if _record_at(f, pos + i, end) is not None:
                return pos + i
            f.seek(pos + len(chunk))
            i = chunk.find(magic, i + 1)
        # keep one byte of overlap so a magic split across chunks is still found
        pos += max(1, len(chunk) - 1)
    return end


# ---- the spool ----------------------------------------------------------------------------
@dataclass
class _Segment:
    seq: int
    path: Path
    size: int = 0
    records: int = 0
    live: int = 0  # records not yet acknowledged


@dataclass(frozen=True)
class SpoolStats:
    segments: int
    entries: int
    bytes: int
    oldest: int | None  # received_at (µs) of the oldest unacknowledged record


class Spool:
    def __init__(
        self,
        directory: Path | str,
        *,
        max_bytes: int = 1 << 30,
        segment_bytes: int = 64 << 20,
        when_full: FullPolicy = "block",
        fsync: FsyncPolicy = "batch",
        fsync_interval: float = 1.0,
        cursor_interval: float = 0.2,
    ) -> None:
        if when_full not in ("block", "drop_oldest"):
            raise ConfigError(f"spool when_full {when_full!r}: expected 'block' or 'drop_oldest'")
        if fsync not in ("batch", "interval", "never"):
            raise ConfigError(f"spool fsync {fsync!r}: expected 'batch', 'interval' or 'never'")
        if segment_bytes > max_bytes // 2:
            raise ConfigError("spool segment_bytes must be at most half of max_bytes (drop_oldest frees segments)")
        self.dir = private_dir(Path(directory))
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.when_full = when_full
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.cursor_interval = cursor_interval
        self._cond = threading.Condition()
        self._closed = False
        self._lock_fd = self._take_lock()
        self._segments: dict[int, _Segment] = {}
        self._inflight: dict[Position, int] = {}  # handed out, in read order → received_at
        self._acked: set[Position] = set()
        self._entries = 0
        self._bytes = 0
        self._ack = Position(0, 0)
        self._cursor_saved_at = 0.0
        self._cursor_dirty = False
        self._last_sync = time.monotonic()
        self._unsynced = False
        self._open_existing()
        self._unread = self._entries
        self._read = self._ack
        self._reader: BinaryIO | None = None
        self._reader_seq = -1
        self._oldest_cache: tuple[Position | None, int | None] = (None, None)
        self._wfd = -1
        self._new_write_segment()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="spool-housekeeping", daemon=True)
        self._housekeeper.start()
        self._publish()

    # ---- opening and recovery ---------------------------------------------------------------
    def _take_lock(self) -> int:
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"spool {self.dir} is in use by another logferry process") from None
        return fd

    def _open_existing(self) -> None:
        self._ack = read_cursor(self.dir)
        for seq, path in list_segments(self.dir):
            if seq < self._ack.segment:  # fully acknowledged; a crash came between cursor write and unlink
                path.unlink(missing_ok=True)
                continue
            seg = _Segment(seq, path, size=path.stat().st_size)
            with path.open("rb") as f:
                for rec in scan(f, 0, seg.size):
                    if rec.payload is None:
                        continue
                    seg.records += 1
                    if seq > self._ack.segment or rec.end > self._ack.offset:
                        seg.live += 1
            self._segments[seq] = seg
            self._entries += seg.live
            self._bytes += seg.size
        if self._segments and self._ack.segment not in self._segments:
            self._ack = Position(min(self._segments), 0)
        if self._entries:
            log.info("spool %s: %d unacknowledged entries to deliver", self.dir, self._entries)

    def _new_write_segment(self) -> None:
        """Every open starts a fresh segment, so appends never follow a possibly torn tail."""
        if self._wfd >= 0:
            if self.fsync != "never":
                os.fsync(self._wfd)
            os.close(self._wfd)
        seq = max(self._segments, default=max(self._ack.segment, 0)) + 1
        path = self.dir / f"{seq:016d}{SEGMENT_SUFFIX}"
        self._wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, FILE_MODE)
        self._segments[seq] = _Segment(seq, path)
        if self.fsync != "never":
            fsync_dir(self.dir)
        if self._ack.segment == 0:
            self._ack = self._read = Position(seq, 0)
        self._wseq = seq

    # ---- writing ----------------------------------------------------------------------------
    def fits(self, payload: bytes) -> bool:
        """Whether a record of this payload can be stored at all (larger ones are dropped, counted)."""
        return HEADER.size + len(payload) <= min(MAX_RECORD, self.segment_bytes)

    def append(self, payloads: Sequence[bytes], received_at: Sequence[int] | int | None = None) -> int:
        """Write records durably (per the fsync policy); returns how many were stored."""
        if not payloads:
            return 0
        if received_at is None:
            received_at = time.time_ns() // 1000
        stamps = [received_at] * len(payloads) if isinstance(received_at, int) else received_at
        records = []
        for p, ts in zip(payloads, stamps, strict=True):
            if not self.fits(p):
                ENTRIES_DROPPED.labels(reason="spool_oversize").inc()
                continue
            records.append(encode_record(p, ts))
        with self._cond:
            stored = 0
            for batch in _chunks(records, self.segment_bytes):
                size = sum(map(len, batch))
                if not self._make_room(size):
                    break
                while True:
                    seg = self._segments[self._wseq]
                    if seg.size and seg.size + size > self.segment_bytes:
                        self._new_write_segment()
                        seg = self._segments[self._wseq]
                    if self._write_batch(seg, b"".join(batch)):
                        break
                    if not self._disk_full():
                        break
                if self._closed:  # closed while waiting for disk space: this batch was not stored
                    break
                seg.size += size
                seg.records += len(batch)
                seg.live += len(batch)
                self._entries += len(batch)
                self._unread += len(batch)
                self._bytes += size
                stored += len(batch)
                self._unsynced = True
            if self.fsync == "batch" and self._unsynced:
                self._sync_locked()
            self._reclaim()
            self._cond.notify_all()
            self._publish()
        return stored

    def _make_room(self, size: int) -> bool:
        while self._bytes + size > self.max_bytes:
            if self._closed:
                return False
            if self.when_full == "drop_oldest" and self._drop_oldest_segment():
                continue
            # block: wait for acknowledgements to free a segment (the sink keeps draining)
            self._cond.wait(0.5)
        return True

    def _write_batch(self, seg: _Segment, data: bytes) -> bool:
        """Append `data` to the write segment; False (and nothing of it kept) when the disk is full."""
        try:
            _write_all(self._wfd, data)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            os.ftruncate(self._wfd, seg.size)  # no torn batch stays behind (O_APPEND writes resume there)
            return False
        return True

    def _disk_full(self) -> bool:
        """ENOSPC before the spool's own cap: `when_full` applies as at the cap. False once closed."""
        _log_once.warning("enospc", "spool %s: no space left on the device; applying when_full=%s",
                          self.dir, self.when_full)  # fmt: skip
        if self._closed:
            return False
        if not (self.when_full == "drop_oldest" and len(self._segments) > 1 and self._drop_oldest_segment()):
            self._cond.wait(0.5)  # block: acknowledgements reclaim segments and free the disk
        return not self._closed

    def _drop_oldest_segment(self) -> bool:
        oldest = min(self._segments)
        if oldest == self._wseq:
            self._new_write_segment()  # the write segment alone fills the spool: seal it and drop it
        seg = self._segments.pop(oldest)
        handed_out = sum(1 for p, ts in self._inflight.items() if p.segment == oldest and ts != _DAMAGED)
        # Records already handed to the sink are still delivered from memory: only unread ones are lost.
        if seg.live - handed_out:
            ENTRIES_DROPPED.labels(reason="spool_full").inc(seg.live - handed_out)
            log.warning("spool %s full: dropped segment %d with %d unsent entries (%d more in flight)",
                        self.dir, seg.seq, seg.live - handed_out, handed_out)  # fmt: skip
        self._entries -= seg.live
        self._bytes -= seg.size
        self._unread -= seg.live - handed_out
        for pos in [p for p in self._inflight if p.segment == oldest]:
            del self._inflight[pos]
            self._acked.discard(pos)
        nxt = Position(min(self._segments), 0)
        if self._ack.segment <= oldest:
            self._ack = nxt
            self._save_cursor()
        if self._read.segment <= oldest:
            self._read = nxt
        if self._reader_seq == oldest and self._reader is not None:
            self._reader.close()
            self._reader, self._reader_seq = None, -1
        seg.path.unlink(missing_ok=True)
        return True

    def _sync_locked(self) -> None:
        os.fsync(self._wfd)
        self._last_sync = time.monotonic()
        self._unsynced = False

    def _housekeeping(self) -> None:
        """fsync=interval syncs here; an acknowledged prefix is saved even when acks stop coming."""
        period = min(self.cursor_interval or 0.2, self.fsync_interval if self.fsync == "interval" else 1.0)
        while True:
            with self._cond:
                if self._closed:
                    return
                self._cond.wait(max(period, 0.01))
                if self._closed:
                    return
                now = time.monotonic()
                if self.fsync == "interval" and self._unsynced and now - self._last_sync >= self.fsync_interval:
                    self._sync_locked()
                if self._cursor_dirty and now - self._cursor_saved_at >= self.cursor_interval:
                    self._save_cursor()

    # ---- reading and acknowledging ---------------------------------------------------------------
    def read(self, max_records: int = 1000, max_bytes: int = 1 << 20, timeout: float = 0.0) -> list[SpoolItem]:
        """Next records in append order (never the same one twice until `rewind`)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._closed:  # a closed spool hands nothing out (its files are closed)
                items = self._read_locked(max_records, max_bytes)
                left = deadline - time.monotonic()
                if items or left <= 0:
                    return items
                self._cond.wait(left)
            return []

    def _read_locked(self, max_records: int, max_bytes: int) -> list[SpoolItem]:
        items: list[SpoolItem] = []
        size = 0
        while len(items) < max_records and size < max_bytes:
            seg = self._segments.get(self._read.segment)
            if seg is None:
                return items
            if self._read.offset >= seg.size:
                later = [s for s in self._segments if s > seg.seq]
                if not later:
                    return items
                self._read = Position(min(later), 0)
                continue
            f = self._reader_for(seg)
            for rec in scan(f, self._read.offset, seg.size):
                self._read = Position(seg.seq, rec.end)
                if rec.payload is None:
                    SPOOL_CORRUPT.inc()
                    damaged = rec.end - rec.start
                    log.warning("spool %s: skipped %d damaged bytes in %s", self.dir, damaged, seg.path.name)
                    self._inflight[self._read] = _DAMAGED
                    self._acked.add(self._read)  # nothing to deliver: lets the cursor pass the damage
                    continue
                self._inflight[self._read] = rec.received_at
                self._unread -= 1
                items.append(SpoolItem(self._read, rec.received_at, rec.payload))
                size += len(rec.payload)
                if len(items) >= max_records or size >= max_bytes:
                    break
        return items

    def _reader_for(self, seg: _Segment) -> BinaryIO:
        if self._reader_seq != seg.seq or self._reader is None:
            if self._reader is not None:
                self._reader.close()
            self._reader = seg.path.open("rb")
            self._reader_seq = seg.seq
        return self._reader

    def ack(self, positions: Iterable[Position]) -> None:
        """Kafka acknowledged these records (any order); the cursor moves over the acked prefix."""
        with self._cond:
            if self._closed:  # late reports (a producer purge at shutdown) must not move the cursor
                return
            for p in positions:
                if p in self._inflight:
                    self._acked.add(p)
            moved = False
            while self._inflight:
                head = next(iter(self._inflight))
                if head not in self._acked:
                    break
                ts = self._inflight.pop(head)
                self._acked.discard(head)
                seg = self._segments.get(head.segment)
                if ts != _DAMAGED and seg is not None:
                    seg.live -= 1
                    self._entries -= 1
                self._ack = head
                moved = True
            if moved:
                self._reclaim()
                self._cursor_dirty = True
                if time.monotonic() - self._cursor_saved_at >= self.cursor_interval:
                    self._save_cursor()
                self._cond.notify_all()
                self._publish()

    def _reclaim(self) -> None:
        """Delete segments the cursor has passed (cursor saved first, so a crash never resurrects them)."""
        cur = self._segments.get(self._ack.segment)
        if cur is not None and cur.seq != self._wseq and self._ack.offset >= cur.size:
            self._ack = Position(min(s for s in self._segments if s > cur.seq), 0)
        done = [seg for seq, seg in self._segments.items() if seq < self._ack.segment]
        if not done:
            return
        self._save_cursor()
        for seg in done:
            del self._segments[seg.seq]
            self._bytes -= seg.size
            if self._reader_seq == seg.seq and self._reader is not None:
                self._reader.close()
                self._reader, self._reader_seq = None, -1
            seg.path.unlink(missing_ok=True)
        if self._read < self._ack:
            self._read = self._ack

    def rewind(self) -> None:
        """Hand out every unacknowledged record again (after the sink lost its in-flight batch)."""
        with self._cond:
            self._inflight.clear()
            self._acked.clear()
            self._read = self._ack
            self._unread = self._entries

    def _save_cursor(self) -> None:
        try:
            atomic_write(self.dir / CURSOR_FILE, json.dumps({"segment": self._ack[0], "offset": self._ack[1]}).encode())
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            # Disk full: reclaiming segments is what frees it. A crash before the next save
            # only re-sends acknowledged records (the open falls back to the oldest segment).
            _log_once.warning("cursor-enospc", "spool %s: cursor not saved (no space left); retried later", self.dir)
            return
        self._cursor_saved_at = time.monotonic()
        self._cursor_dirty = False

    # ---- state ------------------------------------------------------------------------------
    def stats(self) -> SpoolStats:
        with self._cond:
            return SpoolStats(len(self._segments), self._entries, self._bytes, self._oldest_locked())

    @property
    def pending(self) -> int:
        """Records appended and not yet acknowledged."""
        return self._entries

    @property
    def unread_count(self) -> int:
        """Records appended and not yet handed out by `read`."""
        return self._unread

    def unread(self) -> bool:
        with self._cond:
            seg = self._segments.get(self._read.segment)
            return bool(seg and (self._read.offset < seg.size or any(s > seg.seq for s in self._segments)))

    def _oldest_locked(self) -> int | None:
        for pos, ts in self._inflight.items():
            if ts != _DAMAGED and pos not in self._acked:
                return ts
        if self._entries == 0:
            return None
        if self._oldest_cache[0] != self._read:
            self._oldest_cache = (self._read, self._peek_received_at())
        return self._oldest_cache[1]

    def _peek_received_at(self) -> int | None:
        for seq in sorted(s for s in self._segments if s >= self._read.segment):
            seg = self._segments[seq]
            start = self._read.offset if seq == self._read.segment else 0
            if start < seg.size:
                with seg.path.open("rb") as f:
                    for rec in scan(f, start, seg.size):
                        if rec.payload is not None:
                            return rec.received_at
        return None

    def _publish(self) -> None:
        SPOOL_SEGMENTS.set(len(self._segments))
        SPOOL_ENTRIES.set(self._entries)
        SPOOL_BYTES.set(self._bytes)
        oldest = self._oldest_locked() if self._entries else None
        SPOOL_OLDEST.set(oldest / 1e6 if oldest else 0)

    def flush(self) -> None:
        with self._cond:
            if self._unsynced and self.fsync != "never":
                self._sync_locked()
            if self._cursor_dirty:
                self._save_cursor()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            if self._unsynced:
                self._sync_locked()  # a clean shutdown always leaves the data on disk
            if self._cursor_dirty:
                self._save_cursor()
            self._closed = True
            self._cond.notify_all()
            os.close(self._wfd)
            if self._reader is not None:
                self._reader.close()
            seg = self._segments.get(self._wseq)
            if seg is not None and seg.size == 0:  # leave no empty segment behind; the next open starts its own
                del self._segments[self._wseq]
                seg.path.unlink(missing_ok=True)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _chunks(records: list[bytes], limit: int) -> Iterator[list[bytes]]:
    """Group records so no group exceeds one segment (a group never straddles two files)."""
    batch: list[bytes] = []
    size = 0
    for r in records:
        if batch and size + len(r) > limit:
            yield batch
            batch, size = [], 0
        batch.append(r)
        size += len(r)
    if batch:
        yield batch


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for p in directory.iterdir():
        if p.suffix == SEGMENT_SUFFIX and p.stem.isdigit():
            out.append((int(p.stem), p))
    return sorted(out)


def read_cursor(directory: Path) -> Position:
    """The saved ack cursor; a missing or unreadable cursor means 'from the first segment'."""
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        data = json.loads((directory / CURSOR_FILE).read_text())
        return Position(int(data["segment"]), int(data["offset"]))
    return Position(0, 0)
