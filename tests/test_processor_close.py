"""A stopped Processor leaves no Kafka client open: each producer it made (dead letters and
retries, the live-replay control channel, the exactly-once transaction) is closed, not left for
the garbage collector — an embedding program that starts and stops members would otherwise
gather librdkafka instances, their threads and their connections."""

from __future__ import annotations

import pytest
from processor_support import Running

from logferry.processors import Processor

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("exactly_once", [False, True])
def test_every_producer_of_a_stopped_processor_is_closed(kafka_bootstrap, make_topic, group_id, exactly_once):
    src = make_topic()
    out = make_topic(prefix="out") if exactly_once else None
    app = Processor(group_id, [src], bootstrap_servers=kafka_bootstrap, exactly_once=exactly_once, output_topic=out)
    app.handler(lambda _entry, _ctx: None)
    with Running(app):
        pass
    runtime = app._runtime
    assert runtime is not None and app.control is not None  # live replay is on by default
    producers = {"dead letters": runtime.producer, "control": app.control.producer}
    if exactly_once:
        producers["transaction"] = runtime.txn  # type: ignore[attr-defined]
    for name, producer in producers.items():
        try:
            producer.produce(src, b"after the stop")
        except RuntimeError as e:
            assert "closed" in str(e), (name, e)
        else:
            pytest.fail(f"the {name} producer is still open")
