"""Failures against the real broker: poison entries and undecodable records to the DLQ, delayed retries."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import Consumer, Producer

from logferry.processors import Processor
from logferry.processors.failures import (
    H_ATTEMPTS,
    H_EXC_MESSAGE,
    H_EXC_TYPE,
    H_GROUP,
    H_OFFSET,
    H_PARTITION,
    H_REASON,
    H_TOPIC,
    header_str,
)  # fmt: skip
from logferry.schemas import FINGERPRINT_HEADER, default_codec

pytestmark = pytest.mark.kafka


def entry(i: int, message: str = "ok") -> dict:
    return {"timestamp": 0, "received_at": 0, "host": "h", "source": "t", "service": "s", "level": "info",
            "message": message, "attributes": {"i": str(i)}}  # fmt: skip


def read_all(bootstrap: str, topic: str, n: int, timeout: float = 30) -> list:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{topic}", "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += [m for m in c.consume(100, 0.2) if m.error() is None]
    c.close()
    return out


class PoisonError(ValueError):
    pass


def run_until(app: Processor, cond, timeout: float, what: str) -> None:
    t = threading.Thread(target=app.run, kwargs={"install_signals": False}, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    try:
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)
    finally:
        app.stop()
        t.join(30)


def test_poison_and_undecodable_records_land_in_the_dlq_and_the_group_keeps_going(
    kafka_bootstrap, make_topic, group_id
):
    topic = make_topic(partitions=2)
    codec = default_codec()
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    poison = {5, 17, 33}
    for i in range(50):
        p.produce(topic, codec.encode(entry(i, "poison" if i in poison else "ok")), key=f"k{i % 4}".encode(),
                  headers=codec.headers)  # fmt: skip
    p.produce(topic, b"\x07not avro at all", key=b"k0", headers=codec.headers)
    p.produce(topic, codec.encode(entry(99)), key=b"k1", headers=[(FINGERPRINT_HEADER, b"00000000deadbeef")])
    p.produce(topic, None, key=b"k2")  # a tombstone: no value at all
    p.flush(10)

    handled: list[int] = []
    attempts: dict[int, list[int]] = {}
    dlq = f"{group_id}.dead"
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, retries=2,
                    backoff_initial=0.01, backoff_max=0.05, dead_letter_topic=dlq)  # fmt: skip

    @app.handler
    def handle(e, ctx):
        i = int(e["attributes"]["i"])
        attempts.setdefault(i, []).append(ctx.attempt)
        if e["message"] == "poison":
            raise PoisonError(f"cannot bill entry {i}")
        handled.append(i)

    run_until(app, lambda: len(handled) == 47 and app.runtime.in_flight() == 0, 30, "the good entries")
    assert sorted(handled) == [i for i in range(50) if i not in poison]
    assert all(attempts[i] == [1, 2, 3] for i in poison)  # in place: 1 try + 2 retries
    dead = read_all(kafka_bootstrap, dlq, 6)
    assert len(dead) == 6
    by_reason: dict[str, list] = {}
    for m in dead:
        h = m.headers()
        assert header_str(h, H_TOPIC) == topic and header_str(h, H_GROUP) == group_id
        assert header_str(h, H_PARTITION).isdigit() and header_str(h, H_OFFSET).isdigit()
        by_reason.setdefault(header_str(h, H_REASON), []).append(m)
    assert len(by_reason["handler_failed"]) == 3 and len(by_reason["undecodable"]) == 3
    for m in by_reason["handler_failed"]:
        h = m.headers()
        assert header_str(h, H_ATTEMPTS) == "3" and header_str(h, H_EXC_TYPE) == "PoisonError"
        i = int(codec.decode(m.value(), h)["attributes"]["i"])  # the original bytes and schema headers survive
        assert i in poison and header_str(h, H_EXC_MESSAGE) == f"cannot bill entry {i}"
    assert {header_str(m.headers(), H_EXC_TYPE) for m in by_reason["undecodable"]} == {"SchemaError"}
    # Every offset, poison ones included, is committed: the group is not stuck behind them.
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group_id})
    from confluent_kafka import TopicPartition

    ends = [c.get_watermark_offsets(TopicPartition(topic, q), timeout=10)[1] for q in range(2)]
    got = [max(0, tp.offset) for tp in c.committed([TopicPartition(topic, q) for q in range(2)], timeout=10)]
    c.close()
    assert got == ends


def test_delayed_retry_topic_waits_until_due(kafka_bootstrap, make_topic, group_id):
    topic = make_topic(partitions=1)
    codec = default_codec()
    p = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(3):
        p.produce(topic, codec.encode(entry(i, "flaky" if i == 1 else "ok")), key=b"k", headers=codec.headers)
    p.flush(10)
    calls: list[tuple[int, int, str, float]] = []
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, retries=0,
                    retry_delays=[1.5])  # fmt: skip

    @app.handler
    def handle(e, ctx):
        i = int(e["attributes"]["i"])
        calls.append((i, ctx.attempt, ctx.topic, time.time()))
        if e["message"] == "flaky" and ctx.attempt == 1:
            raise TimeoutError("downstream busy")

    run_until(app, lambda: len(calls) == 4 and app.runtime.in_flight() == 0, 30, "the delayed retry")
    first = next(c for c in calls if c[0] == 1 and c[1] == 1)
    retry = next(c for c in calls if c[0] == 1 and c[1] == 2)
    assert retry[2] == f"{topic}.retry.1500ms"
    assert retry[3] - first[3] >= 1.5  # not before it was due
    # Non-blocking: entry 2 of the same key did not wait for the retry.
    assert next(c for c in calls if c[0] == 2)[3] < retry[3]
