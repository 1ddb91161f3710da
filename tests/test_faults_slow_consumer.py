"""Slow consumer under a burst (issue 9): handlers take 50 ms on average (0-100 ms), a burst of
10 s of the group's capacity lands at once. The member's RSS stays bounded (its in-flight
limit pauses fetching), the backlog waits in Kafka as lag, and the lag drains to zero after.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from faults_support import record_fault, rss_bytes
from test_processor_kafka import TESTS, lag, produce, read_handled

from logferry.collectors.testing import wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
CONCURRENCY = 8
HANDLER_MEAN = 0.05
CAPACITY = CONCURRENCY / HANDLER_MEAN  # entries/s the member can handle
BURST = int(10 * CAPACITY)  # ten seconds of work, produced at once


def test_slow_handler_burst_lag_absorbs_memory_bounded(kafka_bootstrap, make_topic, group_id, tmp_path):
    topic = make_topic(partitions=4)
    handled = tmp_path / "handled.log"
    env = dict(os.environ, LOGFERRY_TEST_HANDLED=str(handled), PYTHONPATH=str(TESTS),
               LOGFERRY_TEST_MAX_DELAY=str(2 * HANDLER_MEAN))  # fmt: skip
    cfg = tmp_path / "p.toml"
    cfg.write_text("[processor]\ngroup='x'\ntopics=['x']\ncommit_interval=0.2\n[metrics]\nenabled=false\n")
    cmd = [sys.executable, "-m", "logferry", "process", "--handler", "processor_member:handle", "--topic", topic,
           "--group", group_id, "--bootstrap-servers", kafka_bootstrap, "--concurrency", str(CONCURRENCY),
           "--max-in-flight", "200", "--config", str(cfg)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    said: list[str] = []
    threading.Thread(target=lambda: said.extend(proc.stderr or []), daemon=True).start()
    lags: list[int] = []
    peak = 0
    try:
        wait_until(lambda: any("assigned" in ln for ln in said) or proc.poll() is not None, 60, "member assigned")
        produce(kafka_bootstrap, topic, 100, 100)  # warm-up: imports, fetch buffers, thread pool
        wait_until(lambda: len(read_handled([handled])) >= 100, 30, "warm-up handled")
        baseline = rss_bytes(proc.pid)
        produce(kafka_bootstrap, topic, BURST, 1000, start=100)
        burst_at = time.monotonic()

        def drained() -> bool:
            nonlocal peak
            peak = max(peak, rss_bytes(proc.pid))
            lags.append(lag(kafka_bootstrap, group_id, topic, 4))
            return lags[-1] == 0 and len(read_handled([handled])) >= BURST + 100

        wait_until(drained, 90, "lag drained")
        drain_s = time.monotonic() - burst_at
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
    rows = read_handled([handled])
    distinct = len({(k, s) for _, _, k, s, _ in rows})
    growth = (peak - baseline) / (1 << 20)
    print(f"\nburst {BURST} at capacity ~{CAPACITY:.0f}/s: peak lag {max(lags)}, drained in {drain_s:.1f}s, "
          f"RSS {baseline / (1 << 20):.0f} -> peak {peak / (1 << 20):.0f} MiB")  # fmt: skip
    record_fault("slow consumer, 10x burst", BURST + 100, BURST + 100, len(rows), BURST + 100 - distinct,
                 len(rows) - distinct)  # fmt: skip
    assert distinct == BURST + 100
    assert max(lags) >= BURST // 2, "the burst never waited in Kafka"
    assert growth < 40, f"processor RSS grew {growth:.0f} MiB under the burst"
