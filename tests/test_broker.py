"""The local Apache Kafka: lifecycle through the CLI, clear errors, 3.9.x, and a 3-node cluster.

Every test here talks to real brokers started from Maven Central's jars.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from logferry.broker import ephemeral_cluster
from logferry.broker.local import free_ports
from logferry.errors import KafkaUnavailableError
from logferry.kafka import KafkaSettings, wait_reachable
from logferry.schemas import default_codec

pytestmark = pytest.mark.kafka


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "logferry", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def produce_entries(bootstrap: str, topic: str, n: int, keys: int = 10) -> None:
    codec = default_codec()
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for i in range(n):
        e = {
            "timestamp": 1, "received_at": 1, "host": "h", "source": "test", "service": f"k{i % keys}",
            "level": "info", "message": str(i), "attributes": {"seq": str(i // keys)},
        }  # fmt: skip
        p.produce(topic, codec.encode(e), key=e["service"], headers=codec.headers)
        p.poll(0)
    assert p.flush(60) == 0


def consume_entries(bootstrap: str, topic: str, n: int, timeout: float = 60) -> list[dict]:
    codec = default_codec()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for m in c.consume(500, timeout=0.5):
            assert m.error() is None, m.error()
            got.append(codec.decode(m.value(), m.headers()))
    c.close()
    return got


def assert_key_order(entries: list[dict]) -> None:
    last: dict[str, int] = {}
    for e in entries:
        seq = int(e["attributes"]["seq"])
        assert seq == last.get(e["service"], -1) + 1, f"key {e['service']}: {seq} after {last.get(e['service'])}"
        last[e["service"]] = seq


def test_log_entries_round_trip_through_kafka(kafka_bootstrap, make_topic):
    topic = make_topic(partitions=3)
    produce_entries(kafka_bootstrap, topic, 2000)
    got = consume_entries(kafka_bootstrap, topic, 2000)
    assert len(got) == 2000
    assert_key_order(got)


def test_cli_start_status_second_start_stop(tmp_path):
    home = str(tmp_path / "b")
    started = cli("broker", "start", "--port", "0", "--home", home)
    assert started.returncode == 0, started.stderr
    try:
        status = cli("broker", "status", "--json", "--home", home)
        assert status.returncode == 0
        st = json.loads(status.stdout)
        assert st["running"] and st["nodes"][0]["pid"] and st["version"].startswith("4.")
        md = AdminClient({"bootstrap.servers": st["bootstrap_servers"]}).list_topics(timeout=10)
        assert [b.port for b in md.brokers.values()] == [st["nodes"][0]["port"]]

        again = cli("broker", "start", "--port", "0", "--home", home)
        assert again.returncode == 2
        assert "already running" in again.stderr and str(st["nodes"][0]["pid"]) in again.stderr
    finally:
        stopped = cli("broker", "stop", "--home", home)
    assert stopped.returncode == 0 and "stopped pid" in stopped.stdout
    assert cli("broker", "status", "--home", home).returncode == 3


def test_port_in_use_is_reported(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("broker", "start", "--port", str(port), "--home", str(tmp_path))
    assert r.returncode == 2
    assert f"port(s) {port}" in r.stderr and "already in use" in r.stderr


def test_missing_java_is_named(tmp_path):
    r = cli("broker", "start", "--home", str(tmp_path), env={"PATH": str(tmp_path)})
    assert r.returncode == 2
    assert "Java is not on PATH" in r.stderr


def test_missing_maven_is_named_when_jars_are_not_cached(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(shutil.which("java"))
    r = cli(
        "broker", "start", "--port", "0", "--home", str(tmp_path / "b"),
        env={"PATH": str(bin_dir), "LOGFERRY_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert r.returncode == 2
    assert "Maven (`mvn`) is not on PATH" in r.stderr


def test_bad_kafka_version_is_rejected(tmp_path):
    r = cli("broker", "start", "--kafka-version", "2.8.0", "--home", str(tmp_path))
    assert r.returncode == 2 and "expected 4.x.y or 3.9.y" in r.stderr


def test_unreachable_bootstrap_gives_up_with_a_message():
    (port,) = free_ports(1)
    with pytest.raises(KafkaUnavailableError, match=f"127.0.0.1:{port} did not answer within 2s"):
        wait_reachable(KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"), timeout=2)


@pytest.mark.slow
def test_kafka_39_line_works():
    with ephemeral_cluster(version="3.9.1") as cluster:
        topic = "t39"
        admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
        admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(30)
        produce_entries(cluster.bootstrap_servers, topic, 200)
        got = consume_entries(cluster.bootstrap_servers, topic, 200)
        assert len(got) == 200
        assert cluster.state().version == "3.9.1"


def leader_of(admin: AdminClient, topic: str) -> int:
    return admin.list_topics(topic, timeout=10).topics[topic].partitions[0].leader


@pytest.mark.slow
def test_three_nodes_survive_losing_the_leader():
    with ephemeral_cluster(nodes=3, heap="384m") as cluster:
        bootstrap = cluster.bootstrap_servers
        admin = AdminClient({"bootstrap.servers": bootstrap})
        assert len(admin.list_topics(timeout=10).brokers) == 3
        topic = "replicated"
        admin.create_topics([NewTopic(topic, 1, 3, config={"min.insync.replicas": "2"})])[topic].result(30)
        produce_entries(bootstrap, topic, 500, keys=5)

        old_leader = leader_of(admin, topic)
        cluster.stop_node(old_leader)
        deadline = time.monotonic() + 60
        while leader_of(admin, topic) in (old_leader, -1):
            assert time.monotonic() < deadline, "no new leader elected within 60s"
            time.sleep(0.2)
        # acks=all still succeeds with 2 of 3 replicas in sync.
        produce_entries(bootstrap, topic, 500, keys=5)
        got = consume_entries(bootstrap, topic, 1000)
        assert len(got) == 1000
        cluster.start_node(old_leader)
        assert len(admin.list_topics(timeout=10).brokers) == 3
