"""Splitting byte streams into frames: newline-delimited, and RFC 6587 octet counting.

Both framers are incremental (feed chunks as they arrive) and bounded: a frame longer
than `max_bytes` is cut at the limit and the rest of it discarded up to the next
delimiter, so a client sending a never-ending line cannot grow memory. Cut frames are
counted in `truncated`.
"""

from __future__ import annotations

import re

DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB, like Vector's and Fluent Bit's defaults for line length
_OCTET_HEADER = re.compile(rb"([1-9][0-9]{0,8}) ")


class LineFramer:
    """Newline-delimited frames; a trailing '\\r' is dropped; empty lines are skipped."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_FRAME) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._discarding = False
        self.truncated = 0

    def feed(self, data: bytes) -> list[bytes]:
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return []
            self._discarding = False
            data = data[nl + 1 :]
        pending = self._buf
        parts = data.split(b"\n")
        tail = parts.pop()
        if pending:
            if parts:
                parts[0] = bytes(pending) + parts[0]
                pending.clear()
            else:  # still no newline: the whole read belongs to the pending line
                tail = bytes(pending) + tail
                pending.clear()
        no_cr = not parts or (b"\r" not in data and b"\r" not in parts[0])
        # A read smaller than the limit cannot hold an over-long line (no per-line length check).
        short = not parts or len(data) + len(parts[0]) <= self.max_bytes or max(map(len, parts)) <= self.max_bytes
        # The common case runs at C speed with no per-line call: only empty lines are left out.
        frames = list(filter(None, parts)) if no_cr and short else [self._trim(p) for p in parts if p and p != b"\r"]
        # A pending line may be one byte over the limit when that byte is a '\r' its '\n' will strip.
        if len(tail) > self.max_bytes + (tail[-1:] == b"\r"):
            frames.append(tail[: self.max_bytes])
            self.truncated += 1
            self._discarding = True
        else:
            pending += tail
        return frames

    def _trim(self, line: bytes) -> bytes:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_bytes:
            self.truncated += 1
            return line[: self.max_bytes]
        return line

    def flush(self) -> list[bytes]:
        """At end of stream: the last line had no newline; it is still an entry."""
        rest, self._buf = bytes(self._buf), bytearray()
        self._discarding = False
        line = self._trim(rest)  # same rule as a line with its newline: "\r\r" is "\r", "\r" is nothing
        return [line] if line else []

    @property
    def pending(self) -> int:
        return len(self._buf)


class OctetFramer:
    """RFC 6587 framing with auto-detection per frame, as rsyslog's imptcp does.

    A frame that starts with `LEN SP` is octet counted; anything else is newline
    delimited. Syslog over TCP mixes both in the wild; a log line that merely starts
    with digits ("2026-11-20 ...") has no `LEN SP` header and stays a line.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_FRAME) -> None:
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self._skip = 0  # bytes still to discard of an oversized octet-counted frame
        self._lines = LineFramer(max_bytes)
        self._octet_truncated = 0

    def feed(self, data: bytes) -> list[bytes]:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._buf += data
        frames: list[bytes] = []
        buf = self._buf
        pos = 0
        while pos < len(buf):
            if self._lines.pending or self._lines._discarding:
                pos = self._feed_line(buf, pos, frames)
                continue
            m = _OCTET_HEADER.match(buf, pos)
            if m is None:
                if buf[pos : pos + 10].isdigit() and len(buf) - pos < 11:
                    break  # maybe an incomplete header: wait for more bytes
                pos = self._feed_line(buf, pos, frames)
                continue
            length = int(m.group(1))
            start = m.end()
            if length > self.max_bytes:
                available = len(buf) - start
                if available < self.max_bytes:
                    break
                frames.append(bytes(buf[start : start + self.max_bytes]))
                self._octet_truncated += 1
                consumed = min(length, available)
                self._skip = length - consumed
                pos = start + consumed
                continue
            if len(buf) - start < length:
                break
            frame = bytes(buf[start : start + length]).rstrip(b"\n")
            if frame:
                frames.append(frame)
            pos = start + length
        del buf[:pos]
        return frames

    def _feed_line(self, buf: bytearray, pos: int, frames: list[bytes]) -> int:
        nl = buf.find(b"\n", pos)
        end = len(buf) if nl < 0 else nl + 1
        frames += self._lines.feed(bytes(buf[pos:end]))
        return end

    def flush(self) -> list[bytes]:
        """At end of stream: a partial line is an entry; a partial octet frame is a half-frame."""
        frames = self._lines.flush()
        half = bool(self._buf) and _OCTET_HEADER.match(self._buf) is not None
        if self._buf and not half:
            frames += self._lines.feed(bytes(self._buf)) + self._lines.flush()
        self._buf.clear()
        return frames

    @property
    def truncated(self) -> int:
        """Frames cut at max_bytes, octet-counted and newline-delimited together."""
        return self._octet_truncated + self._lines.truncated

    @property
    def has_half_frame(self) -> bool:
        return bool(self._buf) and _OCTET_HEADER.match(self._buf) is not None
