"""The retry paths against the real broker: a delayed-retry rewind under a rate limit skips nothing,
retried records keep their key's lane, and a partition revoked mid-retry is not dead-lettered."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from processor_support import Running, committed, entry, log_end, produce, read_topic, wait_for
from prometheus_client import REGISTRY

from logferry.processors import Processor
from logferry.processors.failures import retry_topic

pytestmark = pytest.mark.kafka


def test_delayed_retry_rewind_under_a_rate_limit_skips_no_record(kafka_bootstrap, make_topic, group_id):
    """Every retry record arrives in one batch and waits for rate-limit tokens. The first is not due
    yet, so its partition rewinds; the others still held must not be admitted past it once it is due
    (that made the rewound records look fetched twice: skipped, and committed unhandled)."""
    topic = make_topic(partitions=1)
    n = 20
    produce(kafka_bootstrap, topic, [(f"k{i}".encode(), entry(i)) for i in range(n)])
    attempts: dict[int, list[int]] = {}
    lock = threading.Lock()

    def handle(e, ctx):
        i = int(e["attributes"]["i"])
        with lock:
            attempts.setdefault(i, []).append(ctx.attempt)
        if ctx.attempt == 1:
            raise TimeoutError("downstream busy")

    # The burst admits all n at once; their retries then trickle in at 20/s, spanning past the delay.
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, retries=0,
                    retry_delays=[0.5], rate_limit=20, rate_burst=n, commit_interval=0.1,
                    live_replay=False)  # fmt: skip
    app.handler(handle)
    retries = retry_topic(topic, 0.5)
    with Running(app):
        wait_for(lambda: committed(kafka_bootstrap, group_id, retries) == [n], 30, "the retry topic committed")
        with lock:
            retried = sorted(i for i, a in attempts.items() if 2 in a)
    assert retried == list(range(n)), f"retry records committed without being handled: {set(range(n)) - set(retried)}"


@pytest.mark.parametrize("two_topics", [False, True], ids=["one-source-topic", "two-source-topics"])
def test_a_retried_record_never_runs_beside_its_key(kafka_bootstrap, make_topic, group_id, two_topics):
    """The retry topic's copy of key k shares k's lane in its source topic, so it waits for the
    record of k running there instead of running at the same time."""
    topic = make_topic(partitions=1)
    other = [make_topic(partitions=1)] if two_topics else []
    produce(kafka_bootstrap, topic, [(b"k", entry(i)) for i in range(30)])
    running: Counter[bytes] = Counter()
    overlaps: list[int] = []
    retried = threading.Event()
    lock = threading.Lock()

    def handle(e, ctx):
        with lock:
            running[ctx.key] += 1
            overlaps.append(running[ctx.key])
        try:
            if e["attributes"]["i"] == "0" and ctx.attempt == 1:
                raise TimeoutError("downstream busy")
            time.sleep(0.03)  # the key's 29 other records keep its lane busy for ~0.9 s, past the retry delay
            if ctx.attempt == 2:
                retried.set()
        finally:
            with lock:
                running[ctx.key] -= 1

    app = Processor(group=group_id, topics=[topic, *other], bootstrap_servers=kafka_bootstrap, retries=0,
                    retry_delays=[0.2], concurrency=8, live_replay=False)  # fmt: skip
    app.handler(handle)
    with Running(app):
        wait_for(retried.is_set, 30, "the retried record")
        wait_for(lambda: len(overlaps) == 31, 30, "every record of the key")
    assert max(overlaps) == 1, "a retried record ran at the same time as another record of its key"


def test_a_partition_revoked_mid_retry_is_handed_over_not_dead_lettered(kafka_bootstrap, make_topic, group_id):
    """Member A retries a failing record in place; B joins and takes its partition. A must leave
    the record to B (uncommitted) instead of dead-lettering it and committing past it."""
    topic, dlq = make_topic(partitions=2), make_topic(prefix="dlq")
    for p in range(2):
        produce(kafka_bootstrap, topic, [(f"k{p}".encode(), entry(i, "flaky" if i == 0 else "ok")) for i in range(5)],
                partition=p)  # fmt: skip
    handled_by: dict[str, list[tuple[int, str]]] = {"a": [], "b": []}
    b_assigned = threading.Event()
    options = dict(bootstrap_servers=kafka_bootstrap, dead_letter_topic=dlq, retries=100, backoff_initial=0.2,
                   backoff_max=0.2, revoke_grace=1.0, commit_interval=0.1, live_replay=False)  # fmt: skip
    a = Processor(group=group_id, topics=[topic], **options)
    b = Processor(group=group_id, topics=[topic], **options)

    @a.handler
    def handle_a(e, ctx):
        ours = (ctx.topic, ctx.partition) in a.runtime.assignment()
        if e["message"] == "flaky" and not (b_assigned.is_set() and ours):
            raise TimeoutError("downstream busy")  # until B has joined, and for good once revoked
        handled_by["a"].append((ctx.partition, e["message"]))

    @b.handler
    def handle_b(e, ctx):
        handled_by["b"].append((ctx.partition, e["message"]))

    def flaky_handled() -> int:
        return sum(m == "flaky" for rows in handled_by.values() for _, m in rows)

    attempts = "logferry_processor_failed_total"
    with Running(a):
        wait_for(lambda: (REGISTRY.get_sample_value(attempts, {"group": group_id, "topic": topic}) or 0) >= 4, 30,
                 "both flaky records retrying in place")  # fmt: skip
        with Running(b):
            b_assigned.set()
            wait_for(lambda: flaky_handled() == 2, 30, "both flaky records handled")
            ends = log_end(kafka_bootstrap, topic, 2)
            wait_for(lambda: committed(kafka_bootstrap, group_id, topic, 2) == ends, 30, "everything committed")
    # Both members have stopped and flushed their producers: a dead letter would be in Kafka now.
    assert read_topic(kafka_bootstrap, dlq) == []
    assert [m for _, m in handled_by["b"]].count("flaky") == 1  # the revoked one, handled by its new owner
