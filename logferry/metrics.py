"""Every Prometheus metric logferry exports, and the /metrics, /healthz, /readyz server.

One module so that the dashboards and alert rules in dashboards/ have one contract to
read. Names use the `logferry_` prefix, base units (seconds, bytes) and `_total` for
counters. Label values are bounded: source names, topics, groups, partitions, reasons.
"""

from __future__ import annotations

import logging
import socket
import threading
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, Info, generate_latest

from logferry.errors import ConfigError

log = logging.getLogger("logferry.metrics")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 10, 50, 100, 500, 1000, 5000, 10000, 50000)

BUILD_INFO = Info("logferry_build", "logferry version and role of this process")

# ---- collector agent ----------------------------------------------------------------------
SOURCE_ENTRIES = Counter("logferry_source_entries_received_total", "Entries read from a source", ["source", "kind"])
SOURCE_BYTES = Counter("logferry_source_bytes_received_total", "Bytes read from a source", ["source", "kind"])
SOURCE_ERRORS = Counter(
    "logferry_source_errors_total", "Source-level problems (bad frames, vanished clients, I/O errors)",
    ["source", "kind", "reason"],
)  # fmt: skip
PARSE_FAILURES = Counter(
    "logferry_parse_failures_total", "Entries the parser could not parse (kept as raw with parse_error)",
    ["source", "parser"],
)  # fmt: skip
ENTRIES_DROPPED = Counter(
    "logferry_entries_dropped_total", "Entries deliberately dropped, by reason (filtered, buffer_full, oversize, ...)",
    ["reason"],
)  # fmt: skip
ENTRIES_TRUNCATED = Counter(
    "logferry_entries_truncated_total", "Entries cut to fit Kafka's max message size (attribute `truncated`)",
    ["source"],
)  # fmt: skip
BUFFER_ENTRIES = Gauge("logferry_buffer_entries", "Entries waiting in the agent's buffer")
BUFFER_BYTES = Gauge("logferry_buffer_bytes", "Bytes waiting in the agent's buffer")
BUFFER_LIMIT_ENTRIES = Gauge("logferry_buffer_limit_entries", "Configured buffer limit in entries")
BUFFER_LIMIT_BYTES = Gauge("logferry_buffer_limit_bytes", "Configured buffer limit in bytes")
SOURCE_BLOCKED_SECONDS = Counter(
    "logferry_buffer_blocked_seconds_total", "Time sources spent waiting on a full buffer (block policy)"
)
SINK_BATCH = Histogram(
    "logferry_sink_batch_entries", "Entries handed to the Kafka producer per batch", buckets=BATCH_BUCKETS
)
DELIVERED = Counter("logferry_entries_delivered_total", "Entries Kafka acknowledged", ["topic"])
DELIVERED_BYTES = Counter("logferry_bytes_delivered_total", "Record value bytes Kafka acknowledged", ["topic"])
DELIVERY_FAILURES = Counter("logferry_delivery_failures_total", "Entries Kafka refused for good", ["topic", "reason"])
DELIVERY_LATENCY = Histogram(
    "logferry_delivery_latency_seconds", "From receipt at a source to Kafka's acknowledgement",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
KAFKA_CONNECTED = Gauge("logferry_kafka_connected", "1 while the producer has a usable broker connection")
LAST_DELIVERY = Gauge(
    "logferry_last_delivery_timestamp_seconds",
    "Unix time of the last acknowledged delivery (stall detection)",
)
SPOOL_BYTES = Gauge("logferry_spool_bytes", "Bytes in the on-disk spool")
SPOOL_SEGMENTS = Gauge("logferry_spool_segments", "Segment files in the on-disk spool")
SPOOL_ENTRIES = Gauge("logferry_spool_entries", "Entries in the on-disk spool not yet acknowledged by Kafka")
SPOOL_OLDEST = Gauge("logferry_spool_oldest_entry_timestamp_seconds", "Receive time of the oldest spooled entry")
SPOOL_CORRUPT = Counter("logferry_spool_corrupt_records_total", "Spool records skipped for a bad checksum")
CHECKPOINT_LAG = Gauge(
    "logferry_checkpoint_lag_bytes",
    "Bytes of a tailed file read or unread but not yet checkpointed",
    ["path"],
)
CHECKPOINT_LAST = Gauge("logferry_checkpoint_last_timestamp_seconds", "Unix time of the last checkpoint write")
SHM_OVERWRITES = Counter(
    "logferry_shm_overwrites_total", "Shared-memory ring slots a writer overwrote before they were read",
    ["source"],
)  # fmt: skip

# ---- processors ---------------------------------------------------------------------------
_G = ["group", "topic"]
CONSUMED = Counter("logferry_processor_consumed_total", "Records fetched from Kafka", _G)
PROCESSED = Counter("logferry_processor_processed_total", "Records the handler finished", _G)
FILTERED = Counter("logferry_processor_filtered_total", "Records skipped by the filter (committed, no work)", _G)
FAILED = Counter("logferry_processor_failed_total", "Handler calls that raised", _G)
RETRIED = Counter("logferry_processor_retries_total", "Retries scheduled (in place or via retry topics)", _G)
DEAD_LETTERED = Counter(
    "logferry_processor_dead_lettered_total", "Records sent to the dead-letter topic", [*_G, "reason"]
)
DEAD_LETTER_SEND_FAILURES = Counter(
    "logferry_processor_dead_letter_send_failures_total",
    "Dead-letter or retry-topic sends Kafka refused; each is sent again with back-off", ["group", "kind", "error"],
)  # fmt: skip
DEAD_LETTER_STALLED = Gauge(
    "logferry_processor_dead_letter_stalled",
    "Records whose dead-letter or retry-topic copy is being sent again; their partitions pause and stop committing",
    ["group"],
)  # fmt: skip
HANDLER_SECONDS = Histogram(
    "logferry_processor_handler_duration_seconds", "Time inside the handler per record", ["group"],
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
IN_FLIGHT = Gauge("logferry_processor_in_flight", "Records fetched but not yet finished", ["group"])
PAUSED_PARTITIONS = Gauge("logferry_processor_paused_partitions", "Partitions paused for backpressure", ["group"])
REBALANCES = Counter("logferry_processor_rebalances_total", "Partition assignment changes", ["group", "kind"])
COMMITTED_OFFSET = Gauge(
    "logferry_processor_committed_offset", "Last committed offset", ["group", "topic", "partition"]
)
LAG = Gauge("logferry_processor_lag", "Log end offset minus committed offset", ["group", "topic", "partition"])
TXN_COMMIT_RETRIES = Counter(
    "logferry_processor_transaction_commit_retries_total",
    "Exactly-once commits that timed out (outcome unknown) and were committed again", ["group"],
)  # fmt: skip
REPLAYS = Counter("logferry_processor_replays_total", "Seeks made for a replay", ["group", "trigger"])
ENTRIES_BY_SERVICE = Counter(
    "logferry_processor_entries_by_service_total", "Entries counted by the stats built-in, by service and level",
    ["group", "service", "level"],
)  # fmt: skip


# ---- the HTTP endpoint --------------------------------------------------------------------
class Health:
    """What /healthz and /readyz answer. Processes set these; the server only reads them."""

    def __init__(self) -> None:
        self.alive: Callable[[], bool] = lambda: True
        self.ready: Callable[[], bool] = lambda: True


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"metrics address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "127.0.0.1", int(port)


class MetricsServer:
    """/metrics, /healthz and /readyz on HOST:PORT (127.0.0.1 unless configured otherwise)."""

    def __init__(self, address: str, health: Health | None = None) -> None:
        self.health = health or Health()
        host, port = parse_address(address)
        health_ref = self.health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok = health_ref.alive() if path == "/healthz" else health_ref.ready()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"not ready\n", "text/plain")
                else:
                    self._send(404, b"not found: try /metrics, /healthz, /readyz\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the process's own log

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ThreadingHTTPServer.address_family = family
        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as e:
            raise ConfigError(f"metrics address {address}: cannot listen ({e.strerror})") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on http://%s/metrics", self.address)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which may never have run
            self._server.shutdown()
        self._server.server_close()


# ---- bulk observation --------------------------------------------------------------------------
# prometheus_client's Histogram.observe takes a lock and walks the buckets on every call: too much
# for once-per-record paths. Both helpers below add to a histogram child's buckets directly (its
# long-stable internals `_upper_bounds`, `_buckets`, `_sum`), falling back to observe() if those change.
def _parts(hist: Histogram) -> tuple[list[float], list, object] | None:
    bounds, buckets, total = (getattr(hist, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    return None if bounds is None or buckets is None or total is None else (bounds, buckets, total)


def observe_many(hist: Histogram, counts: dict[float, int]) -> None:
    """`hist.observe(v)` n times for each v → n, in one step per distinct value."""
    parts = _parts(hist)
    if parts is None:
        for value, n in counts.items():
            for _ in range(n):
                hist.observe(value)
        return
    bounds, buckets, total = parts
    for value, n in counts.items():
        buckets[bisect_left(bounds, value)].inc(n)
        total.inc(value * n)  # type: ignore[attr-defined]


class ThreadHistogram:
    """A histogram child observed from many threads' hot loops: each thread appends its values to its
    own list without a lock, and `push()` (by that thread, e.g. after a batch) buckets them at C speed
    and adds them in one step."""

    def __init__(self, hist: Histogram) -> None:
        self.hist = hist
        self._parts = _parts(hist)
        self._local = threading.local()

    def observe(self, value: float) -> None:
        try:
            self._local.values.append(value)
        except AttributeError:
            self._local.values = [value]

    def push(self) -> None:
        """Publish what this thread observed since its last push."""
        values = getattr(self._local, "values", None)
        if not values:
            return
        self._local.values = []
        if self._parts is None:
            for value in values:
                self.hist.observe(value)
            return
        bounds, buckets, total = self._parts
        for i, n in Tally(map(partial(bisect_left, bounds), values)).items():
            buckets[i].inc(n)
        total.inc(sum(values))  # type: ignore[attr-defined]
