"""Each of the agent's own sources (stdin, unix, unixgram) delivers Avro LogEntries to the real broker.

Exact counts, per-key order, and bad input (invalid UTF-8, a 10 MB line, binary garbage,
half frames, clients vanishing mid-frame, bad paths, config typos) ending as a clear
error or a counted outcome while the agent keeps running.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from logferry.collectors.config import AgentConfig
from logferry.collectors.testing import RunningAgent, read_topic, wait_until
from logferry.config import validate

pytestmark = pytest.mark.kafka


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def agent_config(kafka_settings, topic: str, sources: list[dict], **sections) -> dict:
    return {"kafka": {"bootstrap_servers": kafka_settings.bootstrap_servers}, "sources": sources,
            "route": {"topic": topic}, **sections}  # fmt: skip


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def test_unix_many_clients_exact_counts_and_per_key_order(kafka_settings, make_topic, tmp_path):
    topic = make_topic(partitions=3)
    path = tmp_path / "app.sock"
    clients, per_client = 6, 400
    cfg = agent_config(kafka_settings, topic, [{"kind": "unix", "address": str(path), "name": "app"}],
                       parser={"kind": "json"}, key={"field": "service"})  # fmt: skip
    with RunningAgent(cfg):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660

        def client(c: int) -> None:
            with connect(path) as s:
                lines = [
                    json.dumps({"service": f"svc-{c}", "seq": i, "msg": f"m{i}"}) + "\n" for i in range(per_client)
                ]
                payload = "".join(lines).encode()
                for i in range(0, len(payload), 777):  # odd chunks: frames split across reads
                    s.sendall(payload[i : i + 777])

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = read_topic(kafka_settings, topic, clients * per_client, settle=1.0)
    assert len(got) == clients * per_client
    by_key: dict[bytes, list[int]] = defaultdict(list)
    for d in sorted(got, key=lambda d: (d.partition, d.offset)):
        assert d.entry["source"] == "app" and d.entry["service"] == d.key.decode()
        by_key[d.key].append(int(d.entry["attributes"]["seq"]))
    assert {k: v for k, v in by_key.items()} == {f"svc-{c}".encode(): list(range(per_client)) for c in range(clients)}


def test_unix_octet_frames_half_frames_and_vanishing_clients(kafka_settings, make_topic, tmp_path):
    topic = make_topic()
    path = tmp_path / "oct.sock"
    source = {"kind": "unix", "address": str(path), "name": "oct", "options": {"framing": "octet"}}
    cfg = agent_config(kafka_settings, topic, [source])
    half = metric("logferry_source_errors_total", source="oct", kind="unix", reason="half_frame")
    with RunningAgent(cfg):
        with connect(path) as s:
            s.sendall(b"5 hello12 with\nnewline3 abc")
        with connect(path) as s:  # vanishes mid-frame: header says 50, only 6 bytes follow
            s.sendall(b"4 full50 partia")
        with connect(path) as s:  # newline framing on the same socket, partial last line still counts
            s.sendall(b"plain line\nno newline at end")
        got = read_topic(kafka_settings, topic, 6, settle=1.0)
        wait_until(lambda: metric("logferry_source_errors_total", source="oct", kind="unix", reason="half_frame")
                   == half + 1, what="half_frame counted")  # fmt: skip
    assert sorted(d.entry["message"] for d in got) == sorted(
        ["hello", "with\nnewline", "abc", "full", "plain line", "no newline at end"]
    )


def test_unix_bad_input_is_counted_and_the_agent_keeps_running(kafka_settings, make_topic, tmp_path):
    topic = make_topic()
    path = tmp_path / "bad.sock"
    cfg = agent_config(kafka_settings, topic, [{"kind": "unix", "address": str(path), "name": "bad"}],
                       parser={"kind": "json"})  # fmt: skip
    truncated = metric("logferry_source_errors_total", source="bad", kind="unix", reason="frame_truncated")
    failures = metric("logferry_parse_failures_total", source="bad", parser="json")
    garbage = bytes(range(256)).replace(b"\n", b"") * 4
    with RunningAgent(cfg):
        with connect(path) as s:
            s.sendall(b"\xff\xfeinvalid utf8 \xc3\x28\n")
            s.sendall(garbage + b"\n")
            s.sendall(b"y" * (10 << 20) + b"\n")  # 10 MB line: cut at the 1 MiB frame limit
            s.sendall(b'{"msg": "still alive"}\n')
        got = read_topic(kafka_settings, topic, 4, timeout=60, settle=1.0)
    assert len(got) == 4
    invalid, binary, huge, alive = (d.entry for d in got)
    assert invalid["raw"] == b"\xff\xfeinvalid utf8 \xc3\x28" and invalid["parse_error"]
    assert binary["raw"] == garbage
    assert huge["message"].startswith("yyy") and len(huge["message"]) < (1 << 20)
    assert alive["message"] == "still alive" and alive["parse_error"] is None
    assert metric("logferry_source_errors_total", source="bad", kind="unix", reason="frame_truncated") == truncated + 1
    assert metric("logferry_parse_failures_total", source="bad", parser="json") == failures + 3


def test_unixgram_with_logger(kafka_settings, make_topic, tmp_path):
    topic = make_topic()
    path = tmp_path / "log.sock"
    cfg = agent_config(kafka_settings, topic, [{"kind": "unixgram", "address": str(path), "name": "devlog"}],
                       parser={"kind": "syslog"}, key={"field": "service"})  # fmt: skip
    with RunningAgent(cfg):
        for i in range(20):
            subprocess.run(["logger", "-u", str(path), "-t", "myapp", "-p", "local0.err", f"event {i}"], check=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x00\xffgarbage datagram", str(path))
        got = read_topic(kafka_settings, topic, 21, settle=1.0)
    assert len(got) == 21
    logged = [d.entry for d in got if d.entry["service"] == "myapp"]
    assert [e["message"] for e in logged] == [f"event {i}" for i in range(20)]
    assert {e["level"] for e in logged} == {"error"} and logged[0]["attributes"]["facility"] == "local0"
    assert [d.entry["raw"] for d in got if d.entry["service"] != "myapp"] == [b"\x00\xffgarbage datagram"]


def test_stale_socket_is_replaced_and_a_live_one_refused(kafka_settings, make_topic, tmp_path):
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays behind, nobody listens: stale
    topic = make_topic()
    cfg = agent_config(kafka_settings, topic, [{"kind": "unix", "address": str(path), "name": "st"}])
    with RunningAgent(cfg):
        with connect(path) as c:
            c.sendall(b"after stale\n")
        assert [d.entry["message"] for d in read_topic(kafka_settings, topic, 1)] == ["after stale"]
        rc, err = run_cli(["--source", f"unix:{path}", "-b", kafka_settings.bootstrap_servers])
        assert rc == 2 and "another process is listening" in err


def run_cli(args: list[str], stdin: bytes | None = None, timeout: float = 60) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "logferry", "collect", "--metrics-address", "127.0.0.1:0", *args],
        input=stdin, capture_output=True, timeout=timeout,
    )  # fmt: skip
    return proc.returncode, proc.stderr.decode()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "unix:/nonexistent-dir/app.sock"], "directory /nonexistent-dir does not exist"),
        (["--source", "tcpx:1.2.3.4"], "unknown source kind 'tcpx'; known kinds: "),
        (["--source", "stdin", "--buffer-policy", "dorp_oldest"], "buffer.policy"),
    ],
)
def test_cli_refuses_bad_setup_with_a_clear_error(args, message, kafka_settings):
    rc, err = run_cli([*args, "-b", kafka_settings.bootstrap_servers])
    assert rc == 2 and message in err, err


def test_config_typo_names_the_key(tmp_path, kafka_settings):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[[sources]]\nkind = "stdin"\n\n[route]\ntopik = "logs"\n')
    rc, err = run_cli(["--config", str(cfg), "-b", kafka_settings.bootstrap_servers])
    assert rc == 2 and "route.topik: unknown key" in err


def test_stdin_exits_0_after_everything_is_delivered(kafka_settings, make_topic):
    topic = make_topic(partitions=2)
    lines = [json.dumps({"service": f"s{i % 3}", "seq": i}) for i in range(3000)]
    data = ("\n".join(lines) + "\n").encode() + b"\xff\xfe not utf8\n" + b"z" * (10 << 20) + b"\nlast line, no newline"
    rc, err = run_cli(
        ["--source", "stdin", "--parser", "json", "--key", "service", "--topic", topic,
         "-b", kafka_settings.bootstrap_servers],
        stdin=data,
    )  # fmt: skip
    assert rc == 0, err
    got = read_topic(kafka_settings, topic, 3003, settle=1.0)
    assert len(got) == 3003
    seqs: dict[bytes | None, list[int]] = defaultdict(list)
    for d in sorted(got, key=lambda d: (d.partition, d.offset)):
        if "seq" in d.entry["attributes"]:
            seqs[d.key].append(int(d.entry["attributes"]["seq"]))
    assert {k: v for k, v in seqs.items()} == {f"s{k}".encode(): list(range(k, 3000, 3)) for k in range(3)}
    assert "3003 entr(y/ies) delivered" in err


def test_sink_hands_ack_tokens_back_in_emit_order(kafka_settings, make_topic):
    """Acks from 3 partitions arrive interleaved; a source still sees its tokens strictly in order."""
    from logferry.collectors.buffer import Buffer
    from logferry.collectors.config import SinkSettings
    from logferry.collectors.pipeline import Pipeline
    from logferry.collectors.sink import KafkaSink
    from logferry.collectors.sources.base import Frames

    topic = make_topic(partitions=3)
    acked: list[int] = []
    pipeline = Pipeline(validate(AgentConfig, {"route": {"topic": topic}, "key": {"field": "k"},
                                               "parser": {"kind": "logfmt"}}))  # fmt: skip
    buffer = Buffer(100_000, 64 << 20)
    sink = KafkaSink(kafka_settings, SinkSettings(linger_ms=1), buffer, {"filesrc": acked.extend}).start()
    n = 3000
    for start in range(0, n, 500):
        frames = [f"k=key{i % 7} i={i}".encode() for i in range(start, start + 500)]
        buffer.put(pipeline.process(Frames(frames, "filesrc", ack_tokens=list(range(start, start + 500)))))
    assert sink.drain(30) == 0
    sink.close()
    assert acked == list(range(n))
    assert metric("logferry_kafka_connected") == 1
    assert metric("logferry_entries_delivered_total", topic=topic) == n


def test_unix_stop_still_reads_clients_waiting_in_the_backlog(tmp_path):
    # SIGTERM right after a client wrote and left: its connection may not have been accepted yet.
    # Stopping before run() makes that moment deterministic: the backlog must still be drained.
    from logferry.collectors.sources.unix import UnixStreamSource

    path = tmp_path / "b.sock"
    src = UnixStreamSource("b", str(path))
    src.open()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(path))
            c.sendall(b"".join(b"line %d\n" % i for i in range(1000)))
        got: list[bytes] = []
        src.stop()
        src.run(lambda batch: got.extend(batch.frames))
    finally:
        src.close()
    assert got == [b"line %d" % i for i in range(1000)]
