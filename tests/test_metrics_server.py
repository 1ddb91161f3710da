"""The /metrics, /healthz and /readyz endpoint every long-running process exposes."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from logferry.errors import ConfigError
from logferry.metrics import DELIVERED, Health, MetricsServer


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serves_metrics_and_health():
    ready = {"ok": False}
    health = Health()
    health.ready = lambda: ready["ok"]
    server = MetricsServer("127.0.0.1:0", health).start()
    try:
        base = f"http://{server.address}"
        DELIVERED.labels(topic="metrics-test").inc(3)
        status, body = get(base + "/metrics")
        assert status == 200
        assert 'logferry_entries_delivered_total{topic="metrics-test"} 3.0' in body
        assert get(base + "/healthz")[0] == 200
        assert get(base + "/readyz")[0] == 503
        ready["ok"] = True
        assert get(base + "/readyz")[0] == 200
        assert get(base + "/nope")[0] == 404
    finally:
        server.stop()


def test_binds_loopback_by_default():
    server = MetricsServer(":0")
    try:
        assert server.address.startswith("127.0.0.1:")
    finally:
        server.stop()


@pytest.mark.parametrize("bad", ["9464", "host:port", ""])
def test_bad_address_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        MetricsServer(bad)


def test_port_in_use_is_a_config_error():
    first = MetricsServer("127.0.0.1:0")
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            MetricsServer(first.address)
    finally:
        first.stop()


def test_bulk_observations_equal_observing_one_by_one():
    """ThreadHistogram (per-thread tallies, pushed) and observe_many must leave a histogram exactly as
    the same observations made one at a time would, bucket edges included."""
    import random
    import threading

    from prometheus_client import CollectorRegistry, Histogram

    from logferry.metrics import ThreadHistogram, observe_many

    registry = CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0)
    direct = Histogram("direct", "d", buckets=buckets, registry=registry)
    tallied = Histogram("tallied", "t", buckets=buckets, registry=registry)
    many = Histogram("many", "m", buckets=buckets, registry=registry)
    rnd = random.Random(3)
    per_thread = [[rnd.choice([*buckets, rnd.uniform(0, 2)]) for _ in range(500)] for _ in range(4)]
    for values in per_thread:
        for v in values:
            direct.observe(v)
    hist = ThreadHistogram(tallied)

    def work(values: list[float]) -> None:
        for i, v in enumerate(values):
            hist.observe(v)
            if i % 97 == 0:
                hist.push()
        hist.push()

    threads = [threading.Thread(target=work, args=(values,)) for values in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts: dict[float, int] = {}
    for values in per_thread:
        for v in values:
            counts[v] = counts.get(v, 0) + 1
    observe_many(many, counts)

    def samples(name: str) -> dict[tuple[str, str], float]:
        """(suffix, le) → value for the _bucket, _count and _sum samples of one histogram."""
        return {(x.name.removeprefix(name), x.labels.get("le", "")): x.value for metric in registry.collect()
                if metric.name == name for x in metric.samples if not x.name.endswith("_created")}  # fmt: skip

    expected = samples("direct")
    assert len(expected) == len(buckets) + 1 + 2  # buckets, +Inf, _count, _sum
    assert samples("tallied") == pytest.approx(expected) and samples("many") == pytest.approx(expected)
