"""A stopped Processor leaves no Kafka client open: each producer it made (dead letters and
retries, the live-replay control channel, the exactly-once transaction) is closed, not left for
the garbage collector — an embedding program that starts and stops members would otherwise
gather librdkafka instances, their threads and their connections."""

from __future__ import annotations

import gc

import pytest
from affinity_support import kafka_threads
from confluent_kafka import KafkaException
from processor_support import Running

from logferry.kafka import KafkaSettings
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


@pytest.mark.parametrize(("exactly_once", "asynchronous"), [(False, False), (False, True), (True, False)])
def test_a_processor_that_cannot_set_up_its_topics_closes_every_client(
    kafka_bootstrap, make_topic, group_id, exactly_once, asynchronous
):
    """The broker refuses the dead-letter topic the runtime creates before it subscribes (a legal
    name, but Kafka keeps `a.b` and `a_b` apart): run() raises that refusal, and the consumer and
    producers it had made are closed, not leaked."""
    src = make_topic()
    taken = make_topic(prefix="dead_letters")
    dlq = taken.replace("_", ".")
    out = make_topic(prefix="out") if exactly_once else None
    app = Processor(group_id, [src], bootstrap_servers=kafka_bootstrap, dead_letter_topic=dlq,
                    exactly_once=exactly_once, output_topic=out)  # fmt: skip

    async def handle_async(_entry, _ctx):
        return None

    app.handler(handle_async if asynchronous else lambda _entry, _ctx: None)
    with pytest.raises(KafkaException, match="collides"):
        app.run(install_signals=False)
    runtime = app._runtime
    assert runtime is not None
    if asynchronous:  # the never-started worker loop's own file descriptors
        assert runtime.dispatcher.loop.is_closed()  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="closed"):
        runtime.consumer.consume(1, 0)
    producers = [runtime.producer, runtime.txn] if exactly_once else [runtime.producer]  # type: ignore[attr-defined]
    for producer in producers:
        with pytest.raises(RuntimeError, match="closed"):
            producer.produce(src, b"after the failed start")


@pytest.mark.parametrize("failure", ["no coordinator", "transactional producer refused"])
def test_an_exactly_once_member_that_cannot_start_closes_every_client(monkeypatch, group_id, failure):
    """init_transactions times out (no broker at all), or the transactional producer cannot be
    made: the consumer and producers made before are closed, so their librdkafka threads are
    gone when run() raises."""
    monkeypatch.setattr("logferry.processors.exactly_once.TXN_TIMEOUT", 1.0)
    extra = {"enable.idempotence": False} if failure == "transactional producer refused" else {}
    app = Processor(group_id, ["t"], kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1", extra=extra),
                    exactly_once=True, output_topic="out", live_replay=False)  # fmt: skip
    app.handler(lambda _entry, _ctx: None)
    gc.collect()  # clients other tests left to the collector go now, not during the count
    before = len(kafka_threads())
    with pytest.raises(KafkaException):
        app.run(install_signals=False)
    assert len(kafka_threads()) <= before
