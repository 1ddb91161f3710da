"""A dead-letter send Kafka refuses, against the real broker: the record is neither handled nor
dead-lettered, so its partition must not commit past it; the stall shows in metrics, the send goes
again with back-off, and once Kafka accepts it the partition commits and runs again."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType
from processor_support import Running, committed, entry, log_end, produce, read_topic, wait_for
from prometheus_client import REGISTRY

from logferry.processors import Processor
from logferry.processors.failures import H_OFFSET, header_str
from logferry.schemas import default_codec

pytestmark = pytest.mark.kafka
POISON = 10


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_refused_dead_letter_stalls_visibly_and_commits_once_kafka_accepts_it(
    kafka_bootstrap, kafka_settings, make_topic, group_id
):
    topic = make_topic(partitions=1)
    # The dead-letter topic takes no record as large as the poison one, until the operator raises its limit.
    dlq = make_topic(prefix="dlq", config={"max.message.bytes": "2000"})
    produce(
        kafka_bootstrap, topic,
        [(b"k", entry(i, "poison" + "x" * 5000 if i == POISON else "ok")) for i in range(60)],
    )  # fmt: skip
    handled: set[int] = set()

    def handle(e, ctx):
        if e["message"].startswith("poison"):
            raise ValueError("cannot bill it")
        handled.add(int(e["attributes"]["i"]))

    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, retries=0,
                    dead_letter_topic=dlq, backoff_initial=0.05, backoff_max=0.3, commit_interval=0.1,
                    live_replay=False)  # fmt: skip
    app.handler(handle)
    failures = "logferry_processor_dead_letter_send_failures_total"
    refused = {"group": group_id, "kind": "dead_letter", "error": "MSG_SIZE_TOO_LARGE"}
    with Running(app):
        # Sent again and again (more than any fixed number of quick tries), visibly stalled and paused.
        wait_for(lambda: metric(failures, **refused) >= 5, 30, "repeated refused dead-letter sends")
        assert metric("logferry_processor_dead_letter_stalled", group=group_id) == 1
        wait_for(lambda: metric("logferry_processor_paused_partitions", group=group_id) == 1, 10, "the pause")
        wait_for(lambda: committed(kafka_bootstrap, group_id, topic) == [POISON], 10, "the commit up to the poison")
        assert committed(kafka_bootstrap, group_id, topic) == [POISON]  # never past it while it is unsent
        assert log_end(kafka_bootstrap, dlq) == [0]

        admin = kafka_settings.admin()
        raise_limit = ConfigEntry("max.message.bytes", "1000000", incremental_operation=AlterConfigOpType.SET)
        for fut in admin.incremental_alter_configs(
            [ConfigResource(ResourceType.TOPIC, dlq, incremental_configs=[raise_limit])]
        ).values():
            fut.result(30)

        wait_for(lambda: committed(kafka_bootstrap, group_id, topic) == [60], 30, "the commit past the poison")
        wait_for(lambda: len(handled) == 59, 30, "the records behind the poison")
    assert handled == set(range(60)) - {POISON}
    assert metric("logferry_processor_dead_letter_stalled", group=group_id) == 0
    dead = read_topic(kafka_bootstrap, dlq)
    assert [header_str(m.headers(), H_OFFSET) for m in dead] == [str(POISON)]  # written once, not lost
    assert default_codec().decode(dead[0].value(), dead[0].headers())["attributes"]["i"] == str(POISON)
    assert metric("logferry_processor_dead_lettered_total", group=group_id, topic=topic, reason="handler_failed") == 1
