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
