"""Disk full for the spool (issue 9): the broker is down, the spool fills — by its size cap, or
by a real 2 MiB tmpfs under a larger cap (ENOSPC) — the `when_full` policy applies and is
counted, the agent stays up, and once the broker is back the spool drains: with `block` nothing
is lost, with `drop_oldest` exactly the counted entries are missing.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import NewTopic
from faults_support import record_fault
from prometheus_client import REGISTRY

from logferry.broker import LocalCluster, ephemeral_cluster
from logferry.collectors.testing import RunningAgent, read_topic, wait_until
from logferry.kafka import KafkaSettings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
LINES = 12_000


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def line(i: int) -> str:
    return f"spooled {i:06d} " + "x" * 150


@pytest.fixture(scope="module")
def cluster1() -> Iterator[LocalCluster]:
    with ephemeral_cluster(heap="384m") as cluster:
        yield cluster


@contextlib.contextmanager
def small_disk(path: Path) -> Iterator[str]:
    """A 2 MiB tmpfs at `path` (needs root); else say why and yield nothing to mount (the test then fails)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True,
                             text=True)  # fmt: skip
    try:
        yield "" if mounted.returncode == 0 else f"mount -t tmpfs failed: {mounted.stderr.strip()}"
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize(("disk", "when_full"), [("cap", "drop_oldest"), ("cap", "block"), ("tmpfs", "block")])
def test_spool_full_applies_policy_counts_and_recovers(cluster1, tmp_path, caplog, disk, when_full):
    settings = KafkaSettings(bootstrap_servers=cluster1.bootstrap_servers)
    topic = f"spool-full-{disk}-{when_full}".replace("_", "-")  # before `disk` may change below
    admin = settings.admin()
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result(30)
    state = tmp_path / "state"
    with contextlib.ExitStack() as stack:
        spool = {"when_full": when_full, "segment_bytes": 64 << 10, "max_bytes": 1 << 20}
        if disk == "tmpfs":
            why = stack.enter_context(small_disk(state))
            if why:  # not root: the size cap stands in for the device, and the run says so
                print(f"\n{why}; falling back to the spool's size cap")
                disk = "tmpfs unavailable -> cap"
            else:
                spool["max_bytes"] = 64 << 20  # the disk fills long before the cap
        sock = tmp_path / "in.sock"
        cfg = {
            "kafka": {"bootstrap_servers": settings.bootstrap_servers},
            "route": {"topic": topic},
            "sources": [{"kind": "unix", "address": str(sock), "name": "in"}],
            "metrics": {"enabled": False},
            "agent": {"state_dir": str(state), "grace_period": 5.0},
            "spool": spool,
            "buffer": {"policy": "spill", "max_entries": 1000},
            "sink": {"queue_max_messages": 1000},
        }  # fmt: skip  (so the outage reaches the disk, not memory)
        dropped0 = metric("logferry_entries_dropped_total", reason="spool_full")
        sent, last_send = 0, time.monotonic()

        def write() -> None:
            nonlocal sent, last_send
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(sock))
                for i in range(0, LINES, 200):
                    s.sendall("".join(line(k) + "\n" for k in range(i, i + 200)).encode())
                    sent, last_send = i + 200, time.monotonic()

        with RunningAgent(cfg) as agent:
            cluster1.stop_node(1, kill=True)
            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            if when_full == "block":  # the writer is held back, the agent stays up
                wait_until(lambda: time.monotonic() - last_send > 2.0, 60, "the writer held back by the full spool")
                assert sent < LINES and metric("logferry_spool_bytes") <= spool["max_bytes"]
            else:
                writer.join(60)
                assert not writer.is_alive()
                assert metric("logferry_entries_dropped_total", reason="spool_full") > dropped0
            assert agent.sink is not None and agent.sink._thread.is_alive()
            if disk == "tmpfs":  # the device filled, not the cap
                assert "no space left" in caplog.text and metric("logferry_spool_bytes") < spool["max_bytes"] / 10
            cluster1.start_node(1)
            writer.join(60)
            assert not writer.is_alive(), "writer still blocked after the broker came back"
            dropped = int(metric("logferry_entries_dropped_total", reason="spool_full") - dropped0)
            wait_until(lambda: agent.sink.delivered_total + dropped >= LINES, 90, "the spool drained")
    got = [d.entry["message"] for d in read_topic(settings, topic, LINES - dropped, timeout=60, settle=1.0)]
    lost = LINES - len(set(got))
    record_fault(f"spool full ({disk}, {when_full})", LINES, len(got), None, lost, len(got) - len(set(got)))
    print(f"dropped and counted: {dropped}")
    assert lost == dropped, "every missing entry is a counted drop"
    if when_full == "block":
        assert dropped == 0
