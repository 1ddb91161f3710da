"""The sink's delivery reports: counted (Kafka reports failures only) while no source wants
acknowledgements, one per entry from the first source that does; the counts against the broker."""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from logferry.collectors.buffer import Buffer, Record
from logferry.collectors.config import SinkSettings
from logferry.collectors.sink import CountedDeliveries, KafkaSink
from logferry.collectors.testing import read_topic, wait_until
from logferry.schemas import default_codec


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def entries(n: int, tag: str) -> list[bytes]:
    codec = default_codec()
    now = int(time.time() * 1_000_000)
    return [
        codec.encode({"timestamp": now, "received_at": now, "host": "h", "source": "s", "message": f"{tag} {i}"})
        for i in range(n)
    ]


def records(
    topic: str, values: list[bytes], ts_ms: int, source: str = "sock", tokens: list[Any] | None = None
) -> list[Record]:
    return [(topic, None, v, ts_ms, source, tokens[i] if tokens else None) for i, v in enumerate(values)]


# ---- the counting itself, without Kafka --------------------------------------------------------
batch = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 3), st.integers(0, 50)), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.lists(batch, min_size=1, max_size=6), st.data())
def test_counted_deliveries_attribute_every_settled_entry_once(batches, data):
    counted = CountedDeliveries()
    tallies: dict[str, list[int]] = {}
    latencies: dict[int, int] = {}
    produced: list[tuple[str, int, int]] = []
    for b in batches:
        counted.add([(topic, None, b"x" * size, ts, "s", None) for topic, ts, size in b])
        produced += b
        # librdkafka's outstanding count only goes down as reports are served
        outstanding = data.draw(st.integers(0, len(produced) - counted.settled))
        counted.settle(outstanding, tallies, latencies)
        settled = len(produced) - outstanding
        assert sum(t[0] for t in tallies.values()) == sum(latencies.values()) == settled
    counted.settle(0, tallies, latencies)
    assert {t: v[0] for t, v in tallies.items()} == dict(Counter(topic for topic, _, _ in produced))
    by_topic_bytes: Counter[str] = Counter()
    for topic, _, size in produced:
        by_topic_bytes[topic] += size
    assert {t: v[1] for t, v in tallies.items()} == dict(by_topic_bytes)
    assert latencies == dict(Counter(ts for _, ts, _ in produced))


# ---- against the broker ---------------------------------------------------------------------------
@pytest.fixture
def sink_for(kafka_settings):
    sinks: list[KafkaSink] = []

    def make(buffer: Buffer) -> KafkaSink:
        sink = KafkaSink(kafka_settings, SinkSettings(), buffer)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.drain(10)
        sink.close()


@pytest.mark.kafka
def test_counted_deliveries_match_kafka_and_a_refused_entry_is_not_delivered(kafka_settings, make_topic, sink_for):
    topic = make_topic(config={"max.message.bytes": "20000"})
    buffer = Buffer(10_000, 1 << 26)
    sink = sink_for(buffer)
    assert sink.counted is not None  # no source wants acknowledgements: failures only
    before = {
        "delivered": metric("logferry_entries_delivered_total", topic=topic),
        "count": metric("logferry_delivery_latency_seconds_count"),
        "under_30s": metric("logferry_delivery_latency_seconds_bucket", le="30.0"),
    }
    sink.start()
    now_ms = int(time.time() * 1000)
    old, new = entries(150, "old"), entries(150, "new")
    buffer.put(records(topic, old, now_ms - 60_000) + records(topic, new, now_ms))  # received a minute ago, and now
    wait_until(lambda: sink.delivered_total == 300, what="300 entries counted delivered")
    buffer.put(records(topic, [os.urandom(100_000)], now_ms))  # over the topic's max.message.bytes
    wait_until(lambda: sink.failed_total == 1, what="the oversize entry refused")
    last = entries(100, "last")
    buffer.put(records(topic, last, int(time.time() * 1000)))
    wait_until(lambda: sink.delivered_total == 400, what="400 entries counted delivered")

    got = read_topic(kafka_settings, topic, 400, settle=0.5)
    assert [d.entry["message"] for d in got] == [f"old {i}" for i in range(150)] + [f"new {i}" for i in range(150)] + [
        f"last {i}" for i in range(100)
    ]
    sent = old + new + last
    assert metric("logferry_entries_delivered_total", topic=topic) - before["delivered"] == len(sent)
    assert metric("logferry_bytes_delivered_total", topic=topic) == sum(map(len, sent))
    assert metric("logferry_delivery_failures_total", topic=topic, reason="MSG_SIZE_TOO_LARGE") == 1
    assert metric("logferry_delivery_latency_seconds_count") - before["count"] == len(sent)
    # The 150 received a minute earlier are the ones over 30 s: latencies follow each entry's receipt.
    slow = (metric("logferry_delivery_latency_seconds_count") - before["count"]) - (
        metric("logferry_delivery_latency_seconds_bucket", le="30.0") - before["under_30s"]
    )
    assert slow == len(old)
    assert sink.counted is not None and len(sink.producer) == 0


