"""Priority against the real broker: low-priority topics run once the high-priority ones are caught up,
including high-priority partitions that never deliver a record (empty topics, idle retry topics)."""

from __future__ import annotations

import threading

import pytest
from processor_support import Running, committed, entry, log_end, produce, wait_for

from logferry.processors import Processor

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize(
    ("high_records", "retry_delays"),
    [(0, []), (30, [60.0])],
    ids=["empty-high-topic", "idle-retry-topic"],
)
def test_low_priority_topic_runs_when_high_priority_partitions_never_deliver(
    kafka_bootstrap, make_topic, group_id, high_records, retry_delays
):
    high, low = make_topic(partitions=2), make_topic(partitions=1)
    # Partition 1 of the high topic (and every retry-topic partition) stays empty: its position is never known.
    produce(kafka_bootstrap, high, [(b"k", entry(i)) for i in range(high_records)], partition=0)
    produce(kafka_bootstrap, low, [(f"k{i % 3}".encode(), entry(i)) for i in range(40)])
    order: list[str] = []
    lock = threading.Lock()

    def handle(e, ctx):
        with lock:
            order.append(ctx.topic)

    app = Processor(group=group_id, topics=[high], low_priority_topics=[low], bootstrap_servers=kafka_bootstrap,
                    retry_delays=retry_delays, commit_interval=0.1, live_replay=False)  # fmt: skip
    app.handler(handle)
    with Running(app):
        wait_for(lambda: len(order) == high_records + 40, 30, "the low-priority records (not paused forever)")
        wait_for(lambda: committed(kafka_bootstrap, group_id, low) == log_end(kafka_bootstrap, low), 30, "commits")
    # Still in priority order: every high-priority record ran before the first low-priority one.
    assert order[:high_records] == [high] * high_records
