"""The `spill` buffer policy: the disk spool as a write-ahead log in front of the Kafka sink.

With `buffer.policy = "spill"` every record is appended to the spool (durable per the
fsync policy) before the source reads on; the in-memory buffer only holds records read
back from the spool. A record carries its spool position through the sink, and the spool
lets it go only when Kafka acknowledged it, so a crash at any moment loses nothing that
was appended and synced. The source's own ack token travels along (JSON in the record) so
a file source still gets its acknowledgements in this process.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from logferry.collectors.buffer import UNDELIVERED, BufferClosed, Record
from logferry.collectors.fsutil import default_state_dir
from logferry.collectors.spool import Position, Spool
from logferry.config import StrictModel
from logferry.log import LogOnce

if TYPE_CHECKING:
    from logferry.collectors.config import AgentConfig

log = logging.getLogger("logferry.spill")

# The sink routes acknowledgements by source name; spooled records are acknowledged to the spool.
SPOOL_SOURCE = "\x00spool"
_FIXED = struct.Struct("<qHiIHI")  # timestamp ms, topic len, key len (-1: none), value len, source len, token len
AckCallback = Callable[[Sequence[Any]], None]


class SpoolSettings(StrictModel):
    """The `[spool]` table: the disk spool behind `buffer.policy = "spill"` (lives in <state_dir>/spool)."""

    max_bytes: int = Field(1 << 30, ge=1 << 20)
    segment_bytes: int = Field(64 << 20, ge=64 << 10)
    when_full: Literal["block", "drop_oldest"] = "block"
    # batch: fsync before a source's read counts as received (default: no acknowledged entry is ever lost);
    # interval: at most fsync_interval_ms of entries at risk on power loss; never: the OS decides.
    fsync: Literal["batch", "interval", "never"] = "batch"
    fsync_interval_ms: int = Field(1000, ge=1)


def encode(r: Record) -> bytes:
    topic, key, value, ts, source, token = r
    t, s = topic.encode(), source.encode()
    tok = b"" if token is None else json.dumps(token, separators=(",", ":")).encode()
    head = _FIXED.pack(ts, len(t), -1 if key is None else len(key), len(value), len(s), len(tok))
    return b"".join((head, t, key or b"", value, s, tok))


def decode(payload: bytes) -> Record:
    ts, nt, nk, nv, ns, ntok = _FIXED.unpack_from(payload)
    pos = _FIXED.size
    topic = payload[pos : pos + nt].decode()
    pos += nt
    key = None if nk < 0 else payload[pos : pos + nk]
    pos += max(nk, 0)
    value = payload[pos : pos + nv]
    pos += nv
    source = payload[pos : pos + ns].decode()
    pos += ns
    token = _tuples(json.loads(payload[pos : pos + ntok])) if ntok else None
    return (topic, key, value, ts, source, token)


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


class SpoolSpill:
    """Implements the buffer's Spill protocol on a Spool, write-ahead (every record goes through disk)."""

    write_ahead = True

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._acks: dict[str, AckCallback] = {}
        self._log_once = LogOnce(log)
        self._closed = False
        self.unstored = 0  # entries offered while or after the spool closed: counted as undelivered

    def attach(self, sink: Any, acks: dict[str, AckCallback]) -> None:
        """Route the sink's acknowledgements of spooled records here; forward sources' tokens to them.
        `acks` is the agent's own mapping, kept up to date as sources start and stop (SIGHUP)."""
        self._acks = acks
        sink.set_ack(SPOOL_SOURCE, self.delivered)

    def spill(self, records: Sequence[Record]) -> None:
        if self._closed:
            self._unstored(len(records))
        payloads = [encode(r) for r in records]
        stored = self.spool.append(payloads, [r[3] * 1000 for r in records])
        if stored < len(payloads) and self._closed:  # closed while this append waited for room
            storable = sum(map(self.spool.fits, payloads))  # oversize ones the spool counted already
            if storable > stored:
                self._unstored(storable - stored)

    def _unstored(self, n: int) -> None:
        """The spool closed (shutdown) before these entries were written: counted, never silent."""
        self.unstored += n
        UNDELIVERED.inc(n)
        log.warning("spool closed: %d entr(y/ies) read from a source were not stored and are not delivered", n)
        raise BufferClosed

    def refill(self, max_entries: int, max_bytes: int) -> list[Record]:
        out: list[Record] = []
        for item in self.spool.read(max_entries, max_bytes):
            try:
                topic, key, value, ts, source, token = decode(item.payload)
            except (struct.error, UnicodeDecodeError, ValueError) as e:  # checksum passed, format did not: a bug
                self._log_once.warning("undecodable", "spool record undecodable (%s); skipped", e)
                self.spool.ack([item.position])
                continue
            out.append((topic, key, value, ts, SPOOL_SOURCE, (item.position, source, token)))
        return out

    def pending(self) -> int:
        return self.spool.unread_count

    def delivered(self, tokens: Sequence[Any]) -> None:
        self.spool.ack(Position(*t[0]) for t in tokens)
        forward: dict[str, list[Any]] = defaultdict(list)
        for _, source, token in tokens:
            if token is not None:
                forward[source].append(token)
        for source, toks in forward.items():
            cb = self._acks.get(source)
            if cb is not None:
                cb(toks)

    def close(self) -> None:
        self._closed = True  # before the spool closes: an append it cuts short sees it
        self.spool.close()


def spool_dir(config: AgentConfig) -> Path:
    return Path(config.agent.state_dir or default_state_dir()) / "spool"


def make_spill(config: AgentConfig) -> SpoolSpill:
    s = config.spool
    spool = Spool(
        spool_dir(config),
        max_bytes=s.max_bytes,
        segment_bytes=s.segment_bytes,
        when_full=s.when_full,
        fsync=s.fsync,
        fsync_interval=s.fsync_interval_ms / 1000,
    )
    return SpoolSpill(spool)
