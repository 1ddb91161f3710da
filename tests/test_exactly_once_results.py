"""Exactly-once results that cannot go out as they are, against the real broker.

A result that the transactional producer would refuse at produce() (too large for
message.max.bytes, a key or header of the wrong type) fails its own input like any handler
failure (dead letter), instead of aborting every transaction of the member forever or crashing
it; a delayed-retry copy commits with its input's offset, so an input handled again after an
abort yields its result once.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import pytest
from confluent_kafka import TopicPartition
from processor_support import committed, log_end, read_topic, run_in_thread, wait_for
from test_exactly_once import produce, read_all

from logferry.processors import Output, Processor
from logferry.processors.failures import H_OFFSET, header_str

pytestmark = pytest.mark.kafka
TOO_LARGE = 1_100_000  # above librdkafka's default message.max.bytes (1,000,000)


def run_until_all_committed(bootstrap: str, src: str, out: str, group: str, handler, n: int) -> None:
    app = Processor(group, [src], bootstrap_servers=bootstrap, exactly_once=True, output_topic=out,
                    member_id=uuid.uuid4().hex[:8], commit_interval=0.05, live_replay=False, retries=0)  # fmt: skip
    app.handler(handler)
    t, crashed = run_in_thread(app)  # the member must not die on a bad result
    try:
        wait_for(lambda: sum(committed(bootstrap, group, src)) == n or bool(crashed), 30, "every input committed")
    finally:
        app.stop()
        t.join(30)
    assert not crashed, f"the member crashed: {crashed[0]!r}"
    assert sum(committed(bootstrap, group, src)) == n


def dead_lettered_offsets(bootstrap: str, group: str) -> list[str | None]:
    return sorted(header_str(m.headers(), H_OFFSET) for m in read_topic(bootstrap, f"{group}.dlq"))


def test_an_oversized_result_dead_letters_its_input_instead_of_stalling_every_commit(
    kafka_bootstrap, make_topic, group_id
) -> None:
    src, out = make_topic(), make_topic(prefix="out")
    sent = produce(kafka_bootstrap, src, 12, keys=3)

    def handle(entry, ctx):
        if ctx.offset == 4:
            return b"x" * TOO_LARGE
        return f"{ctx.partition} {ctx.offset} {ctx.key.decode()} {entry['attributes']['seq']}"

    run_until_all_committed(kafka_bootstrap, src, out, group_id, handle, len(sent))
    results = Counter(" ".join(v.split()[2:]) for _, v in read_all(kafka_bootstrap, out, "read_committed"))
    assert results == Counter(f"{k} {s}" for i, (k, s) in enumerate(sent) if i != 4)
    assert dead_lettered_offsets(kafka_bootstrap, group_id) == ["4"]


def test_a_result_key_or_header_of_a_wrong_type_is_a_handler_failure_not_a_crash(
    kafka_bootstrap, make_topic, group_id
) -> None:
    src, out = make_topic(), make_topic(prefix="out")
    sent = produce(kafka_bootstrap, src, 8, keys=2)

    def handle(entry, ctx):
        if ctx.offset == 2:
            return Output("bad key", key=7)  # type: ignore[arg-type]
        if ctx.offset == 5:
            return Output("bad header", headers=[("h", 7)])  # type: ignore[list-item]
        return f"{ctx.offset}"

    run_until_all_committed(kafka_bootstrap, src, out, group_id, handle, len(sent))
    got = sorted(int(v) for _, v in read_all(kafka_bootstrap, out, "read_committed"))
    assert got == [i for i in range(len(sent)) if i not in (2, 5)]
    assert dead_lettered_offsets(kafka_bootstrap, group_id) == ["2", "5"]


def test_a_retry_copy_commits_with_its_inputs_offset_so_a_re_handled_input_yields_one_result(
    kafka_bootstrap, make_topic, group_id
) -> None:
    """Member A sends input 2 to the retry topic, then dies before its transaction commits (B, with
    A's member id, fences it). B handles input 2 again: a copy that outlived A's transaction would
    give input 2 a second result."""
    src, out = make_topic(), make_topic(prefix="out")
    sent = produce(kafka_bootstrap, src, 6, keys=2)
    retry = f"{src}.retry.300ms"
    failed_once = threading.Event()
    member = uuid.uuid4().hex[:8]

    def start() -> tuple[Processor, threading.Thread, list[BaseException], set[tuple[str, int]]]:
        app = Processor(group_id, [src], bootstrap_servers=kafka_bootstrap, exactly_once=True, output_topic=out,
                        member_id=member, commit_interval=30, live_replay=False, retries=0,
                        retry_delays=[0.3])  # fmt: skip
        handled: set[tuple[str, int]] = set()

        @app.handler
        def handle(entry, ctx):
            if ctx.topic == src and ctx.offset == 2 and not failed_once.is_set():
                failed_once.set()
                raise RuntimeError("transient")
            handled.add((ctx.topic, ctx.offset))
            return f"{ctx.key.decode()} {entry['attributes']['seq']}"

        t, raised = run_in_thread(app)
        assert app.wait_assigned(30)
        return app, t, raised, handled

    every_input = {(src, i) for i in range(len(sent))}
    a, ta, a_raised, by_a = start()
    # Every input handled or diverted (the retry copy sent), none committed (commit_interval=30).
    wait_for(lambda: len(by_a & every_input) == 5 and a.runtime.in_flight() == 0, 30, "A's work")
    b, tb, b_raised, by_b = start()
    ta.join(30)
    assert a_raised and "fenced" in str(a_raised[0]), a_raised  # A never committed
    with pytest.raises(RuntimeError, match="closed"):  # the fenced member still closed its transactional producer
        a.runtime.txn.poll(0)

    def b_done() -> bool:
        hw = log_end(kafka_bootstrap, retry)[0]
        pos = b.runtime.consumer.position([TopicPartition(retry, 0)])[0].offset
        return every_input <= by_b and max(pos, 0) >= hw and b.runtime.in_flight() == 0

    wait_for(b_done, 30, "B handled every input and every visible retry copy")
    b.stop()
    tb.join(30)
    assert not b_raised, b_raised
    results = Counter(v for _, v in read_all(kafka_bootstrap, out, "read_committed"))
    assert results == Counter(f"{k} {s}" for k, s in sent)
