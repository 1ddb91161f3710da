"""close_producer: deliver for a bounded time, then close; never hang on a Kafka that went away
(confluent-kafka's own close() flushes without a time limit)."""

from __future__ import annotations

import socket
import threading
import time

from confluent_kafka import KafkaError, Producer

from logferry.kafka import close_producer


def _run_bounded(producer: Producer, timeout: float) -> tuple[threading.Thread, list[int]]:
    left: list[int] = []
    t = threading.Thread(target=lambda: left.append(close_producer(producer, timeout)), daemon=True)
    t.start()
    return t, left


def test_unreachable_kafka_leaves_the_record_purged_and_closes_in_time() -> None:
    with socket.socket() as s:  # bound, never listening: every connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        reports: list[KafkaError | None] = []
        p = Producer({"bootstrap.servers": f"127.0.0.1:{port}", "message.timeout.ms": 600_000})
        p.produce("t", b"x", on_delivery=lambda err, _msg: reports.append(err))
        started = time.monotonic()
        t, left = _run_bounded(p, 0.5)
        t.join(60)
        assert not t.is_alive(), "close_producer hung"
        assert left == [1]
        assert time.monotonic() - started < 30
        assert [e.code() for e in reports if e is not None] == [KafkaError._PURGE_QUEUE]


def test_reachable_kafka_gets_everything_before_the_close(kafka_bootstrap: str, make_topic) -> None:
    topic = make_topic()
    reports: list[KafkaError | None] = []
    p = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 50})
    for i in range(100):
        p.produce(topic, b"%d" % i, on_delivery=lambda err, _msg: reports.append(err))
    t, left = _run_bounded(p, 30)
    t.join(60)
    assert left == [0]
    assert reports == [None] * 100
