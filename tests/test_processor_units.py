"""Unit tests of the processor runtime's parts that need no broker: tracking, dispatch order, shaping."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logferry.processors.builtins import Archive, read_archive
from logferry.processors.config import ArchiveSettings, FilterSettings
from logferry.processors.context import Context
from logferry.processors.dispatch import AsyncDispatcher, KeyedQueue, ThreadDispatcher
from logferry.processors.failures import Backoff, format_delay, retry_topic
from logferry.processors.filtering import EntryFilter
from logferry.processors.shaping import TokenBucket, Watermarks
from logferry.processors.tracking import PartitionState, complete


class FakeMessage:
    """The few Message accessors a Context reads; a plain record, not a Kafka stand-in."""

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None = None) -> None:
        self._t, self._p, self._o, self._k = topic, partition, offset, key

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def key(self):
        return self._k

    def headers(self):
        return None


def ctx_for(state: PartitionState, offset: int, lane: object = None, entry: object = None) -> Context:
    msg = FakeMessage(state.topic, state.partition, offset, str(lane).encode())
    return Context(msg, state, entry, lane if lane is not None else offset, offset)


# ---- tracking -----------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 3), min_size=1, max_size=60),
    order=st.randoms(use_true_random=False),
)
def test_committable_is_the_first_offset_not_done(gaps, order):
    state = PartitionState("t", 0)
    offsets, off = [], 100
    for g in gaps:  # offsets with holes, as after compaction or transaction markers
        off += g
        offsets.append(off)
    ctxs = [ctx_for(state, o) for o in offsets]
    for c in ctxs:
        state.admit(c)
    assert state.committable() == offsets[0]
    pending = list(ctxs)
    order.shuffle(pending)
    done: set[int] = set()
    for c in pending:
        complete([c])
        done.add(c.offset)
        expect = next((o for o in offsets if o not in done), offsets[-1] + 1)
        got = state.committable()
        assert got == expect
        assert all(o in done for o in offsets if o < got)  # never ahead of work
    assert state.in_flight == 0


def test_to_commit_only_moves_forward():
    state = PartitionState("t", 0)
    assert state.to_commit() is None  # nothing fetched: nothing to say
    a, b = ctx_for(state, 0), ctx_for(state, 1)
    state.admit(a)
    state.admit(b)
    complete([b])
    assert state.to_commit() == 0
    state.committed = 0
    assert state.to_commit() is None
    complete([a])
    assert state.to_commit() == 2


def test_seeked_state_commits_its_start():
    assert PartitionState("t", 0, start=42).to_commit() == 42


# ---- dispatch -----------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(lanes=st.lists(st.integers(0, 5), max_size=80), takes=st.lists(st.integers(1, 4), max_size=40))
def test_keyed_queue_holds_a_lane_by_one_taker_and_keeps_order(lanes, takes):
    q = KeyedQueue()
    state = PartitionState("t", 0)
    for i, lane in enumerate(lanes):
        q.push(ctx_for(state, i, lane))
    seen: dict[int, list[int]] = defaultdict(list)
    held: set[object] = set()
    for n in [*takes, *([len(lanes) + 1] * (len(lanes) + 1))]:
        taken = q.take(n)
        for lane, items in taken:
            assert lane not in held
            held.add(lane)
            seen[lane].extend(c.offset for c in items)
        q.release_all(taken)
        held.clear()
    assert len(q) == 0 and q.ready() == 0
    for lane in set(lanes):
        assert seen[lane] == [i for i, x in enumerate(lanes) if x == lane]


def _check_order_and_parallelism(run_dispatcher):
    """Per lane: strictly in submit order, never two at once. Across lanes: really parallel."""
    state = PartitionState("t", 0)
    n_keys, per_key = 20, 25
    items = [ctx_for(state, i, i % n_keys) for i in range(n_keys * per_key)]
    log: dict[int, list[int]] = defaultdict(list)
    active: dict[int, int] = defaultdict(int)
    overlap = {"max_same_key": 0, "max_total": 0, "total": 0}
    lock = threading.Lock()

    def enter(ctx):
        with lock:
            active[ctx.lane] += 1
            overlap["total"] += 1
            overlap["max_same_key"] = max(overlap["max_same_key"], active[ctx.lane])
            overlap["max_total"] = max(overlap["max_total"], overlap["total"])
            log[ctx.lane].append(ctx.offset)

    def leave(ctx):
        with lock:
            active[ctx.lane] -= 1
            overlap["total"] -= 1

    run_dispatcher(items, enter, leave)
    assert all(c._done for c in items)
    for k in range(n_keys):
        assert log[k] == [c.offset for c in items if c.lane == k]
    assert overlap["max_same_key"] == 1
    assert overlap["max_total"] > 4  # 20 keys, 8 workers, handlers that wait: lanes overlap


def test_thread_dispatcher_orders_per_key_and_runs_keys_in_parallel():
    def run(items, enter, leave):
        def execute(ctx):
            enter(ctx)
            time.sleep(random.random() * 0.002)
            leave(ctx)
            return True

        d = ThreadDispatcher(execute, workers=8)
        d.start()
        for i in range(0, len(items), 37):  # several batches, as the poll thread submits them
            d.submit(items[i : i + 37])
        deadline = time.monotonic() + 20
        while not all(c._done for c in items) and time.monotonic() < deadline:
            time.sleep(0.01)
        d.stop()

    _check_order_and_parallelism(run)


def test_async_dispatcher_orders_per_key_and_runs_keys_in_parallel():
    def run(items, enter, leave):
        async def execute(ctx):
            enter(ctx)
            await asyncio.sleep(random.random() * 0.002)
            leave(ctx)
            return True

        d = AsyncDispatcher(execute, workers=8)
        d.start()
        for i in range(0, len(items), 37):
            d.submit(items[i : i + 37])
        deadline = time.monotonic() + 20
        while not all(c._done for c in items) and time.monotonic() < deadline:
            time.sleep(0.01)
        d.stop()

    _check_order_and_parallelism(run)


def test_closed_partition_work_is_skipped_not_done():
    ran = []
    d = ThreadDispatcher(lambda c: ran.append(c.offset) or True, workers=2)
    state = PartitionState("t", 0)
    state.closed = True
    items = [ctx_for(state, i, 0) for i in range(5)]
    d.start()
    d.submit(items)
    d.stop()
    assert ran == [] and not any(c._done or c._started for c in items)


# ---- shaping, failures, filtering ---------------------------------------------------------
def test_watermarks_have_hysteresis():
    w = Watermarks(high=10, low=4)
    assert [w.update(n) for n in (0, 9, 10, 7, 5, 4, 3, 9, 11)] == [
        False, False, True, True, True, False, False, False, True,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        Watermarks(high=4, low=4)


def test_token_bucket_grants_at_most_rate_plus_burst():
    bucket = TokenBucket(rate=1000, burst=100)  # a burst that outlasts a descheduled moment
    t0 = time.monotonic()
    granted = 0
    while time.monotonic() - t0 < 0.3:
        granted += bucket.take(50)
    elapsed = time.monotonic() - t0
    assert granted <= 1000 * elapsed + 100
    assert granted >= 1000 * elapsed * 0.5  # and it does hand tokens out at the rate


def test_backoff_grows_and_is_capped():
    b = Backoff(initial=0.1, maximum=1.0)
    for retry, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (10, 1.0)):
        delays = [b.delay(retry) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays)


def test_retry_topic_names():
    assert [format_delay(s) for s in (0.25, 1.5, 5, 60, 90, 3600)] == ["250ms", "1500ms", "5s", "1m", "90s", "1h"]
    assert retry_topic("logs.app", 30) == "logs.app.retry.30s"


def test_filter_by_level_field_and_attribute():
    f = EntryFilter(FilterSettings(levels=["ERROR", "warning"], fields={"service": ["billing"], "region": ["eu"]}))
    base = {"level": "error", "service": "billing", "attributes": {"region": "eu"}}
    assert f(base)
    assert not f({**base, "level": "info"})
    assert not f({**base, "level": None})
    assert not f({**base, "service": "web"})
    assert not f({**base, "attributes": {"region": "us"}})
    assert not EntryFilter().active and EntryFilter().__call__({"level": None})


def test_archive_survives_a_crash_and_a_restart(tmp_path):
    from datetime import UTC, datetime

    when = datetime(2026, 11, 20, 10, 30, tzinfo=UTC)
    state = PartitionState("logs", 3)
    first = Archive(ArchiveSettings(directory=str(tmp_path)))
    for i in range(5):
        first({"timestamp": when, "message": f"m{i}", "raw": None}, ctx_for(state, i, "k"))
    # "Crash": never closed. A restarted process writes a new segment beside the old one.
    second = Archive(ArchiveSettings(directory=str(tmp_path)))
    second._started = first._started + "-2"
    for i in range(5, 8):
        second({"timestamp": when, "message": f"m{i}", "raw": b"\xff"}, ctx_for(state, i, "k"))
    second.close()
    files = sorted((tmp_path / "logs" / "2026-11-20" / "10").glob("p3-*.jsonl.gz"))
    assert len(files) == 2
    got = [e for f in files for e in read_archive(f)]
    assert sorted(e["_kafka"]["offset"] for e in got) == list(range(8))
    assert {e["message"] for e in got} == {f"m{i}" for i in range(8)}
