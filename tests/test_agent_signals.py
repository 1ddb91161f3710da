"""Signals and backpressure against a real broker: SIGTERM drains, a second SIGTERM exits at once,
SIGHUP reloads without losing entries; `block` makes writers wait through a stalled broker
(SIGSTOP on its JVM) and loses nothing; `drop_newest` drops and counts exactly.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import NewTopic
from prometheus_client import REGISTRY

from logferry.broker import LocalCluster, ephemeral_cluster
from logferry.broker.local import free_ports
from logferry.collectors.testing import RunningAgent, read_topic, wait_until
from logferry.kafka import KafkaSettings

pytestmark = pytest.mark.kafka


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def agent_config(settings: KafkaSettings, topic: str, sources: list[dict], **sections) -> dict:
    return {"kafka": {"bootstrap_servers": settings.bootstrap_servers}, "sources": sources,
            "route": {"topic": topic}, **sections}  # fmt: skip


def start_cli(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "agent.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "logferry", "collect", *args], stderr=log.open("wb"), stdout=subprocess.DEVNULL
    )
    return proc, log


def wait_for_socket(path: Path, proc: subprocess.Popen, log: Path) -> None:
    wait_until(lambda: path.exists() or proc.poll() is not None, what="agent socket")
    assert proc.poll() is None, log.read_text()


def send_lines(path: Path, lines: list[str]) -> None:
    with connect(path) as s:
        s.sendall("".join(line + "\n" for line in lines).encode())


def test_sigterm_drains_everything_and_exits_0(kafka_settings, make_topic, tmp_path):
    topic = make_topic()
    sock = tmp_path / "d.sock"
    args = ["--source", f"unix:{sock}", "--topic", topic, "-b", kafka_settings.bootstrap_servers,
            "--metrics-address", "127.0.0.1:0", "--grace-period", "60"]  # fmt: skip
    proc, log = start_cli(tmp_path, args)
    wait_for_socket(sock, proc, log)
    send_lines(sock, [f"line {i}" for i in range(5000)])
    proc.send_signal(signal.SIGTERM)  # right away: what the client wrote is still in flight inside the agent
    assert proc.wait(60) == 0, log.read_text()
    assert "5000 entr(y/ies) delivered, 0 refused by Kafka, 0 not delivered" in log.read_text(), log.read_text()
    got = read_topic(kafka_settings, topic, 5000, settle=1.0)
    assert [d.entry["message"] for d in got] == [f"line {i}" for i in range(5000)]
    assert not sock.exists()


def test_second_sigterm_exits_at_once(tmp_path):
    (dead_port,) = free_ports(1)  # nothing listens: the drain can never finish
    sock = tmp_path / "x.sock"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ngrace_period = 120\n[kafka]\nbootstrap_servers = "127.0.0.1:{dead_port}"\n'
                   f'[metrics]\nenabled = false\n[[sources]]\nkind = "unix"\naddress = "{sock}"\n')  # fmt: skip
    proc, log = start_cli(tmp_path, ["--config", str(cfg)])
    wait_for_socket(sock, proc, log)
    send_lines(sock, ["never delivered"] * 10)
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining into Kafka" in log.read_text(), what="drain to start")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 1
    assert time.monotonic() - t0 < 5
    assert re.search(r"second SIGTERM: exiting now, \d+ entries undelivered", log.read_text())


def test_sighup_reloads_without_losing_entries(kafka_settings, make_topic, tmp_path):
    first, second = make_topic(), make_topic()
    sock = tmp_path / "r.sock"
    cfg = tmp_path / "agent.toml"
    base = (f'[kafka]\nbootstrap_servers = "{kafka_settings.bootstrap_servers}"\n[metrics]\nenabled = false\n'
            f'[[sources]]\nkind = "unix"\naddress = "{sock}"\nname = "app"\n')  # fmt: skip
    cfg.write_text(base + f'[route]\ntopic = "{first}"\n')
    proc, log = start_cli(tmp_path, ["--config", str(cfg)])
    wait_for_socket(sock, proc, log)
    held = connect(sock)  # a client connected across the reload
    held.sendall(b"".join(b"before %d\n" % i for i in range(100)))
    assert len(read_topic(kafka_settings, first, 100)) == 100
    cfg.write_text(base + f'[route]\ntopic = "{second}"\n[filter]\ndrop_regex = "skip"\n')
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "config reloaded" in log.read_text(), what="reload")
    held.sendall(b"after 0\nskip me\nafter 1\n")
    held.close()
    send_lines(sock, ["after 2"])
    got = read_topic(kafka_settings, second, 3, settle=1.0)
    assert sorted(d.entry["message"] for d in got) == ["after 0", "after 1", "after 2"]
    cfg.write_text(base + "[route]\ntopic = [\n")  # a broken file: the running config stays
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "keeping the running config" in log.read_text(), what="bad reload refused")
    send_lines(sock, ["still running"])
    assert [d.entry["message"] for d in read_topic(kafka_settings, second, 4)][-1] == "still running"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert len(read_topic(kafka_settings, first, 100, settle=1.0)) == 100


# ---- a broker of our own, to stall ------------------------------------------------------------
@pytest.fixture(scope="module")
def stallable() -> Iterator[LocalCluster]:
    with ephemeral_cluster() as cluster:
        yield cluster


class Stalled:
    """SIGSTOP the broker's JVM for the duration of the block (SIGCONT even if the test fails)."""

    def __init__(self, cluster: LocalCluster) -> None:
        st = cluster.state()
        assert st is not None
        self.pid = st.nodes[0].pid

    def __enter__(self) -> Stalled:
        os.kill(self.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc) -> None:
        os.kill(self.pid, signal.SIGCONT)


