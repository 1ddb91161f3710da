"""Faults of the Kafka cluster under load (issue 9): the partition leader killed, the whole cluster down.

One 3-node cluster (KRaft, rf=3, min.insync.replicas=2) serves the module. The issue's 60 s
outage is 20 s here to keep CI bounded; `sink.delivery_timeout_ms = 2000` on the spill agent
makes that outage 10 times its delivery timeout, the case that used to lose the spooled entries.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import NewTopic
from faults_support import check_key_order, keyed_line, record_fault
from prometheus_client import REGISTRY
from test_processor_kafka import Member, read_handled

from logferry.broker import LocalCluster, ephemeral_cluster
from logferry.collectors.testing import RunningAgent, read_topic, wait_until
from logferry.kafka import KafkaSettings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
KEYS = 50


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def cluster3() -> Iterator[LocalCluster]:
    with ephemeral_cluster(nodes=3, heap="384m") as cluster:
        yield cluster


def create_topic(settings: KafkaSettings, name: str, partitions: int) -> None:
    admin = settings.admin()
    topic = NewTopic(name, partitions, 3, config={"min.insync.replicas": "2"})
    admin.create_topics([topic])[name].result(30)


def leader_of(settings: KafkaSettings, topic: str, partition: int = 0) -> int:
    return settings.admin().list_topics(topic, timeout=10).topics[topic].partitions[partition].leader


def agent_config(settings: KafkaSettings, topic: str, sock: Path, state: Path, **sections: object) -> dict:
    source = {"kind": "unix", "address": str(sock), "name": sock.stem, "parser": {"kind": "json"}}
    return {"kafka": {"bootstrap_servers": settings.bootstrap_servers}, "sources": [source],
            "route": {"topic": topic}, "key": {"field": "service"},
            "agent": {"state_dir": str(state), "grace_period": 5.0}, **sections}  # fmt: skip


class SocketWriter(threading.Thread):
    """Keyed JSON lines to a unix stream socket at about `rate`/s until stopped (blocks under backpressure)."""

    def __init__(self, path: Path, rate: int = 2000, keys: int = KEYS) -> None:
        super().__init__(daemon=True)
        self.path, self.rate, self.keys = path, rate, keys
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.path))
            while not self.stop.is_set():
                s.sendall("".join(keyed_line(i, self.keys) for i in range(self.sent, self.sent + 50)).encode())
                self.sent += 50
                time.sleep(50 / self.rate)

    def expected(self) -> dict[str, int]:
        return {f"k{k}": len(range(k, self.sent, self.keys)) for k in range(self.keys)}

    def finish(self) -> int:
        self.stop.set()
        self.join(60)
        assert not self.is_alive(), "writer still blocked"
        return self.sent


def kafka_accounting(settings: KafkaSettings, topic: str, writer: SocketWriter) -> tuple[int, int, int]:
    """(delivered records, lost, duplicated) for what `writer` sent, read back from the topic."""
    got = read_topic(settings, topic, writer.sent, timeout=60, settle=1.0)
    ids = [(d.entry["attributes"]["seq"], d.entry["service"]) for d in got]
    distinct = set(ids)
    written = {(str(i // writer.keys), f"k{i % writer.keys}") for i in range(writer.sent)}
    return len(got), len(written - distinct), len(got) - len(distinct)


def test_partition_leader_killed_under_load(cluster3, tmp_path):
    settings = KafkaSettings(bootstrap_servers=cluster3.bootstrap_servers)
    topic, group = "failover", "failover-group"
    create_topic(settings, topic, 1)  # one partition: its leader's death stalls every delivery
    handled = tmp_path / "handled.log"
    member = Member(settings.bootstrap_servers, topic, group, handled)
    samples: list[tuple[float, int, float]] = []  # (wall time, delivered, last-delivery gauge)
    try:
        wait_until(lambda: member.said("assigned"), 60, "processor member assigned")
        sock = tmp_path / "in.sock"
        with RunningAgent(agent_config(settings, topic, sock, tmp_path / "state")) as agent:
            writer = SocketWriter(sock, 500)
            writer.start()
            done = threading.Event()

            def monitor() -> None:
                while not done.wait(0.1):
                    samples.append((time.time(), agent.sink.delivered_total,
                                    metric("logferry_last_delivery_timestamp_seconds")))  # fmt: skip

            threading.Thread(target=monitor, daemon=True).start()
            wait_until(lambda: agent.sink.delivered_total >= 2000, 30, "deliveries before the fault")
            leader = leader_of(settings, topic)
            killed_at, before = time.time(), agent.sink.delivered_total
            cluster3.stop_node(leader, kill=True)
            wait_until(lambda: agent.sink.delivered_total > before + 2000, 30, "deliveries after failover (<= 30 s)")
            assert leader_of(settings, topic) not in (leader, -1)
            cluster3.start_node(leader)
            wait_until(lambda: leader in settings.admin().list_topics(timeout=10).brokers, 60, "node back")
            time.sleep(1.0)  # load continues across the node's return (a fixed amount of writing, not a wait)
            sent = writer.finish()
            wait_until(lambda: agent.sink.delivered_total >= sent, 60, "agent delivered everything")
            done.set()
        wait_until(lambda: len({r[:2] for r in read_handled([handled])}) >= sent, 90, "processor handled all")
    finally:
        member.proc.kill()
        member.proc.wait(10)
    # The stall: from the kill to the first new delivery, and the same gap as the metric shows it.
    resumed = next(t for t, d, _ in samples if t > killed_at and d > before)
    stall = resumed - killed_at
    metric_gap = max(t - g for t, _, g in samples if g > 0)
    assert stall < 30
    assert metric_gap >= 1.0, "the stall does not show in logferry_last_delivery_timestamp_seconds"
    rows = read_handled([handled])
    report = check_key_order(((k, s) for _, _, k, s, _ in rows), writer.expected())
    delivered, lost, dup = kafka_accounting(settings, topic, writer)
    print(f"\nleader {leader} killed: deliveries stalled {stall:.1f}s, metric showed {metric_gap:.1f}s")
    record_fault("leader killed (3 nodes)", sent, delivered, report.handled, lost + report.missing,
                 dup + report.handled - report.distinct)  # fmt: skip
    assert not report.violations, report.violations
    assert lost == 0 and report.missing == 0


def test_whole_cluster_down_spill_and_block(cluster3, tmp_path):
    settings = KafkaSettings(bootstrap_servers=cluster3.bootstrap_servers)
    create_topic(settings, "down-spill", 3)
    create_topic(settings, "down-block", 3)
    spill_sock, block_sock = tmp_path / "spill.sock", tmp_path / "block.sock"
    spill_cfg = agent_config(settings, "down-spill", spill_sock, tmp_path / "s1", buffer={"policy": "spill",
                             "max_entries": 2000}, sink={"delivery_timeout_ms": 2000})  # fmt: skip
    # block: a small librdkafka queue so the outage reaches the buffer and the writer (default timeout)
    block_cfg = agent_config(settings, "down-block", block_sock, tmp_path / "s2", sink={"queue_max_messages": 1000},
                             buffer={"policy": "block", "max_entries": 1000})  # fmt: skip
    outage = 20.0
    blocked0 = metric("logferry_buffer_blocked_seconds_total")
    with RunningAgent(spill_cfg) as spill_agent, RunningAgent(block_cfg) as block_agent:
        writers = [SocketWriter(spill_sock, 500), SocketWriter(block_sock, 500)]
        for w in writers:
            w.start()
        wait_until(lambda: spill_agent.sink.delivered_total > 500 and block_agent.sink.delivered_total > 500, 30,
                   "deliveries before the outage")  # fmt: skip
        first_port = cluster3.state().nodes[0].port
        for node in cluster3.running_nodes():
            cluster3.stop_node(node.node_id, kill=True)
        down_at = time.monotonic()
        wait_until(lambda: time.monotonic() - down_at > outage, outage + 5, "the outage")
        cluster3.start(nodes=3, port=first_port)
        sent = [w.finish() for w in writers]
        wait_until(lambda: spill_agent.sink.delivered_total >= sent[0], 90, "spool drained")
        wait_until(lambda: block_agent.sink.delivered_total >= sent[1], 90, "block buffer drained")
        assert spill_agent.sink.failed_total == 0
    blocked = metric("logferry_buffer_blocked_seconds_total") - blocked0
    for name, w in (("spill", writers[0]), ("block", writers[1])):
        delivered, lost, dup = kafka_accounting(settings, f"down-{name}", w)
        record_fault(f"cluster down {outage:.0f}s, {name}", w.sent, delivered, None, lost, dup)
        assert lost == 0, f"{name}: {lost} lost"
    assert blocked > outage / 2, "the block agent's writer was never held back"
    print(f"\nblock writer blocked {blocked:.1f}s; spill delivery timeout 2 s vs outage {outage:.0f}s")