@pytest.mark.kafka
def test_a_source_wanting_acks_switches_to_reports_without_reordering(kafka_settings, make_topic, sink_for):
    topic = make_topic()
    buffer = Buffer(10_000, 1 << 26)
    sink = sink_for(buffer).start()
    first = entries(2000, "sock")
    buffer.put(records(topic, first, int(time.time() * 1000)))
    counted = sink.counted
    assert counted is not None
    wait_until(lambda: counted.produced == 2000, what="the socket entries handed to the counting producer")
    acked: list[int] = []
    sink.set_ack("files", acked.extend)  # e.g. a file source added by SIGHUP
    files = entries(200, "file")
    buffer.put(records(topic, files, int(time.time() * 1000), source="files", tokens=list(range(200))))
    wait_until(lambda: len(acked) == 200, what="the file entries acknowledged")
    assert acked == list(range(200))
    assert sink.counted is None  # every delivery reported from now on
    assert counted.settled == 2000  # the counting producer delivered all it held before the switch
    got = read_topic(kafka_settings, topic, 2200, settle=0.5)
    assert [d.entry["message"] for d in got] == [f"sock {i}" for i in range(2000)] + [f"file {i}" for i in range(200)]
    wait_until(lambda: sink.delivered_total == 2200, what="all 2200 counted delivered")


@pytest.mark.kafka
def test_an_ack_token_reaching_the_counting_producer_switches_it_first(kafka_settings, make_topic, sink_for):
    """A batch with ack tokens taken before the switch: the tokened tail goes back, then reports begin."""
    topic = make_topic()
    buffer = Buffer(10_000, 1 << 26)
    sink = sink_for(buffer)
    now_ms = int(time.time() * 1000)
    a, b, c = entries(100, "a"), entries(100, "b"), entries(100, "c")
    buffer.put(
        records(topic, a, now_ms) + records(topic, b, now_ms, source="late", tokens=list(range(100)))
        + records(topic, c, now_ms)
    )  # fmt: skip
    sink.start()
    wait_until(lambda: sink.counted is None, what="the switch to a report per entry")
    got = read_topic(kafka_settings, topic, 300, settle=0.5)
    assert [d.entry["message"] for d in got] == [f"{t} {i}" for t in "abc" for i in range(100)]
    wait_until(lambda: sink.delivered_total == 300, what="all 300 counted delivered")


@pytest.mark.kafka
def test_an_entry_refused_before_queueing_is_neither_counted_produced_nor_delivered(
    kafka_settings, make_topic, sink_for
):
    topic = make_topic()
    buffer = Buffer(10_000, 1 << 26)
    sink = sink_for(buffer).start()
    before, huge = entries(50, "before"), os.urandom(SinkSettings().max_message_bytes + 1)
    after = entries(50, "after")
    now_ms = int(time.time() * 1000)
    buffer.put(records(topic, before, now_ms) + records(topic, [huge], now_ms) + records(topic, after, now_ms))
    wait_until(lambda: sink.failed_total == 1 and sink.delivered_total == 100, what="100 delivered, 1 refused")
    got = read_topic(kafka_settings, topic, 100, settle=0.5)
    assert [d.entry["message"] for d in got] == [f"before {i}" for i in range(50)] + [f"after {i}" for i in range(50)]
    assert sink.counted is not None and sink.counted.produced == sink.counted.settled == 100
    assert metric("logferry_entries_delivered_total", topic=topic) == 100
