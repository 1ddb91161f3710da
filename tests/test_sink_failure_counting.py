"""Failed entries in the sink's counted deliveries (failure-only reports): a failure is never counted
as somebody else's delivery, and every delivered entry gets exactly one latency observation."""

from __future__ import annotations

import os
import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from logferry.collectors.buffer import Buffer, Record
from logferry.collectors.config import SinkSettings
from logferry.collectors.sink import CountedDeliveries, KafkaSink
from logferry.collectors.testing import wait_until
from logferry.kafka import KafkaSettings
from logferry.schemas import default_codec


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def entry(tag: str) -> bytes:
    now = int(time.time() * 1_000_000)
    return default_codec().encode({"timestamp": now, "received_at": now, "host": "h", "source": "s", "message": tag})


def delivered(*topics: str) -> float:
    return sum(metric("logferry_entries_delivered_total", topic=t) for t in topics)


# ---- the counting with failures, without Kafka -------------------------------------------------
batch = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 3), st.integers(0, 50)), min_size=1, max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.lists(batch, min_size=1, max_size=6), st.data())
def test_counted_deliveries_with_failures_count_exactly_the_deliveries(batches, data):
    """Entries settle in any order (partitions), some fail (reported before they leave librdkafka's count):
    after each poll exactly the delivered are counted; once later entries settled, per topic too."""
    counted = CountedDeliveries()
    tallies: dict[str, list[int]] = {}
    latencies: dict[int, int] = {}
    produced: list[tuple[str, int, int]] = []
    unsettled: list[int] = []
    delivered: list[int] = []

    def produce(b: list[tuple[str, int, int]]) -> None:
        counted.add([(topic, None, b"x" * size, ts, "s", None) for topic, ts, size in b])
        unsettled.extend(range(len(produced), len(produced) + len(b)))
        produced.extend(b)

    for b in batches:
        produce(b)
        for i in data.draw(st.lists(st.sampled_from(unsettled), unique=True)) if unsettled else []:
            if data.draw(st.booleans()):  # failed: as the sink's failure report does
                topic, _ts, size = produced[i]
                counted.fail(topic)
                tallies.setdefault(topic, [0, 0])[1] -= size
            else:
                delivered.append(i)
            unsettled.remove(i)
        counted.settle(len(unsettled), tallies, latencies)
        assert sum(t[0] for t in tallies.values()) == sum(latencies.values()) == len(delivered)
    # Everything left is delivered, then more of every topic than could fail: every place is passed.
    produce([(topic, 0, 1) for topic in "ab" for _ in range(len(produced) + 1)])
    delivered += unsettled
    counted.settle(0, tallies, latencies)
    assert sum(latencies.values()) == len(delivered)
    for topic in "ab":
        mine = [produced[i] for i in delivered if produced[i][0] == topic]
        assert tallies[topic] == [len(mine), sum(size for _, _, size in mine)]


# ---- against the broker ---------------------------------------------------------------------------
@pytest.fixture
def topics(make_topic) -> tuple[str, str, str]:
    """A topic whose entries stay in flight (its name collides with an existing topic's, so the broker
    never creates it: librdkafka waits for it), one that refuses entries over 20 kB, and an ordinary one."""
    stuck = make_topic(prefix="stuck_review").replace("_", ".")
    return stuck, make_topic(config={"max.message.bytes": "20000"}), make_topic()


def counting_sink(kafka_settings, records: list[Record]) -> KafkaSink:
    buffer = Buffer(10_000, 1 << 26)
    buffer.put(records)
    sink = KafkaSink(kafka_settings, SinkSettings(), buffer)
    assert sink.counted is not None  # failure-only reports, deliveries counted
    return sink.start()


@pytest.mark.kafka
def test_a_failure_is_not_counted_as_a_delivery_of_an_older_entry_of_another_topic(kafka_settings, topics):
    stuck, small, _ = topics
    now = int(time.time() * 1000)
    sink = counting_sink(kafka_settings, [(stuck, None, entry("stuck"), now, "s", None),
                                          (small, None, os.urandom(100_000), now, "s", None)])  # fmt: skip
    wait_until(lambda: sink.failed_total == 1, what="the oversize entry refused")
    sink.stop_now()  # its step ends with the tallies pushed
    assert sink.in_flight == 1
    assert sink.delivered_total == 0, "the refused entry was counted as the stuck entry's delivery"
    sink.close()  # purges the stuck entry: a second failure
    assert sink.failed_total == 2
    assert sink.delivered_total == 0
    assert delivered(stuck, small) == 0


