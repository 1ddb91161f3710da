"""A LogEntry Avro encoder specialised for the agent's hot path.

fastavro's schemaless_writer walks the schema for every record; the agent encodes one
fixed schema hundreds of thousands of times a second, with the same host, source,
service and level strings over and over. This encoder writes the same bytes (the tests
compare it with `default_codec().encode` on generated entries) while caching the
encoding of repeated strings and of the batch's receive time. If the schema file ever
changes (its fingerprint is no longer WRITTEN_FOR), `make_encoder` falls back to the codec.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from logferry.schemas import LogEntry, default_codec
from logferry.schemas.decode import WRITTEN_FOR

Encoder = Callable[[LogEntry], bytes]

_SMALL = [bytes([n]) for n in range(128)]
_CACHE_LIMIT = 4096


def zigzag(n: int) -> bytes:
    """Avro `long`: zig-zag, then base-128 varint."""
    n = (n << 1) ^ (n >> 63)
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_LENGTHS = [zigzag(n) for n in range(1 << 14)]  # the length prefix of any string up to 16 KiB


def string(s: str) -> bytes:
    b = s.encode()
    n = len(b)
    return (_LENGTHS[n] if n < 16384 else zigzag(n)) + b


class EntryEncoder:
    """Encodes LogEntry dicts exactly as the codec does. One instance per thread (its caches are not locked)."""

    def __init__(self) -> None:
        self._strings: dict[str, bytes] = {}
        self._optional: dict[str | None, bytes] = {None: b"\x00"}
        self._last_time: tuple[int | None, bytes] = (None, b"")

    def _cached(self, s: str) -> bytes:
        b = self._strings.get(s)
        if b is None:
            if len(self._strings) > _CACHE_LIMIT:
                self._strings.clear()
            b = self._strings[s] = string(s)
        return b

    def _cached_optional(self, s: str | None) -> bytes:
        b = self._optional.get(s)
        if b is None:
            if len(self._optional) > _CACHE_LIMIT:
                self._optional.clear()
                self._optional[None] = b"\x00"
            b = self._optional[s] = b"\x02" + string(s)  # type: ignore[arg-type]
        return b

    def _time(self, micros: int) -> bytes:
        last, b = self._last_time
        if micros != last:
            b = zigzag(micros)
            self._last_time = (micros, b)
        return b

    def __call__(self, e: LogEntry) -> bytes:
        return self.head(e) + string(e["message"]) + self.tail(e)

    def head(self, e: LogEntry) -> bytes:
        """The encoding of every field before `message`."""
        received = self._time(e["received_at"])
        ts = e["timestamp"]
        return b"".join((
            received if ts == e["received_at"] else zigzag(ts),
            received,
            self._cached(e["host"]),
            self._cached(e["source"]),
            self._cached_optional(e["service"]),
            self._cached_optional(e["level"]),
        ))  # fmt: skip

    def tail(self, e: LogEntry) -> bytes:
        """The encoding of every field after `message`."""
        parts = []
        attributes = e["attributes"]
        if attributes:
            parts.append(zigzag(len(attributes)))
            for k, v in attributes.items():
                parts.append(self._cached(k))
                parts.append(string(v))
        parts.append(b"\x00")
        pe = e["parse_error"]
        parts.append(b"\x00" if pe is None else b"\x02" + string(pe))
        raw = e["raw"]
        parts.append(b"\x00" if raw is None else b"\x02" + zigzag(len(raw)) + raw)
        return b"".join(parts)

    def messages(self, template: LogEntry, messages: Sequence[bytes]) -> list[bytes]:
        """Entries equal to `template` but for their message, given as UTF-8 bytes: the raw parser's
        batches, where one read's lines share every other field. Much cheaper than one call per entry."""
        head, tail, lengths = self.head(template), self.tail(template), _LENGTHS
        return [head + (lengths[n] if (n := len(m)) < 16384 else zigzag(n)) + m + tail for m in messages]


def make_encoder() -> Encoder:
    """The fast encoder when the schema is the one it was written for, else the generic codec."""
    codec = default_codec()
    if codec.fingerprint == WRITTEN_FOR:
        return EntryEncoder()
    return codec.encode
