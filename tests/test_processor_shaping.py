"""Shaping and the rest of the runtime against the real broker: rate limit, pause/resume, priority,
filtering, async handlers and the built-ins. Rates and backlogs are observed (handler timestamps,
Kafka lag from committed vs end offsets), never assumed from sleeps."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY

from logferry.processors import Processor
from logferry.processors.builtins import read_archive
from logferry.schemas import default_codec

pytestmark = pytest.mark.kafka
LEVELS = ("info", "warning", "error", "debug")


def fill(bootstrap: str, topic: str, n: int, keys: int = 10) -> None:
    codec = default_codec()
    # Idempotence keeps produce order per partition even for records queued before metadata arrives.
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10, "enable.idempotence": True})
    for i in range(n):
        e = {"timestamp": 1_790_000_000_000_000 + i, "received_at": 0, "host": "h", "source": "t",
             "service": f"svc{i % 2}", "level": LEVELS[i % 4], "message": f"m{i}",
             "attributes": {"seq": str(i // keys), "key": f"k{i % keys}"}}  # fmt: skip
        p.produce(topic, codec.encode(e), key=f"k{i % keys}".encode(), headers=codec.headers)
        p.poll(0)
    assert p.flush(30) == 0


def kafka_lag(bootstrap: str, group: str, topic: str, partitions: int = 1) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        done = {tp.partition: max(0, tp.offset) for tp in c.committed(tps, timeout=10)}
        return sum(c.get_watermark_offsets(tp, timeout=10)[1] - done[tp.partition] for tp in tps)
    finally:
        c.close()


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


class Running:
    def __init__(self, app: Processor) -> None:
        self.app = app
        self.thread = threading.Thread(target=app.run, kwargs={"install_signals": False}, daemon=True)

    def __enter__(self) -> Processor:
        self.thread.start()
        assert self.app.wait_assigned(30)
        return self.app

    def __exit__(self, *exc: object) -> None:
        self.app.stop()
        self.thread.join(30)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_rate_limit_turns_a_backlog_into_a_steady_flow(kafka_bootstrap, make_topic, group_id):
    topic = make_topic(partitions=2)
    fill(kafka_bootstrap, topic, 1500)
    stamps: list[float] = []
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, rate_limit=500,
                    rate_burst=25, commit_interval=0.1)  # fmt: skip
    app.handler(lambda e, ctx: stamps.append(time.monotonic()))
    lag_mid = None
    with Running(app):
        wait_for(lambda: len(stamps) >= 500, 30, "a third handled")
        lag_mid = kafka_lag(kafka_bootstrap, group_id, topic, 2)
        held = len(app.runtime.held) + app.runtime.in_flight()
        wait_for(lambda: len(stamps) == 1500, 30, "all handled")
        wait_for(lambda: kafka_lag(kafka_bootstrap, group_id, topic, 2) == 0, 10, "lag to drain")
    rate = (len(stamps) - 25) / (stamps[-1] - stamps[0])
    print(f"observed {rate:.0f} entries/s with rate_limit=500; Kafka lag at 1/3: {lag_mid}")
    assert 400 <= rate <= 550
    assert lag_mid >= 800  # the burst waits in Kafka ...
    assert held <= 2 * app.settings.batch_size + 25  # ... not in the process


def test_backlog_pauses_and_resumes_without_tripping_max_poll_interval(kafka_bootstrap, make_topic, group_id):
    topic = make_topic(partitions=1)
    fill(kafka_bootstrap, topic, 2000)
    gate = threading.Event()
    done: list[int] = []

    def handle(e, ctx):
        gate.wait()
        time.sleep(0.002)  # slower than fetching: the backlog builds up again and again
        done.append(ctx.offset)

    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, max_in_flight=100,
                    resume_at=20, batch_size=50, concurrency=8, commit_interval=0.1,
                    session_timeout_ms=6000, max_poll_interval_ms=6500, revoke_grace=1)  # fmt: skip
    app.handler(handle)
    samples: list[tuple[int, bool]] = []
    with Running(app) as a:
        rt = a.runtime
        wait_for(lambda: rt.in_flight() >= 100 and rt.pauses.paused, 20, "the backlog to pause the partition")
        # Handlers stuck for longer than max.poll.interval.ms: the poll thread keeps polling.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 7.5:
            samples.append((rt.in_flight(), bool(rt.pauses.paused)))
            time.sleep(0.05)
        assert kafka_lag(kafka_bootstrap, group_id, topic) == 2000
        assert metric("logferry_processor_paused_partitions", group=group_id) == 1
        gate.set()
        while len(done) < 2000:
            samples.append((rt.in_flight(), bool(rt.pauses.paused)))
            time.sleep(0.005)
        wait_for(lambda: kafka_lag(kafka_bootstrap, group_id, topic) == 0, 10, "lag to drain")
        # Still the first assignment: max.poll.interval.ms never expired (stopping will revoke).
        assert metric("logferry_processor_rebalances_total", group=group_id, kind="revoke") == 0
        assert metric("logferry_processor_rebalances_total", group=group_id, kind="lost") == 0
        assert metric("logferry_processor_rebalances_total", group=group_id, kind="assign") == 1
    assert sorted(done) == list(range(2000)) and len(done) == 2000  # each once: no rebalance re-delivery
    assert max(n for n, _ in samples) <= 100 + 50  # at most one batch past the high watermark
    toggles = sum(1 for x, y in itertools.pairwise(samples) if x[1] != y[1])
    assert toggles >= 4, "paused and resumed repeatedly while draining"


def test_high_priority_topic_is_served_first(kafka_bootstrap, make_topic, group_id):
    high, low = make_topic(partitions=1), make_topic(partitions=1)
    fill(kafka_bootstrap, low, 1000)
    fill(kafka_bootstrap, high, 1000)
    order: list[str] = []

    def handle(e, ctx):
        time.sleep(0.0005)
        order.append(ctx.topic)

    app = Processor(group=group_id, topics=[high], low_priority_topics=[low], bootstrap_servers=kafka_bootstrap,
                    concurrency=4, batch_size=100)  # fmt: skip
    app.handler(handle)
    with Running(app):
        wait_for(lambda: len(order) == 2000, 60, "both topics handled")
    last_high = max(i for i, t in enumerate(order) if t == high)
    low_before = sum(1 for t in order[:last_high] if t == low)
    print(f"low-priority entries handled before the last high-priority one: {low_before}")
    assert low_before <= 2 * 100


def test_filter_commits_unwanted_entries_without_work(kafka_bootstrap, make_topic, group_id):
    topic = make_topic(partitions=1)
    fill(kafka_bootstrap, topic, 400)
    seen: list[str] = []
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap,
                    filter={"levels": ["error"], "fields": {"service": ["svc0"]}}, commit_interval=0.1)  # fmt: skip
    app.handler(lambda e, ctx: seen.append((e["level"], e["service"])))
    with Running(app):
        wait_for(lambda: kafka_lag(kafka_bootstrap, group_id, topic) == 0, 20, "everything committed")
    assert seen == [("error", "svc0")] * 100
    assert metric("logferry_processor_filtered_total", group=group_id, topic=topic) == 300


def test_async_handler_keeps_key_order(kafka_bootstrap, make_topic, group_id):
    topic = make_topic(partitions=3)
    fill(kafka_bootstrap, topic, 5000, keys=50)
    seen: dict[str, list[int]] = defaultdict(list)
    offsets: dict[str, list[int]] = defaultdict(list)
    active = {"now": 0, "max": 0}

    async def handle(e, ctx):
        active["now"] += 1
        active["max"] = max(active["max"], active["now"])
        await asyncio.sleep(random.random() * 0.002)
        seen[e["attributes"]["key"]].append(int(e["attributes"]["seq"]))
        offsets[e["attributes"]["key"]].append(ctx.offset)
        active["now"] -= 1

    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, concurrency=64)
    app.handler(handle)
    with Running(app):
        wait_for(lambda: sum(map(len, seen.values())) == 5000, 60, "all handled")
    # Key order is the partition's offset order (one key, one partition) ...
    assert all(v == sorted(v) and len(set(v)) == len(v) for v in offsets.values())
    # ... which, with an idempotent producer, is the order the entries were sent in.
    assert {k: v for k, v in seen.items()} == {f"k{k}": list(range(100)) for k in range(50)}
    assert active["max"] > 10  # different keys really overlapped on the event loop


def test_stats_and_forward_builtins(kafka_bootstrap, make_topic, group_id):
    from logferry.kafka import KafkaSettings
    from logferry.processors.builtins import Forward, stats
    from logferry.processors.config import ForwardSettings

    topic, target = make_topic(partitions=1), make_topic(partitions=1)
    fill(kafka_bootstrap, topic, 200)
    count = stats(group_id)
    forward = Forward(
        ForwardSettings(topic=target, filter={"levels": ["error"]}), KafkaSettings(bootstrap_servers=kafka_bootstrap)
    )

    def handle(e, ctx):
        count(e, ctx)
        forward(e, ctx)

    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, commit_interval=0.1)
    app.handler(handle)
    with Running(app):
        wait_for(lambda: kafka_lag(kafka_bootstrap, group_id, topic) == 0, 20, "everything committed")
    forward.close()
    name = "logferry_processor_entries_by_service_total"
    assert metric(name, group=group_id, service="svc0", level="error") == 50
    assert metric(name, group=group_id, service="svc1", level="info") == 0  # i%2==1 are warning/debug
    assert metric(name, group=group_id, service="svc1", level="warning") == 50
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group_id + "-r", "auto.offset.reset": "earliest"})
    c.subscribe([target])
    got: list = []
    deadline = time.monotonic() + 20
    while len(got) < 50 and time.monotonic() < deadline:
        got += [m for m in c.consume(100, 0.2) if m.error() is None]
    c.close()
    codec = default_codec()
    assert len(got) == 50 and {codec.decode(m.value(), m.headers())["level"] for m in got} == {"error"}


def test_cli_archive_builtin_and_sigterm(kafka_bootstrap, make_topic, group_id, tmp_path):
    topic = make_topic(partitions=2)
    fill(kafka_bootstrap, topic, 300)
    cmd = [
        sys.executable, "-m", "logferry", "process", "--builtin", "archive", "--archive-dir", str(tmp_path / "a"),
        "--topic", topic, "--group", group_id, "-b", kafka_bootstrap, "--metrics-address", "127.0.0.1:0",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        wait_for(lambda: kafka_lag(kafka_bootstrap, group_id, topic, 2) == 0, 60, "the archive to catch up")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    files = list(Path(tmp_path / "a" / topic).rglob("*.jsonl.gz"))
    entries = [e for f in files for e in read_archive(f)]
    assert sorted(int(e["message"][1:]) for e in entries) == list(range(300))
    assert {f.parent.name for f in files} == {"14"}  # hourly folders from the entries' own timestamps


def test_stop_gives_up_in_flight_work_after_the_grace_and_commits_only_what_is_done(
    kafka_bootstrap, make_topic, group_id
):
    topic = make_topic(partitions=1)
    fill(kafka_bootstrap, topic, 40, keys=1)  # one key: strictly one at a time
    handled: list[int] = []

    def handle(e, ctx):
        time.sleep(0.1)
        handled.append(ctx.offset)

    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, shutdown_grace=0.5,
                    commit_interval=0.1)  # fmt: skip
    app.handler(handle)
    runner = Running(app)
    runner.__enter__()
    wait_for(lambda: len(handled) >= 3, 20, "some work done")
    t0 = time.monotonic()
    runner.__exit__()
    took = time.monotonic() - t0
    at_stop = len(handled)
    assert took < 0.5 + 3  # the grace, plus leaving the group; not the 4 s of queued work
    assert at_stop < 40 and handled == list(range(at_stop))
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group_id})
    committed = c.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
    c.close()
    assert committed == at_stop  # everything done is committed, nothing past it
