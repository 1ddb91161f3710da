"""Acknowledgements to sources that checkpoint (files, the spool) only ever mean "Kafka has it" or
"Kafka refused it for good": never "the outage lasted too long" and never "purged at shutdown"."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from logferry.collectors.buffer import Buffer
from logferry.collectors.config import SinkSettings
from logferry.collectors.sink import KafkaSink
from logferry.collectors.testing import wait_until
from logferry.kafka import KafkaSettings
from logferry.schemas import default_codec


@pytest.fixture
def unreachable() -> Iterator[KafkaSettings]:
    """A Kafka that is away: a bound port nobody listens on (every connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield KafkaSettings(bootstrap_servers=f"127.0.0.1:{s.getsockname()[1]}")


def tracked_sink(kafka: KafkaSettings, settings: SinkSettings, acked: list[int], n: int) -> KafkaSink:
    now = int(time.time() * 1000)
    value = default_codec().encode({"timestamp": now * 1000, "received_at": now * 1000, "host": "h", "source": "f",
                                    "message": "a line of a file"})  # fmt: skip
    buffer = Buffer(10_000, 1 << 26)
    buffer.put([("logs", None, value, now, "f", i) for i in range(n)])  # tokens: the file's offsets
    sink = KafkaSink(kafka, settings, buffer, {"f": acked.extend})
    assert sink.counted is None  # a source wants acknowledgements: a report per entry
    return sink.start()


def test_an_outage_longer_than_the_delivery_timeout_settles_nothing(unreachable):
    acked: list[int] = []
    sink = tracked_sink(unreachable, SinkSettings(delivery_timeout_ms=1000), acked, 5)
    wait_until(lambda: sink.produced_total == 5, what="the entries handed to librdkafka")
    # The scenario is time passing: three delivery timeouts with Kafka away. Before, every entry
    # failed with _MSG_TIMED_OUT after one, and its file checkpoint moved past it.
    time.sleep(3.0)
    sink.stop_now()
    assert sink.failed_total == 0
    assert acked == []
    sink.close()


def test_entries_purged_at_shutdown_are_not_acknowledged(unreachable):
    acked: list[int] = []
    sink = tracked_sink(unreachable, SinkSettings(), acked, 5)
    wait_until(lambda: sink.produced_total == 5, what="the entries handed to librdkafka")
    sink.stop_now()
    sink.close()  # purges the five: counted as failures, but the file must read them again
    assert sink.failed_total == 5
    assert acked == []


def test_a_failed_switch_to_per_delivery_reports_is_tried_again(unreachable, monkeypatch):
    """The sink makes a new producer when a source starts wanting acknowledgements; if making it
    fails, the sink must keep the counting producer and try again, not report nothing for good."""
    from logferry.collectors import sink as sink_module

    sink = KafkaSink(unreachable, SinkSettings(), Buffer(100, 1 << 20))
    first = sink.producer
    real, failures = sink_module.Producer, [1]

    def flaky(config):
        if failures:
            failures.pop()
            raise RuntimeError("librdkafka could not start a producer")
        return real(config)

    monkeypatch.setattr(sink_module, "Producer", flaky)
    sink.start()
    sink.set_ack("f", lambda tokens: None)
    wait_until(lambda: sink.producer is not first, what="the per-delivery producer, made on a second try")
    assert sink.counted is None and not failures
    sink.stop_now()
    sink.close()