@pytest.mark.kafka
def test_a_failure_after_a_newer_entry_was_counted_in_its_place_keeps_the_total_exact(kafka_settings, topics):
    stuck, _, ok = topics
    now = int(time.time() * 1000)
    sink = counting_sink(kafka_settings, [(stuck, None, entry("stuck"), now, "s", None),
                                          (ok, None, entry("ok"), now, "s", None)])  # fmt: skip
    wait_until(lambda: sink.delivered_total == 1, what="the ordinary entry delivered")
    sink.stop_now()
    sink.close()  # the stuck entry, counted settled in produce order before it, fails now
    assert sink.failed_total == 1
    assert sink.delivered_total == 1
    # Which topic got the count can be off by the entries in flight; the total cannot.
    assert delivered(stuck, ok) == 1


@pytest.mark.kafka
def test_entries_received_in_the_future_are_each_observed_once(kafka_settings, make_topic):
    """A clock stepped back: receive times after now all clamp to a latency of 0, and still count."""
    topic = make_topic()
    future = int(time.time() * 1000) + 60_000
    n = 10
    buffer = Buffer(10_000, 1 << 26)
    acked: list[int] = []
    sink = KafkaSink(kafka_settings, SinkSettings(), buffer, {"f": acked.extend})
    before = metric("logferry_delivery_latency_seconds_count")
    buffer.put([(topic, None, entry(f"e{i}"), future + i, "f", i) for i in range(n)])  # n receive times
    sink.start()
    wait_until(lambda: len(acked) == n, what="all acknowledged")
    sink.drain(10)
    sink.close()
    assert sink.delivered_total == n
    assert metric("logferry_delivery_latency_seconds_count") - before == n


@pytest.mark.kafka
def test_a_failure_served_while_waiting_for_queue_room_is_not_counted_delivered(kafka_settings, topics):
    """A batch larger than librdkafka's free room waits in poll() halfway: a failure served there is of
    an entry of this very batch. (In production the queue's 256 MB byte limit fills first; a message
    limit below the sink's `room` stands in for it here.)"""
    _, small, ok = topics
    buffer = Buffer(10_000, 1 << 26)
    sink = KafkaSink(kafka_settings, SinkSettings(), buffer)
    sink._config["queue.buffering.max.messages"] = 5
    first, sink.producer = sink.producer, sink._new_producer()
    first.close()
    now = int(time.time() * 1000)
    n = 20
    buffer.put([(small, None, os.urandom(100_000), now, "s", None)]
               + [(ok, None, entry(f"ok {i}"), now, "s", None) for i in range(n)])  # fmt: skip
    sink.start()
    wait_until(lambda: sink.failed_total == 1 and sink.delivered_total >= n, what="1 refused, the rest delivered")
    assert sink.drain(10) == 0
    sink.close()
    assert sink.failed_total == 1
    assert sink.delivered_total == n
    assert delivered(small, ok) == n


def test_what_is_left_at_shutdown_counts_entries_not_kafkas_queued_error_events():
    """With Kafka away librdkafka queues an error event per failed connection, and its len() counts
    them beside the entries: counted as left, they made a drained agent report more undelivered
    entries than it ever took (25001 of 25000) and a finite run exit 1."""
    with socket.socket() as refusing:  # bound, never listening: every connection refused
        refusing.bind(("127.0.0.1", 0))
        kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{refusing.getsockname()[1]}")
        buffer = Buffer(100, 1 << 20)
        buffer.put([("logs", None, entry(str(i)), int(time.time() * 1000), "s", None) for i in range(5)])
        sink = KafkaSink(kafka, SinkSettings(), buffer, {}).start()
        wait_until(lambda: sink.produced_total == 5, what="the entries handed to librdkafka")
        assert sink.stop_now() == 5  # the sink thread stops polling; librdkafka goes on failing to connect
        wait_until(lambda: len(sink.producer) > 5, what="an error event queued beside the five entries")
        assert sink.drain(0) == 5
        sink.close()
