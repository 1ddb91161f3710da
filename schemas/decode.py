"""A LogEntry Avro decoder specialised for processors' hot path.

fastavro's schemaless_reader takes ~7 µs for one LogEntry, most of a processor's CPU per record:
it walks the schema for every record and builds two datetimes. This decoder reads the fields of
the one schema it was written for in order, and keeps the datetimes of recent timestamps (one
read of a collector's source shares a receive time). It returns what fastavro returns (the tests
compare the two on generated entries and on arbitrary bytes). Whatever it cannot read the plain
way (a negative length, a non-canonical union index, a value past the end, a value that is not
bytes such as a tombstone's None) goes to fastavro, so bad input fails exactly as it did. Bytes
after the last field are ignored, as fastavro ignores them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

LogEntry = dict[str, Any]
# CRC-64-AVRO of the Parsing Canonical Form (field names, types, order) of the schema both
# hand-written codecs (this decoder, collectors/encode.py) were written for.
WRITTEN_FOR = "b1a76d464aefe4bf"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # fastavro's timestamp-micros: epoch + timedelta(microseconds=n)
_CACHE_LIMIT = 4096


class _Unusual(Exception):
    """The input needs fastavro's reading (or its error)."""


def _long(v: bytes, p: int) -> tuple[int, int]:
    """Avro `long` at p: base-128 varint, then zig-zag. Returns (value, position after it)."""
    b = v[p]
    p += 1
    n, shift = b & 0x7F, 7
    while b & 0x80:
        b = v[p]
        p += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), p


class EntryDecoder:
    """Decodes LogEntry bodies written with the schema of `WRITTEN_FOR`; `fallback` decodes anything unusual.

    Safe to share between threads: the caches only ever map a key to the same value."""

    def __init__(self, fallback: Callable[[bytes], LogEntry]) -> None:
        self._fallback = fallback
        self._times: dict[bytes, datetime] = {}

    def __call__(self, value: bytes) -> LogEntry:
        try:
            return self._read(value)
        except Exception:  # _Unusual, IndexError, UnicodeDecodeError, OverflowError, TypeError (not bytes)
            return self._fallback(value)

    def _time(self, v: bytes, p: int) -> tuple[datetime, int]:
        key = v[p : p + 8]  # a timestamp of this century is an 8-byte varint
        t = self._times.get(key)
        if t is not None:
            return t, p + 8
        x = int.from_bytes(key, "little")
        if x & 0x8080808080808080 != 0x0080808080808080 or len(key) != 8:  # not an 8-byte varint
            n, end = _long(v, p)
            return EPOCH + timedelta(0, 0, n), end
        # The varint's eight 7-bit groups packed into one 56-bit number: a few int operations
        # instead of a Python loop over the bytes.
        x &= 0x7F7F7F7F7F7F7F7F
        x = (x & 0x007F007F007F007F) | ((x & 0x7F007F007F007F00) >> 1)
        x = (x & 0x00003FFF00003FFF) | ((x & 0x3FFF00003FFF0000) >> 2)
        x = (x & 0x000000000FFFFFFF) | ((x & 0x0FFFFFFF00000000) >> 4)
        t = EPOCH + timedelta(0, 0, (x >> 1) ^ -(x & 1))
        if len(self._times) >= _CACHE_LIMIT:
            self._times.clear()
        self._times[key] = t
        return t, p + 8

    @staticmethod
    def _bytes(v: bytes, p: int) -> tuple[bytes, int]:
        n = v[p]
        if n < 0x80:  # the usual one-byte length (under 64)
            if n & 1:
                raise _Unusual  # negative
            n >>= 1
            p += 1
        else:
            n, p = _long(v, p)
            if n < 0:
                raise _Unusual
        end = p + n
        if end > len(v):
            raise _Unusual  # slicing would stop short where fastavro fails
        return v[p:end], end

    def _optional(self, v: bytes, p: int) -> tuple[str | None, int]:
        branch = v[p]
        if branch == 0:
            return None, p + 1
        if branch != 2:
            raise _Unusual
        s, p = self._bytes(v, p + 1)
        return s.decode(), p

    def _map(self, v: bytes, p: int, into: dict[str, str]) -> int:
        while True:
            count, p = _long(v, p)
            if count == 0:
                return p
            if count < 0:  # a block that states its byte size too
                count = -count
                _, p = _long(v, p)
            for _ in range(count):
                k, p = self._bytes(v, p)
                val, p = self._bytes(v, p)
                into[k.decode()] = val.decode()

    def _read(self, v: bytes) -> LogEntry:
        text, optional = self._bytes, self._optional
        timestamp, p = self._time(v, 0)
        received_at, p = self._time(v, p)
        host, p = text(v, p)
        source, p = text(v, p)
        service, p = optional(v, p)
        level, p = optional(v, p)
        message, p = text(v, p)
        attributes: dict[str, str] = {}
        if v[p]:
            p = self._map(v, p, attributes)
        else:
            p += 1
        parse_error, p = optional(v, p)
        branch = v[p]
        if branch == 0:
            raw = None
        elif branch == 2:
            raw, p = text(v, p + 1)
        else:
            raise _Unusual
        return {
            "timestamp": timestamp, "received_at": received_at, "host": host.decode(), "source": source.decode(),
            "service": service, "level": level, "message": message.decode(), "attributes": attributes,
            "parse_error": parse_error, "raw": raw,
        }  # fmt: skip
