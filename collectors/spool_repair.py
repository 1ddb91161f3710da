"""Offline check and repair of a spool directory (`logferry spool check|repair DIR`).

Both use the spool's own scanner, so they agree with the agent on what a damaged record is.
Repair keeps every intact record: a torn tail is truncated in place; damage inside a
segment means the segment is rewritten atomically with its intact records, and the ack
cursor is moved to the same record it pointed at.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

from logferry.collectors.fsutil import FILE_MODE, atomic_write
from logferry.collectors.spool import CURSOR_FILE, LOCK_FILE, Scanned, list_segments, read_cursor, scan
from logferry.errors import ConfigError


@dataclass(frozen=True)
class SegmentReport:
    name: str
    records: int
    bytes: int
    damaged_spans: int
    damaged_bytes: int
    torn_tail: bool  # the damage reaches the end of the file (a write cut short by a crash)


def check_segment(path: Path) -> tuple[SegmentReport, list[Scanned]]:
    size = path.stat().st_size
    with path.open("rb") as f:
        spans = list(scan(f, 0, size))
    good = [s for s in spans if s.payload is not None]
    bad = [s for s in spans if s.payload is None]
    report = SegmentReport(
        path.name, len(good), size, len(bad), sum(s.end - s.start for s in bad), bool(bad and bad[-1].end == size)
    )
    return report, spans


def check_spool(directory: Path) -> list[SegmentReport]:
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory")
    return [check_segment(path)[0] for _, path in list_segments(directory)]


def repair_spool(directory: Path) -> list[SegmentReport]:
    """Cut damaged spans out of every segment, keeping each intact record and the ack cursor's place.

    A torn tail is truncated in place; damage inside a segment means the segment is rewritten
    (tmp + fsync + rename) with its intact records. Refuses while an agent holds the spool.
    """
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory")
    lock = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"spool {directory} is in use by a running agent; stop it first") from None
        cursor = read_cursor(directory)
        reports = []
        for seq, path in list_segments(directory):
            report, spans = check_segment(path)
            reports.append(report)
            if not report.damaged_spans:
                continue
            good = [s for s in spans if s.payload is not None]
            if report.damaged_spans == 1 and report.torn_tail:
                with path.open("r+b") as f:
                    f.truncate(spans[-1].start)
                    os.fsync(f.fileno())
                continue
            new_cursor = 0
            with path.open("rb") as src:
                data = []
                for s in good:
                    src.seek(s.start)
                    data.append(src.read(s.end - s.start))
                    if seq == cursor.segment and s.end <= cursor.offset:
                        new_cursor += s.end - s.start
            atomic_write(path, b"".join(data))
            if seq == cursor.segment:
                atomic_write(directory / CURSOR_FILE, json.dumps({"segment": seq, "offset": new_cursor}).encode())
        return reports
    finally:
        os.close(lock)
