"""Key lanes survive what a handler throws; takes sized by handler speed keep order and done-marking.

A handler raising SystemExit or KeyboardInterrupt (BaseException, not Exception) used to kill
its worker thread while the worker held the lane: that key never ran again. The Kafka test
shows the whole contract on the real broker: later records of the key are handled, and the
partition's commit stops before the record that never finished.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import pytest
from test_processor_kafka import committed, produce, start, wait_for
from test_processor_units import ctx_for

from logferry.processors import Processor
from logferry.processors.context import Context
from logferry.processors.dispatch import AsyncDispatcher, ThreadDispatcher
from logferry.processors.tracking import PartitionState

ESCAPES = [SystemExit, KeyboardInterrupt]


def _wait_done(items: list[Context], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(c._done for c in items):
        assert time.monotonic() < deadline, f"{sum(not c._done for c in items)} record(s) never finished"
        time.sleep(0.005)


@pytest.mark.parametrize("escape", ESCAPES)
def test_thread_worker_keeps_the_lane_and_itself_after_a_base_exception(escape):
    state = PartitionState("t", 0)
    ran: list[int] = []

    def execute(ctx: Context) -> bool:
        if ctx.offset == 0:
            raise escape("from the handler")
        ran.append(ctx.offset)
        return True

    d = ThreadDispatcher(execute, workers=1)  # one worker: had it died, nothing below would run
    d.start()
    try:
        first = [ctx_for(state, i, "a") for i in range(3)]
        d.submit(first)
        _wait_done(first[1:])
        later = [ctx_for(state, 3, "a"), ctx_for(state, 4, "b")]
        d.submit(later)  # the same lane again, and another one
        _wait_done(later)
    finally:
        d.stop()
    assert ran == [1, 2, 3, 4]
    assert not first[0]._done  # never finished: its partition must not commit past it
    assert state.completed == 4


@pytest.mark.parametrize("escape", ESCAPES)
def test_async_worker_keeps_the_lane_after_a_base_exception(escape):
    state = PartitionState("t", 0)
    ran: list[int] = []

    async def execute(ctx: Context) -> bool:
        await asyncio.sleep(0)
        if ctx.offset == 0:
            raise escape("from the handler")
        ran.append(ctx.offset)
        return True

    d = AsyncDispatcher(execute, workers=1)
    d.start()
    try:
        first = [ctx_for(state, i, "a") for i in range(3)]
        d.submit(first)
        _wait_done(first[1:])
        later = [ctx_for(state, 3, "a")]
        d.submit(later)
        _wait_done(later)
    finally:
        d.stop()
    assert ran == [1, 2, 3]
    assert not first[0]._done


def test_fast_handlers_batch_after_batch_keep_key_order_and_are_all_counted():
    """Fast handlers make workers take many lanes at once: still one lane at a time, in order, all counted,
    and never on the submitting (poll) thread, which must stay free to poll and commit."""
    state = PartitionState("t", 0)
    seen: dict[object, list[int]] = defaultdict(list)
    threads: set[str] = set()

    def execute(ctx: Context) -> bool:
        threads.add(threading.current_thread().name)
        seen[ctx.lane].append(ctx.offset)
        if ctx.offset == 700:
            raise SystemExit  # the lane goes on, the record stays not done
        return True

    d = ThreadDispatcher(execute, workers=4)
    d.start()
    items = [ctx_for(state, i, i % 13) for i in range(3000)]
    try:
        for i in range(0, len(items), 100):  # as a poll loop whose handlers keep up
            batch = items[i : i + 100]
            d.submit(batch)
            _wait_done([c for c in batch if c.offset != 700])
    finally:
        d.stop()
    assert threading.current_thread().name not in threads
    for lane in range(13):
        assert seen[lane] == [c.offset for c in items if c.lane == lane]
    assert not items[700]._done
    assert state.completed == len(items) - 1
    assert d.queued_lanes() == 0


@pytest.mark.parametrize("dispatcher", [ThreadDispatcher, AsyncDispatcher])
def test_handlers_slower_than_a_take_slice_still_run_every_lane_in_parallel(dispatcher):
    """A record slower than the dispatcher's work slice (2 ms): one lane per take, lanes side by side."""
    state = PartitionState("t", 0)
    active, peak = [0], [0]
    lock = threading.Lock()

    def enter() -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])

    def leave() -> bool:
        with lock:
            active[0] -= 1
        return True

    def execute(ctx: Context) -> bool:
        enter()
        time.sleep(0.005)
        return leave()

    async def execute_async(ctx: Context) -> bool:
        enter()
        await asyncio.sleep(0.005)
        return leave()

    d = dispatcher(execute if dispatcher is ThreadDispatcher else execute_async, workers=8)
    d.start()
    items = [ctx_for(state, i, i % 8) for i in range(96)]
    try:
        for i in range(0, len(items), 16):  # batch after batch: later takes size by the slow estimate
            batch = items[i : i + 16]
            d.submit(batch)
            _wait_done(batch)
    finally:
        d.stop()
    assert peak[0] > 4  # 8 lanes, 8 workers: most ran at once


@pytest.mark.kafka
def test_base_exception_in_handler_neither_stalls_its_key_nor_commits_past_it(kafka_bootstrap, make_topic, group_id):
    topic = make_topic(partitions=1)
    produce(kafka_bootstrap, topic, 40, keys=2)  # k0, k1 alternate: offset 4 is k0's third record (seq 2)
    handled: list[tuple[str, int]] = []
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, concurrency=4,
                    commit_interval=0.2, live_replay=False)  # fmt: skip

    @app.handler
    def handle(entry: dict, ctx: Context) -> None:
        if ctx.offset == 4:
            raise SystemExit("handler asked to exit")
        handled.append((entry["attributes"]["key"], int(entry["attributes"]["seq"])))

    t = start(app)
    try:
        wait_for(lambda: len(handled) == 39, 30, "every other record handled")
        wait_for(lambda: committed(kafka_bootstrap, group_id, topic, 1)[0] == 4, 15, "a commit up to offset 4")
    finally:
        app.stop()
        t.join(30)
    assert [s for k, s in handled if k == "k0"] == [s for s in range(20) if s != 2]  # k0 went on, in order
    assert [s for k, s in handled if k == "k1"] == list(range(20))
    assert committed(kafka_bootstrap, group_id, topic, 1)[0] == 4  # never past the unfinished record
