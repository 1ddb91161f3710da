"""`logferry top`: a live terminal view of running agents' and processors' /metrics endpoints.

Each refresh scrapes every endpoint, and rates are the change of a counter between two
scrapes divided by the time between them, the same thing Prometheus's rate() computes.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group, RenderableType
from rich.table import Table

Labels = tuple[tuple[str, str], ...]


@dataclass
class Scrape:
    url: str
    at: float
    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)
    error: str | None = None

    def get(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})


def scrape(url: str, timeout: float = 2.0) -> Scrape:
    target = url.rstrip("/")
    if not target.endswith("/metrics"):
        target += "/metrics"
    if "://" not in target:
        target = "http://" + target
    now = time.monotonic()
    try:
        with urllib.request.urlopen(target, timeout=timeout) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return Scrape(url, now, error=str(getattr(e, "reason", e)))
    samples: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name][tuple(sorted(s.labels.items()))] = s.value
    return Scrape(url, now, dict(samples))


def rates(prev: Scrape, cur: Scrape, name: str) -> dict[Labels, float]:
    """Per-second increase of a counter between two scrapes (a reset counts from zero)."""
    dt = cur.at - prev.at
    if dt <= 0:
        return {}
    before = prev.get(name)
    out = {}
    for labels, value in cur.get(name).items():
        old = before.get(labels, 0.0)
        out[labels] = (value - old if value >= old else value) / dt
    return out


def _label(labels: Labels, *keys: str) -> str:
    d = dict(labels)
    return " ".join(d.get(k, "") for k in keys)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"


def agent_table(prev: Scrape, cur: Scrape) -> Table | None:
    received = cur.get("logferry_source_entries_received_total")
    if not received:
        return None
    t = Table(title=f"agent {cur.url}", title_justify="left")
    for col in ("source", "kind", "entries/s", "MB/s", "received"):
        t.add_column(col, justify="right" if col not in ("source", "kind") else "left")
    ent_rate = rates(prev, cur, "logferry_source_entries_received_total")
    byte_rate = rates(prev, cur, "logferry_source_bytes_received_total")
    for labels, total in sorted(received.items()):
        t.add_row(
            _label(labels, "source"), _label(labels, "kind"), _fmt(ent_rate.get(labels, 0.0)),
            f"{byte_rate.get(labels, 0.0) / 1e6:.2f}", _fmt(total),
        )  # fmt: skip
    delivered = sum(rates(prev, cur, "logferry_entries_delivered_total").values())
    drops = {_label(lb, "reason"): v for lb, v in cur.get("logferry_entries_dropped_total").items() if v}
    buffer = sum(cur.get("logferry_buffer_entries").values())
    spool = sum(cur.get("logferry_spool_entries").values())
    connected = sum(cur.get("logferry_kafka_connected").values())
    last = sum(cur.get("logferry_last_delivery_timestamp_seconds").values())
    since = f"{time.time() - last:.1f}s ago" if last else "never"
    drop_text = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(drops.items())) or "none"
    t.caption = (
        f"delivered {_fmt(delivered)}/s · buffer {_fmt(buffer)} · spool {_fmt(spool)} · "
        f"kafka {'up' if connected else 'DOWN'} · last ack {since} · drops {drop_text}"
    )
    return t


def processor_table(prev: Scrape, cur: Scrape) -> Table | None:
    lag = cur.get("logferry_processor_lag")
    consumed = cur.get("logferry_processor_consumed_total")
    if not lag and not consumed:
        return None
    t = Table(title=f"processor {cur.url}", title_justify="left")
    for col in ("group", "topic", "partition", "lag", "committed"):
        t.add_column(col, justify="right" if col in ("lag", "committed") else "left")
    committed = cur.get("logferry_processor_committed_offset")
    for labels, value in sorted(lag.items(), key=lambda kv: (kv[0], kv[1])):
        t.add_row(
            _label(labels, "group"), _label(labels, "topic"), _label(labels, "partition"),
            _fmt(value), _fmt(committed.get(labels, 0.0)),
        )  # fmt: skip
    processed = sum(rates(prev, cur, "logferry_processor_processed_total").values())
    dlq = sum(cur.get("logferry_processor_dead_lettered_total").values())
    retries = sum(cur.get("logferry_processor_retries_total").values())
    in_flight = sum(cur.get("logferry_processor_in_flight").values())
    paused = sum(cur.get("logferry_processor_paused_partitions").values())
    t.caption = (
        f"processed {_fmt(processed)}/s · in flight {_fmt(in_flight)} · paused partitions {_fmt(paused)} · "
        f"retries {_fmt(retries)} · dead-lettered {_fmt(dlq)}"
    )
    return t


def render(prev: list[Scrape], cur: list[Scrape]) -> RenderableType:
    parts: list[RenderableType] = []
    for p, c in zip(prev, cur, strict=True):
        if c.error:
            parts.append(f"[red]{c.url}: down ({c.error})[/red]")
            continue
        tables = [t for t in (agent_table(p, c), processor_table(p, c)) if t is not None]
        parts.extend(tables or [f"{c.url}: up, no logferry pipeline metrics yet"])
    return Group(*parts)
