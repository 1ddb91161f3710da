"""Durability end to end against a real broker: rotation, kill -9 of the agent (10 times), a
60 s broker outage, and a hand-corrupted spool.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import NewTopic
from prometheus_client import REGISTRY

from logferry.broker import LocalCluster, ephemeral_cluster
from logferry.collectors import agent as agent_module
from logferry.collectors.checkpoint import CheckpointStore
from logferry.collectors.sink import WRITE_AHEAD_WINDOW
from logferry.collectors.spill import encode
from logferry.collectors.spool import HEADER, Spool, list_segments
from logferry.collectors.testing import RunningAgent, read_topic, wait_until
from logferry.kafka import KafkaSettings
from logferry.schemas import default_codec

pytestmark = pytest.mark.kafka


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def line(i: int, tag: str = "line") -> str:
    return f"{tag} {i:07d} the quick brown fox jumps over the lazy dog"


def messages(settings: KafkaSettings, topic: str, expect: int, timeout: float = 60.0) -> Counter[str]:
    return Counter(d.entry["message"] for d in read_topic(settings, topic, expect, timeout=timeout, settle=1.0))


def messages_until(
    settings: KafkaSettings, topic: str, want: set[str] | None = None, at_least: int = 0, timeout: float = 90.0
) -> Counter[str]:
    """Every message of `topic` (with repeats) once all of `want` (or `at_least` distinct ones) arrived
    and nothing new came for 2 s (stragglers and duplicates show up in that window)."""
    codec = default_codec()
    group = f"dur-{time.monotonic_ns()}"
    consumer = Consumer(
        settings.client_config(**{"group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False})
    )
    consumer.subscribe([topic])
    got: Counter[str] = Counter()
    missing = set(want or ())
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(2000, 0.2):
                if not msg.error():
                    m = codec.decode(msg.value(), msg.headers())["message"]
                    got[m] += 1
                    missing.discard(m)
                    last_new = time.monotonic()
            if not missing and len(got) >= at_least and time.monotonic() - last_new > 2.0:
                break
    finally:
        consumer.close()
    return got


def file_source(path: Path, **options: Any) -> dict[str, Any]:
    opts = {"start_at": "beginning", "poll_interval": 0.05, "rotate_wait": 1.0, "checkpoint_interval": 0.2}
    return {"kind": "file", "address": str(path), "name": "files", "options": {**opts, **options}}


def config(settings: KafkaSettings, topic: str, state: Path, sources: list[dict], **sections: Any) -> dict:
    return {"kafka": {"bootstrap_servers": settings.bootstrap_servers}, "sources": sources, "route": {"topic": topic},
            "agent": {"state_dir": str(state)}, "metrics": {"enabled": False}, **sections}  # fmt: skip


# ---- rotation -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["create", "copytruncate"])
def test_rotation_while_writing_100k_lines_each_exactly_once(kafka_settings, make_topic, tmp_path, mode):
    topic = make_topic(partitions=3)  # acks come back out of order across partitions
    log = tmp_path / "app.log"
    log.touch()
    n, every = 100_000, 25_000
    cfg = config(kafka_settings, topic, tmp_path / "state", [file_source(log)])
    base = metric("logferry_source_entries_received_total", source="files", kind="file")
    with RunningAgent(cfg) as agent:
        src = agent.sources["files"]
        f = log.open("ab", buffering=0)
        for start in range(0, n, every):
            for i in range(start, start + every, 500):
                f.write("".join(line(k) + "\n" for k in range(i, i + 500)).encode())
            # The next rotation waits until the agent read into this generation (logrotate runs
            # minutes apart; a file written and rotated away between two polls is never seen).
            wait_until(lambda s=start: metric("logferry_source_entries_received_total", source="files", kind="file")
                       - base > s, what="generation read")  # fmt: skip
            k = start // every + 1
            if mode == "create":
                os.rename(log, tmp_path / f"app.log.{k}")
                f.close()
                f = log.open("ab", buffering=0)
            else:  # the writer keeps its O_APPEND descriptor; logrotate copies, then truncates
                shutil.copyfile(log, tmp_path / f"app.log.{k}")
                os.truncate(log, 0)
        f.close()
        # Wait for every distinct line, not for n records: duplicates would end the read early and the
        # lines still on their way would look lost.
        got = messages_until(kafka_settings, topic, {line(i) for i in range(n)})
        wait_until(lambda: len(src._files) == 1, what="rotated files released")
    assert set(got) == {line(i) for i in range(n)}
    assert sum(got.values()) == n, f"{sum(got.values()) - n} duplicates"


def test_file_source_crash_at_rotation_loses_nothing(kafka_settings, make_topic, tmp_path, monkeypatch):
    """The file source's forced checkpoint save right after a rename+create rotation fails once (as the
    temp-file race once did): the agent restarts the source. Every line arrives; what was
    read but not yet acknowledged at the crash may arrive twice."""
    topic = make_topic(partitions=3)
    log = tmp_path / "app.log"
    log.touch()
    n, every = 30_000, 10_000
    armed = threading.Event()
    at_crash: list[float] = []
    save = CheckpointStore.save

    def failing_save(self: CheckpointStore, force: bool = False) -> bool:
        if force and armed.is_set():
            armed.clear()
            at_crash.append(metric("logferry_source_entries_received_total", source="files", kind="file"))
            raise FileNotFoundError("injected: checkpoint temp file vanished")
        return save(self, force)

    monkeypatch.setattr(CheckpointStore, "save", failing_save)
    # Restart at once, while the crashed run's reads are still in flight (a loaded machine's 1 s).
    monkeypatch.setattr(agent_module, "RESTART_DELAY", 0.0)
    crashed = metric("logferry_source_errors_total", source="files", kind="file", reason="crashed")
    base = metric("logferry_source_entries_received_total", source="files", kind="file")
    cfg = config(kafka_settings, topic, tmp_path / "state", [file_source(log)])
    with RunningAgent(cfg):
        f = log.open("ab", buffering=0)
        for start in range(0, n, every):
            f.write("".join(line(k) + "\n" for k in range(start, start + every)).encode())
            wait_until(lambda s=start: metric("logferry_source_entries_received_total", source="files", kind="file")
                       - base > s, what="generation read")  # fmt: skip
            if start == every:
                armed.set()  # the scan that tracks the next file fails its forced save
            os.rename(log, tmp_path / f"app.log.{start // every + 1}")
            f.close()
            f = log.open("ab", buffering=0)
        f.close()
        got = messages_until(kafka_settings, topic, {line(i) for i in range(n)})
    assert metric("logferry_source_errors_total", source="files", kind="file", reason="crashed") == crashed + 1
    missing = {line(i) for i in range(n)} - set(got)
    duplicates = sum(got.values()) - len(got)
    print(f"\ncrash at rotation: {n} lines, {len(missing)} missing, {duplicates} duplicates")
    assert not missing
    assert duplicates <= at_crash[0] - base  # at most a re-read of what had been read before the crash


def test_checkpoint_reaches_the_end_when_entries_are_filtered_joined_or_dropped(kafka_settings, make_topic, tmp_path):
    """An entry that never goes to Kafka (filtered) or that is several lines (multiline) still
    settles its lines: the checkpoint must reach the end of the file, or a restart re-sends it."""
    topic = make_topic()
    log = tmp_path / "app.log"
    entries = [f"2026-01-01 {'noise' if i % 4 == 0 else 'keep'} {i}" for i in range(400)]
    log.write_text("".join(f"{e}\n  at frame {i}\n" for i, e in enumerate(entries)))
    cfg = config(
        kafka_settings, topic, tmp_path / "state", [file_source(log)],
        filter={"drop_regex": "noise"}, multiline={"start_pattern": r"^\d{4}-", "timeout": 0.2},
    )  # fmt: skip
    with RunningAgent(cfg) as agent:
        kept = {f"{e}\n  at frame {i}" for i, e in enumerate(entries) if "keep" in e}
        got = messages_until(kafka_settings, topic, kept)
        store = agent.sources["files"].store
        size = log.stat().st_size
        wait_until(lambda: [c.offset for c in store.entries()] == [size], what="checkpoint at the end of the file")
    assert set(got) == kept


# ---- kill -9 ------------------------------------------------------------------------------
def start_agent(cfg_path: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "logferry", "collect", "--config", str(cfg_path)],
                            stderr=log.open("ab"), stdout=subprocess.DEVNULL)  # fmt: skip


def write_toml(path: Path, data: dict) -> Path:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return str(v)

    out: list[str] = []

    def table(prefix: str, d: dict) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict | list) and v is not None}
        if scalars:
            out.append(f"[{prefix}]")
            out.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)

    for section, body in data.items():
        if section == "sources":
            for s in body:
                out.append("[[sources]]")
                out.extend(f"{k} = {value(v)}" for k, v in s.items() if not isinstance(v, dict))
                if s.get("options"):
                    out.append("[sources.options]")
                    out.extend(f"{k} = {value(v)}" for k, v in s["options"].items())
        else:
            table(section, body)
    path.write_text("\n".join(out) + "\n")
    return path


def kill_during_load(
    cfg_path: Path, log: Path, kills: int, write: Callable[[threading.Event], None], ready: Callable[[], bool]
) -> None:
    """SIGKILL the agent `kills` times at random moments while `write` runs; stop the writer after.

    The writer starts once the first agent is `ready`: a file rotated away before any agent ever
    saw it cannot be collected by anyone.
    """
    rnd = random.Random(7)
    stop = threading.Event()
    writer = threading.Thread(target=write, args=(stop,), daemon=True)
    for k in range(kills):
        proc = start_agent(cfg_path, log)
        if k == 0:
            wait_until(lambda p=proc: ready() or p.poll() is not None, what="first agent ready")
            writer.start()
        time.sleep(rnd.uniform(1.5, 3.5))  # a random moment under load (start-up takes ~1 s) is the point
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.kill()
        proc.wait()
    stop.set()
    writer.join(30)


def test_kill_9_file_source_loses_nothing(kafka_settings, make_topic, tmp_path):
    """10 kills of `logferry collect` while a writer appends and rotates once."""
    topic = make_topic(partitions=3)
    log = tmp_path / "app.log"
    log.touch()
    cfg = config(kafka_settings, topic, tmp_path / "state", [file_source(log)], buffer={"max_entries": 5000})
    cfg_path = write_toml(tmp_path / "agent.toml", cfg)
    written = 0

    def write(stop: threading.Event) -> None:  # ~10k lines/s; logrotate `create` once, mid-run
        nonlocal written
        f = log.open("ab", buffering=0)
        while not stop.is_set():
            f.write("".join(line(k) + "\n" for k in range(written, written + 200)).encode())
            written += 200
            time.sleep(0.02)
            if written == 20_000:  # rename, and the app reopens its log
                os.rename(log, tmp_path / "app.log.1")
                f.close()
                f = log.open("ab", buffering=0)
        f.close()

    agent_log = tmp_path / "agent.log"
    checkpoints = tmp_path / "state" / "checkpoints" / "files.json"
    kill_during_load(cfg_path, agent_log, 10, write, checkpoints.exists)
    n = written
    proc = start_agent(cfg_path, agent_log)
    try:
        got = messages_until(kafka_settings, topic, {line(i) for i in range(n)})
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, agent_log.read_text()[-3000:]
    missing = {line(i) for i in range(n)} - set(got)
    duplicates = sum(got.values()) - len(got)
    print(f"\nfile source, 10 kills: {n} lines, {len(missing)} missing, {duplicates} duplicates")
    assert not missing
    # A restart re-reads from the last checkpoint: what was in flight (<= buffer + producer queue) plus
    # <= 0.2 s of acknowledged lines; a run killed before its first ack re-reads everything it read.
    assert duplicates <= 5 * (5000 + 10_000)


UNIX_CLIENT_SNDBUF = 4096


def test_kill_9_socket_source_with_spill_keeps_everything_it_read(kafka_settings, make_topic, tmp_path):
    """10 kills with `spill`: every entry the agent read survives. A unix socket's kernel buffer dies
    with the reader, so lines the client had written but the agent had not yet read can be lost:
    the client keeps that window small (SO_SNDBUF 4 KiB) and the test bounds the loss by it."""
    topic = make_topic(partitions=3)
    sock = tmp_path / "in.sock"
    cfg = config(kafka_settings, topic, tmp_path / "state", [{"kind": "unix", "address": str(sock), "name": "in"}],
                 buffer={"policy": "spill", "max_entries": 2000})  # fmt: skip
    cfg_path = write_toml(tmp_path / "agent.toml", cfg)
    sent = 0

    def write(stop: threading.Event) -> None:
        nonlocal sent
        while not stop.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_CLIENT_SNDBUF)
                    s.connect(str(sock))
                    while not stop.is_set():
                        s.sendall((line(sent) + "\n").encode())
                        sent += 1
                        if sent % 100 == 0:
                            time.sleep(0.01)
            except OSError:
                stop.wait(0.05)  # agent down: reconnect when it is back

    agent_log = tmp_path / "agent.log"
    per_kill = UNIX_CLIENT_SNDBUF * 2 // len(line(0)) + 2  # lines the kernel buffer holds (it doubles SO_SNDBUF)
    kill_during_load(cfg_path, agent_log, 10, write, sock.exists)
    n = sent
    proc = start_agent(cfg_path, agent_log)
    try:
        got = messages_until(kafka_settings, topic, at_least=n - 5 * per_kill, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, agent_log.read_text()[-3000:]
    missing = sorted(i for i in range(n) if line(i) not in got)
    duplicates = sum(got.values()) - len(got)
    print(f"\nunix + spill, 10 kills: {n} lines, {len(missing)} missing (kernel socket buffer), {duplicates} dup")
    assert len(missing) <= 5 * per_kill
    assert duplicates <= 5 * 2000 + 5 * 5000


# ---- broker outage ------------------------------------------------------------------------
@pytest.fixture
def own_cluster() -> Iterator[LocalCluster]:
    with ephemeral_cluster() as cluster:
        yield cluster


def test_broker_outage_spools_survives_a_restart_then_drains_nothing_lost(own_cluster, tmp_path):
    """The broker is stopped for 60 s while 30k lines arrive at two agents in turn
    (the first is stopped with SIGTERM mid-outage), then started: the spool drains, nothing lost."""
    settings = KafkaSettings(bootstrap_servers=own_cluster.bootstrap_servers)
    topic = "outage"
    admin = settings.admin()  # kept referenced until the future resolves
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result(30)
    sock = tmp_path / "in.sock"
    cfg = config(settings, topic, tmp_path / "state", [{"kind": "unix", "address": str(sock), "name": "in"}],
                 buffer={"policy": "spill", "max_entries": 2000})  # fmt: skip
    cfg["agent"]["grace_period"] = 1.0
    half = 15_000

    def send(lines: range) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock))
            for i in range(lines.start, lines.stop, 1000):
                s.sendall("".join(line(k) + "\n" for k in range(i, min(i + 1000, lines.stop))).encode())
                time.sleep(0.2)  # spread over the outage

    with RunningAgent(dict(cfg)) as agent:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock))
            s.sendall("".join(line(i, "before") + "\n" for i in range(1000)).encode())
        wait_until(lambda: agent.sink.delivered_total >= 1000, what="delivery before the outage")
        own_cluster.stop_node(1)
        outage_started = time.monotonic()
        send(range(half))
        wait_until(lambda: metric("logferry_spool_entries") >= half, what="entries waiting in the spool")
    # SIGTERM mid-outage: what Kafka never acknowledged stays in the spool for the next agent
    with RunningAgent(dict(cfg)) as agent:
        assert metric("logferry_spool_entries") >= half
        send(range(half, 2 * half))
        wait_until(lambda: metric("logferry_spool_entries") >= 2 * half, what="both halves spooled")
        assert metric("logferry_spool_bytes") > 2 * half * len(line(0))
        # 30k spooled, but only a bounded window of them in the producer's memory
        assert len(agent.sink.producer) <= WRITE_AHEAD_WINDOW
        # The outage itself is the scenario: Kafka stays away a full minute, longer than any
        # client-side retry backoff, before it comes back.
        time.sleep(max(0.0, 60 - (time.monotonic() - outage_started)))
        own_cluster.start_node(1)
        wait_until(lambda: metric("logferry_spool_entries") == 0, timeout=90, what="spool drained")
    got = messages_until(settings, topic, {line(i) for i in range(2 * half)})
    assert {line(i) for i in range(2 * half)} <= set(got)
    assert sum(got.values()) - len(got) == 0


# ---- a hand-corrupted spool -----------------------------------------------------------------
def logferry(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "logferry", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def test_corrupted_spool_is_reported_repaired_and_delivered(kafka_settings, make_topic, tmp_path):
    topic = make_topic()
    spool_dir = tmp_path / "state" / "spool"
    codec = default_codec()
    entries = [dict(timestamp=1, received_at=1, host="h", source="s", service=None, level=None, message=line(i),
                    attributes={}, parse_error=None, raw=None) for i in range(100)]  # fmt: skip
    with Spool(spool_dir) as spool:
        spool.append([encode((topic, None, codec.encode(e), 1000 + i, "s", None)) for i, e in enumerate(entries)])
    (_, seg), *_ = list_segments(spool_dir)
    raw = bytearray(seg.read_bytes())
    raw[HEADER.size + 40] ^= 0xFF  # inside record 0
    seg.write_bytes(bytes(raw[:-10]))  # and a torn tail: record 99
    checked = logferry("spool", "check", str(spool_dir))
    assert checked.returncode == 1, checked.stdout
    assert "98 record(s)" in checked.stdout and "2 damaged span(s)" in checked.stdout
    repaired = logferry("spool", "repair", str(spool_dir))
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert logferry("spool", "check", str(spool_dir)).returncode == 0
    cfg = config(kafka_settings, topic, tmp_path / "state", [{"kind": "unix", "address": str(tmp_path / "x.sock")}],
                 buffer={"policy": "spill"})  # fmt: skip
    with RunningAgent(cfg):
        got = messages(kafka_settings, topic, 98)
    assert sorted(got) == [line(i) for i in range(1, 99)]
