"""fifo, posix_mq, sysv_mq, shm and syslog sources end to end: agent → real Kafka → decoded LogEntries.

Counts match exactly (read back with a settle period, so a duplicate would show) and
per-key order holds across partitions.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import posix_ipc
import pytest
import sysv_ipc
from prometheus_client import REGISTRY

from logferry.collectors.shm_ring import ShmRing
from logferry.collectors.testing import Delivered, RunningAgent, read_topic, wait_until

pytestmark = pytest.mark.kafka


def agent_config(kafka_settings, topic: str, sources: list[dict], **sections) -> dict:
    return {"kafka": {"bootstrap_servers": kafka_settings.bootstrap_servers}, "sources": sources,
            "route": {"topic": topic}, **sections}  # fmt: skip


def received(source: str, kind: str) -> float:
    labels = {"source": source, "kind": kind}
    return REGISTRY.get_sample_value("logferry_source_entries_received_total", labels) or 0.0


def by_key(got: list[Delivered], field: str) -> dict[bytes, list[int]]:
    """Entries of each key in Kafka order (partition, offset): what a consumer sees."""
    out: dict[bytes, list[int]] = defaultdict(list)
    for d in sorted(got, key=lambda d: (d.partition, d.offset)):
        assert d.key is not None
        out[d.key].append(int(d.entry["attributes"][field]))
    return dict(out)


def test_fifo_to_kafka_with_writers_coming_and_going(kafka_settings, make_topic, tmp_path: Path):
    topic = make_topic(partitions=3)
    path = tmp_path / "app.fifo"
    cfg = agent_config(kafka_settings, topic, [{"kind": "fifo", "address": str(path), "name": "pipe"}],
                       parser={"kind": "json"}, key={"field": "service"})  # fmt: skip
    services, rounds, per_round = 3, 4, 100
    with RunningAgent(cfg):
        for r in range(rounds):  # each round a new writer per service opens, writes, and leaves
            for s in range(services):
                with open(path, "w") as f:
                    for i in range(r * per_round, (r + 1) * per_round):
                        f.write(json.dumps({"service": f"svc-{s}", "seq": i, "message": f"m{i}"}) + "\n")
        got = read_topic(kafka_settings, topic, services * rounds * per_round, settle=1.0)
    assert len(got) == services * rounds * per_round
    assert all(d.entry["source"] == "pipe" for d in got)
    want = list(range(rounds * per_round))
    assert by_key(got, "seq") == {f"svc-{s}".encode(): want for s in range(services)}


@pytest.fixture
def mq_name() -> Iterator[str]:
    name = f"/logferry-e2e-{uuid.uuid4().hex[:8]}"
    yield name
    with suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_message_queue(name)


def test_posix_mq_to_kafka(kafka_settings, make_topic, mq_name: str):
    topic = make_topic()
    n = 1000
    cfg = agent_config(kafka_settings, topic, [{"kind": "posix_mq", "address": mq_name, "name": "pmq"}])
    with RunningAgent(cfg):
        queue = posix_ipc.MessageQueue(mq_name)
        for i in range(n):
            queue.send(f"posix message {i}".encode(), timeout=30)
        queue.close()
        got = read_topic(kafka_settings, topic, n, settle=1.0)
    assert [d.entry["message"] for d in got] == [f"posix message {i}" for i in range(n)]
    assert {d.entry["source"] for d in got} == {"pmq"}


@pytest.fixture
def sysv_key() -> Iterator[int]:
    key = 0x4C450000 + int(uuid.uuid4().hex[:4], 16)
    yield key
    with suppress(sysv_ipc.ExistentialError):
        sysv_ipc.MessageQueue(key).remove()


def test_sysv_mq_to_kafka_keyed_by_message_type(kafka_settings, make_topic, sysv_key: int):
    topic = make_topic(partitions=3)
    n = 900
    cfg = agent_config(kafka_settings, topic, [{"kind": "sysv_mq", "address": hex(sysv_key), "name": "svq"}],
                       parser={"kind": "logfmt"}, key={"field": "mq_type"})  # fmt: skip
    with RunningAgent(cfg):
        queue = sysv_ipc.MessageQueue(sysv_key)
        for i in range(n):
            queue.send(f"level=info seq={i} msg=hello".encode(), type=1 + i % 3)
        got = read_topic(kafka_settings, topic, n, settle=1.0)
    assert len(got) == n
    assert all(d.entry["attributes"]["mq_type"] == d.key.decode() for d in got)
    assert by_key(got, "seq") == {str(t).encode(): list(range(t - 1, n, 3)) for t in (1, 2, 3)}


WRITER = """
import sys
from logferry.collectors.shm_ring import ShmWriter
with ShmWriter(sys.argv[1], timeout=30) as w:
    for i in range(int(sys.argv[2])):
        assert w.write('{"service": "shm-app", "seq": %d, "message": "from shared memory"}' % i)
