"""The poll thread admits a plain partition's run of records a chunk at a time (`Runtime._admit`);
anything unusual goes record by record (`Runtime._admit_each`). Both must leave exactly the same
tracking state and hand the dispatcher exactly the same work, in the same order."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logferry.kafka import KafkaSettings
from logferry.processors.config import ProcessorSection
from logferry.processors.context import Context
from logferry.processors.runtime import SUBMIT_EVERY, Runtime
from logferry.processors.tracking import PartitionState
from logferry.schemas import default_codec
from tests.processor_support import entry

TOPICS = ("orders", "audit")


class Recorder:
    """Stands in for the dispatcher and the failure router: records what the poll thread hands over."""

    def __init__(self) -> None:
        self.submitted: list[Context] = []
        self.given_up: list[int] = []

    def submit(self, items: list[Context]) -> None:
        assert 0 < len(items) <= SUBMIT_EVERY
        self.submitted.extend(items)

    def give_up(self, ctx: Context, exc: BaseException, reason: str) -> None:
        self.given_up.append(ctx.offset)


@st.composite
def fetches(draw: Any, topics: tuple[str, ...]) -> list[Message]:
    """A fetch as librdkafka returns it: runs of one partition, offsets rising within a partition
    (a partition's records may repeat some fetched before, even within one run), some keys
    missing, some values undecodable, partition-EOF events between runs."""
    codec = default_codec()
    next_offset: dict[tuple[str, int], int] = {}
    msgs: list[Message] = []
    topic, partition = topics[0], 0
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 2)):  # else the same partition again: a run that goes back on itself
            topic, partition = draw(st.sampled_from(topics)), draw(st.integers(0, 2))
        start = next_offset.get((topic, partition), draw(st.integers(0, 50)))
        start -= draw(st.sampled_from([0, 0, 0, 2]))  # a refetch repeats a few records
        n = draw(st.one_of(st.integers(1, 10), st.integers(SUBMIT_EVERY, 2 * SUBMIT_EVERY + 30)))
        for offset in range(max(start, 0), max(start, 0) + n):
            key = draw(st.sampled_from([b"k1", b"k2", b"k3", None])) if draw(st.booleans()) else b"k0"
            bad = draw(st.integers(0, 200)) == 0
            value = b"\xff\xff not avro" if bad else codec.encode(entry(offset))
            msgs.append(Message(topic=topic, partition=partition, offset=offset, key=key, value=value,
                                headers=codec.headers))  # fmt: skip
        next_offset[(topic, partition)] = max(start, 0) + n
        if draw(st.integers(0, 3)) == 0:
            msgs.append(Message(topic=topic, partition=partition, offset=next_offset[(topic, partition)],
                                error=KafkaError(KafkaError._PARTITION_EOF)))  # fmt: skip
    return msgs


def _runtime(bootstrap: str, ordering: str, topics: list[str]) -> Runtime:
    rt = Runtime(ProcessorSection(group="admit-paths", topics=topics, ordering=ordering),
                 KafkaSettings(bootstrap_servers=bootstrap), lambda e, c: None)  # fmt: skip
    rt.dispatcher = Recorder()  # type: ignore[assignment]
    rt.router = rt.dispatcher  # type: ignore[assignment]
    return rt


def _reset(rt: Runtime, revoked: tuple[str, int] | None) -> None:
    rt.dispatcher = rt.router = Recorder()  # type: ignore[assignment]
    rt.states = {(t, p): PartitionState(t, p) for t in TOPICS for p in range(3) if (t, p) != revoked}
    rt.catch_up = type(rt.catch_up)()


def _outcome(rt: Runtime) -> tuple[Any, ...]:
    rec: Recorder = rt.dispatcher  # type: ignore[assignment]
    work = [(c.topic, c.partition, c.offset, c.lane, c._done, c.entry) for c in rec.submitted]
    states = {tp: (s.last_seen, s.admitted, [(c.offset, c.lane, c._done, c._started) for c in s.pending])
              for tp, s in rt.states.items()}  # fmt: skip
    return work, states, rec.given_up


@pytest.mark.parametrize(("ordering", "topics"), [
    ("key", ["orders"]), ("key", list(TOPICS)), ("partition", ["orders"]), ("unordered", ["orders"]),
])  # fmt: skip
def test_chunked_admission_matches_record_by_record(kafka_bootstrap: str, ordering: str, topics: list[str]) -> None:
    fast, each = _runtime(kafka_bootstrap, ordering, topics), _runtime(kafka_bootstrap, ordering, topics)

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(fetch=fetches(tuple(topics)), revoked=st.sampled_from([None, ("orders", 1)]))
    def check(fetch: list[Message], revoked: tuple[str, int] | None) -> None:
        _reset(fast, revoked)
        _reset(each, revoked)
        fast._admit(fetch)
        each._admit_each(fetch)
        (fast_work, fast_states, fast_dlq), (work, states, dlq) = _outcome(fast), _outcome(each)
        assert fast_dlq == dlq
        assert fast_states == states
        assert fast_work == work

    try:
        check()
    finally:
        for rt in (fast, each):
            rt.consumer.close()
            rt.producer.close()


def _fetch(partition: int, offsets: list[int], keys: list[bytes | None] | None = None) -> list[Message]:
    codec = default_codec()
    keys = keys or [b"k%d" % (o % 7) for o in offsets]
    return [Message(topic="orders", partition=partition, offset=o, key=k, value=codec.encode(entry(o)),
                    headers=codec.headers) for o, k in zip(offsets, keys, strict=True)]  # fmt: skip


def test_plain_runs_take_the_chunked_path_and_odd_runs_do_not(kafka_bootstrap: str) -> None:
    """The cases the chunked path must hand back, each on its own (random fetches may miss one)."""
    fast, each = _runtime(kafka_bootstrap, "key", ["orders"]), _runtime(kafka_bootstrap, "key", ["orders"])
    one_by_one: list[int] = []
    admit_each = fast._admit_each
    fast._admit_each = lambda msgs: one_by_one.extend(m.offset() for m in msgs) or admit_each(msgs)  # type: ignore[method-assign]
    plain = _fetch(0, list(range(250))) + _fetch(1, list(range(10, 260, 2)))  # gaps: compaction, markers
    back_on_itself = _fetch(2, [*range(150), *range(140, 160)])
    keyless = _fetch(0, list(range(250, 260)), [b"a", None, *[b"b"] * 8])
    try:
        for fetch, expected in ((plain, []), (back_on_itself, [*range(150), *range(140, 160)]),
                                (keyless, [])):  # fmt: skip
            _reset(fast, None)
            _reset(each, None)
            one_by_one.clear()
            fast._admit(fetch)
            each._admit_each(fetch)
            assert _outcome(fast) == _outcome(each)
            assert one_by_one == expected
        assert [c.lane for c in fast.dispatcher.submitted[:2]] == [b"a", ("orders", 0)]  # type: ignore[attr-defined]
    finally:
        for rt in (fast, each):
            rt.consumer.close()
            rt.producer.close()