def stall_setup(cluster: LocalCluster, tmp_path: Path, policy: str) -> tuple[KafkaSettings, str, dict, Path]:
    settings = KafkaSettings(bootstrap_servers=cluster.bootstrap_servers)
    topic = f"stall-{policy}-{time.monotonic_ns()}"
    admin = settings.admin()
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    sock = tmp_path / f"{policy}.sock"
    cfg = agent_config(settings, topic, [{"kind": "unix", "address": str(sock), "name": f"stall-{policy}"}],
                       buffer={"max_entries": 200, "policy": policy},
                       sink={"queue_max_messages": 300, "linger_ms": 5})  # fmt: skip
    return settings, topic, cfg, sock


def buffer_entries() -> float:
    return REGISTRY.get_sample_value("logferry_buffer_entries") or 0.0


def test_block_policy_makes_writers_wait_through_a_stalled_broker(stallable, tmp_path):
    settings, topic, cfg, sock = stall_setup(stallable, tmp_path, "block")
    n = 20_000
    with RunningAgent(cfg):
        send_lines(sock, ["warm-up"])  # producer id and metadata in place before the stall
        assert len(read_topic(settings, topic, 1)) == 1
        blocked_before = REGISTRY.get_sample_value("logferry_buffer_blocked_seconds_total") or 0.0
        done = threading.Event()

        def writer() -> None:
            send_lines(sock, [f"{i:06d} " + "p" * 100 for i in range(n)])
            done.set()

        with Stalled(stallable):
            t = threading.Thread(target=writer, daemon=True)
            t.start()
            wait_until(lambda: buffer_entries() >= 200, what="buffer full")
            wait_until(lambda: (REGISTRY.get_sample_value("logferry_buffer_blocked_seconds_total") or 0)
                       > blocked_before + 0.5, what="source blocked")  # fmt: skip
            assert not done.is_set()  # the writer waits: its socket buffer is full, nothing was dropped
        t.join(120)
        assert done.is_set()
        got = read_topic(settings, topic, n + 1, timeout=120, settle=1.0)
    assert [d.entry["message"][:6] for d in got[1:]] == [f"{i:06d}" for i in range(n)]


def test_drop_newest_counts_exactly_what_it_drops(stallable, tmp_path):
    settings, topic, cfg, sock = stall_setup(stallable, tmp_path, "drop_newest")
    n = 5_000
    dropped_before = metric("logferry_entries_dropped_total", reason="buffer_full")
    with RunningAgent(cfg) as agent:
        send_lines(sock, ["warm-up"])
        assert len(read_topic(settings, topic, 1)) == 1
        received = metric("logferry_source_entries_received_total", source="stall-drop_newest", kind="unix")
        with Stalled(stallable):
            send_lines(sock, [f"{i:06d}" for i in range(n)])
            wait_until(lambda: metric("logferry_source_entries_received_total", source="stall-drop_newest",
                                      kind="unix") == received + n, what="all lines read")  # fmt: skip
        assert agent.buffer is not None and agent.sink is not None
        sink = agent.sink

        def accounted() -> float:  # acked by Kafka or counted as dropped
            return (
                sink.delivered_total + metric("logferry_entries_dropped_total", reason="buffer_full") - dropped_before
            )

        wait_until(lambda: accounted() == n + 1, timeout=60, what="every line acked or counted")
        dropped = metric("logferry_entries_dropped_total", reason="buffer_full") - dropped_before
        got = read_topic(settings, topic, 1 + n - int(dropped), settle=1.0)
    kept = [int(d.entry["message"]) for d in got[1:]]
    assert dropped > 0 and len(kept) + dropped == n  # every line is either in Kafka or counted as dropped
    assert kept == list(range(len(kept)))  # drop_newest keeps the oldest, in order
