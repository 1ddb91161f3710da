"""Built-in processors users need on day one: `stats`, `archive`, `forward`.

Each is a handler factory returning `handler(entry, ctx)`; like any handler, it returns
only when its work is durable enough to commit past it.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from logferry.kafka import KafkaSettings, close_producer
from logferry.metrics import ENTRIES_BY_SERVICE
from logferry.processors.config import ArchiveSettings, FilterSettings, ForwardSettings
from logferry.processors.context import Context
from logferry.processors.filtering import EntryFilter

Handler = Callable[[dict[str, Any], Context], None]


# ---- stats --------------------------------------------------------------------------------
def stats(group: str) -> Handler:
    """Count entries by service and level (`logferry_processor_entries_by_service_total`)."""
    children: dict[tuple[str, str], Any] = {}

    def handle(entry: dict[str, Any], ctx: Context) -> None:
        key = (entry.get("service") or "-", entry.get("level") or "-")
        child = children.get(key)
        if child is None:
            child = children.setdefault(key, ENTRIES_BY_SERVICE.labels(group, *key))
        child.inc()

    return handle


# ---- archive ------------------------------------------------------------------------------
def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot archive a {type(value).__name__}")


class Archive:
    """Hourly gzip'd JSON-lines files: `<dir>/<topic>/<YYYY-MM-DD>/<HH>/p<partition>-<start>-<pid>.jsonl.gz`.

    Safe across restarts: a process never appends to a file it did not create (a new
    segment per process and hour), and every entry is sync-flushed before the handler
    returns, so a crash loses nothing that was committed; `read_archive` reads a segment a
    crash left without its gzip trailer. Re-handled entries after a crash are duplicates
    that carry the same `_kafka` coordinates.
    """

    MAX_OPEN = 64

    def __init__(self, settings: ArchiveSettings) -> None:
        self.root = Path(settings.directory)
        self.level = settings.compresslevel
        self._files: dict[tuple[str, int, str], gzip.GzipFile] = {}
        self._lock = threading.Lock()
        self._started = time.strftime("%Y%m%dT%H%M%S", time.gmtime())

    def _hour(self, entry: dict[str, Any]) -> datetime:
        ts = entry.get("timestamp")
        return ts.astimezone(UTC) if isinstance(ts, datetime) else datetime.now(UTC)

    def _file(self, topic: str, partition: int, hour: datetime) -> gzip.GzipFile:
        key = (topic, partition, hour.strftime("%Y-%m-%d/%H"))
        f = self._files.get(key)
        if f is None:
            if len(self._files) >= self.MAX_OPEN:  # the oldest hours are finished: close them
                for old in sorted(self._files)[: len(self._files) // 2]:
                    self._files.pop(old).close()
            folder = self.root / topic / key[2]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"p{partition}-{self._started}-{os.getpid()}.jsonl.gz"
            f = self._files[key] = gzip.GzipFile(path, "ab", compresslevel=self.level)
        return f

    def __call__(self, entry: dict[str, Any], ctx: Context) -> None:
        record = dict(entry, _kafka={"topic": ctx.topic, "partition": ctx.partition, "offset": ctx.offset})
        line = json.dumps(record, default=_json_default, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            f = self._file(ctx.topic, ctx.partition, self._hour(entry))
            f.write(line)
            f.flush(zlib.Z_SYNC_FLUSH)  # in the OS before we return, so committing past it is safe

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


def read_archive(path: str | Path) -> Iterator[dict[str, Any]]:
    """Entries of one archive file, including a segment whose writer died before closing it."""
    d = zlib.decompressobj(wbits=31)
    data = Path(path).read_bytes()
    out = bytearray()
    while data:
        out += d.decompress(data)
        data = d.unused_data  # a closed segment may be followed by another gzip member
        if data:
            d = zlib.decompressobj(wbits=31)
    for line in bytes(out).splitlines():
        if line:
            yield json.loads(line)


# ---- forward ------------------------------------------------------------------------------
class Forward:
    """Copy matching entries (their original bytes and headers) to another topic; done on Kafka's ack."""

    def __init__(self, settings: ForwardSettings, kafka: KafkaSettings) -> None:
        self.topic = settings.topic
        self.filter = EntryFilter(settings.filter)
        self.producer = Producer(kafka.client_config(**{"enable.idempotence": True, "linger.ms": 5}))
        self._stop = threading.Event()
        # Delivery callbacks need someone polling; handlers just wait for theirs.
        self._poller = threading.Thread(target=self._poll, name="forward-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    def __call__(self, entry: dict[str, Any], ctx: Context) -> None:
        if not self.filter(entry):
            return
        acked = threading.Event()
        result: list[KafkaError | None] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            result.append(err)
            acked.set()

        self.producer.produce(self.topic, value=ctx.value, key=ctx.key, headers=ctx.headers, on_delivery=delivered)
        acked.wait()
        if result[0] is not None:
            raise RuntimeError(f"forward to {self.topic} failed: {result[0]}")  # retried, then dead-lettered

    def close(self) -> None:
        self._stop.set()
        self._poller.join(1)
        close_producer(self.producer, 10)


def make_builtin(
    name: str, group: str, kafka: KafkaSettings, archive: ArchiveSettings | None, forward: ForwardSettings | None
) -> Handler:
    if name == "stats":
        return stats(group)
    if name == "archive":
        if archive is None:
            raise ValueError("the archive built-in needs a directory")
        return Archive(archive)
    if name == "forward":
        if forward is None:
            raise ValueError("the forward built-in needs a topic")
        return Forward(forward, kafka)
    raise ValueError(f"unknown built-in {name!r}: expected stats, archive or forward")


__all__ = ["Archive", "FilterSettings", "Forward", "make_builtin", "read_archive", "stats"]
