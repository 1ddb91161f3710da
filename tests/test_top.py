"""`logferry top`: rates computed from two real scrapes of a /metrics endpoint."""

from __future__ import annotations

import subprocess
import sys

from rich.console import Console

from logferry.broker.local import free_ports
from logferry.metrics import DELIVERED, ENTRIES_DROPPED, LAG, SOURCE_ENTRIES, MetricsServer
from logferry.top import Scrape, rates, render, scrape


def test_rates_are_counter_increase_over_time():
    prev = Scrape("x", 10.0, {"c_total": {(("source", "a"),): 100.0, (("source", "b"),): 50.0}})
    cur = Scrape("x", 12.0, {"c_total": {(("source", "a"),): 300.0, (("source", "b"),): 10.0}})
    got = rates(prev, cur, "c_total")
    assert got[(("source", "a"),)] == (300 - 100) / 2
    assert got[(("source", "b"),)] == 10 / 2  # a reset counts from zero, like Prometheus


def test_renders_agent_and_processor_from_a_live_endpoint():
    server = MetricsServer("127.0.0.1:0").start()
    try:
        src = SOURCE_ENTRIES.labels(source="top-test-src", kind="unix")
        prev = scrape(server.address)
        src.inc(500)
        DELIVERED.labels(topic="top-test").inc(500)
        ENTRIES_DROPPED.labels(reason="top_test_reason").inc(7)
        LAG.labels(group="top-test-group", topic="logs", partition="3").set(1234)
        cur = scrape(server.address)
        expected = rates(prev, cur, "logferry_source_entries_received_total")[
            (("kind", "unix"), ("source", "top-test-src"))
        ]
        assert expected > 0
        console = Console(width=200, record=True)
        console.print(render([prev], [cur]))
        text = console.export_text()
        assert "top-test-src" in text and "top_test_reason=7.0" in text
        assert "top-test-group" in text and "1,234" in text
    finally:
        server.stop()


def test_a_down_endpoint_is_shown_not_fatal():
    (port,) = free_ports(1)
    proc = subprocess.run(
        [sys.executable, "-m", "logferry", "top", "--once", "--interval", "0.1", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "down" in proc.stdout