"""


def test_shm_ring_to_kafka_from_another_process(kafka_settings, make_topic):
    topic = make_topic()
    ring = f"logferry-e2e-{uuid.uuid4().hex[:8]}"
    n = 5000
    source = {"kind": "shm", "address": ring, "name": "ring", "options": {"slots": 256, "slot_size": 128}}
    cfg = agent_config(kafka_settings, topic, [source], parser={"kind": "json"}, key={"field": "service"})
    try:
        with RunningAgent(cfg):
            writer = subprocess.run([sys.executable, "-c", WRITER, ring, str(n)], timeout=60)
            assert writer.returncode == 0
            got = read_topic(kafka_settings, topic, n, settle=1.0)
    finally:
        ShmRing.unlink(ring)
    assert [int(d.entry["attributes"]["seq"]) for d in got] == list(range(n))
    assert {(d.key, d.entry["service"], d.entry["message"]) for d in got} == {
        (b"shm-app", "shm-app", "from shared memory")
    }


def test_syslog_udp_and_tcp_to_kafka_parsed_as_syslog(kafka_settings, make_topic):
    topic = make_topic(partitions=2)
    sources = [
        {"kind": "syslog", "address": "udp://127.0.0.1:0", "name": "sys-udp"},
        {"kind": "syslog", "address": "tcp://127.0.0.1:0", "name": "sys-tcp"},
    ]
    cfg = agent_config(kafka_settings, topic, sources, key={"field": "service"})  # no [parser]: syslog by default
    n = 200
    with RunningAgent(cfg) as agent:
        udp_address = agent.sources["sys-udp"].bound_address  # type: ignore[attr-defined]
        tcp_address = agent.sources["sys-tcp"].bound_address  # type: ignore[attr-defined]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for i in range(n):
                udp.sendto(f"<11>Nov 21 06:00:00 web1 udpapp[42]: udp message {i}".encode(), udp_address)
                if i % 50 == 49:  # UDP has no backpressure: stay within what the socket buffer surely holds
                    wait_until(lambda i=i: received("sys-udp", "syslog") == i + 1, what="the udp source to catch up")
        with socket.create_connection(tcp_address) as tcp:
            for i in range(n):
                msg = f"<165>1 2026-11-21T06:00:00.000Z web2 tcpapp 7 ID{i} - tcp message {i}".encode()
                tcp.sendall(b"%d %s" % (len(msg), msg) if i % 2 else msg + b"\n")
        got = read_topic(kafka_settings, topic, 2 * n, settle=1.0)
    assert len(got) == 2 * n
    udp_entries = [
        d.entry for d in sorted(got, key=lambda d: (d.partition, d.offset)) if d.entry["source"] == "sys-udp"
    ]
    tcp_entries = [
        d.entry for d in sorted(got, key=lambda d: (d.partition, d.offset)) if d.entry["source"] == "sys-tcp"
    ]
    assert [e["message"] for e in udp_entries] == [f"udp message {i}" for i in range(n)]
    assert [e["message"] for e in tcp_entries] == [f"tcp message {i}" for i in range(n)]
    assert {(e["service"], e["host"], e["level"], e["parse_error"]) for e in udp_entries} == {
        ("udpapp", "web1", "error", None)
    }
    assert {(e["service"], e["host"], e["level"]) for e in tcp_entries} == {("tcpapp", "web2", "notice")}


@pytest.mark.parametrize(
    "source, message",
    [
        ("fifo:/nonexistent-dir/app.fifo", "directory /nonexistent-dir does not exist"),
        ("sysv_mq:not-a-key", "sysv_mq key 'not-a-key' is not an integer"),
        ("syslog:udp://127.0.0.1", "expected udp://HOST:PORT or tcp://HOST:PORT"),
        ("shm:bad/name", "use letters, digits"),
        ("posix_mq:no-slash", "one leading slash"),
    ],
)
def test_cli_refuses_bad_ipc_addresses_with_a_clear_error(source: str, message: str, kafka_settings):
    proc = subprocess.run(
        [sys.executable, "-m", "logferry", "collect", "--metrics-address", "127.0.0.1:0", "--source", source,
         "-b", kafka_settings.bootstrap_servers],
        capture_output=True, timeout=60,
    )  # fmt: skip
    err = " ".join(proc.stderr.decode().split())  # the CLI wraps long messages at the terminal width
    assert proc.returncode == 2 and message in err, err
