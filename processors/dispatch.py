"""Key-ordered dispatch: records of one lane run strictly in order, one at a time; lanes run in parallel.

A lane is the ordering unit: the record key (`ordering="key"`), the partition
(`"partition"`) or the record itself (`"unordered"`). `KeyedQueue` is the bookkeeping,
shared by the thread dispatcher (blocking handlers) and the asyncio one (`async def`):
a lane is either absent, waiting in the ready queue, or held by exactly one worker, who
takes all its queued records at once and hands the lane back when done.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence

from logferry.processors.context import Context
from logferry.processors.tracking import count_completed

log = logging.getLogger("logferry.processors.dispatch")
Lane = Hashable
Taken = list[tuple[Lane, list[Context]]]


class KeyedQueue:
    """Not thread-safe by itself; the dispatchers hold a lock around every call."""

    def __init__(self) -> None:
        self._lanes: dict[Lane, list[Context]] = {}
        # High-priority lanes are always taken first.
        self._ready_high: deque[Lane] = deque()
        self._ready_low: deque[Lane] = deque()

    def push(self, ctx: Context) -> bool:
        """Queue a record; True when its lane became ready (it was neither queued nor held)."""
        items = self._lanes.get(ctx.lane)
        if items is None:
            self._lanes[ctx.lane] = [ctx]
            (self._ready_high if ctx._state.high else self._ready_low).append(ctx.lane)
            return True
        items.append(ctx)
        return False

    def ready(self) -> int:
        return len(self._ready_high) + len(self._ready_low)

    def take(self, max_lanes: int = 1) -> Taken:
        """Hold up to `max_lanes` ready lanes and take all their queued records."""
        out: Taken = []
        for ready in (self._ready_high, self._ready_low):
            while ready and len(out) < max_lanes:
                lane = ready.popleft()
                items = self._lanes[lane]
                self._lanes[lane] = []
                out.append((lane, items))
        return out

    def release(self, lane: Lane, high: bool) -> bool:
        """Hand a held lane back; True when it had more records queued and is ready again."""
        if self._lanes[lane]:
            (self._ready_high if high else self._ready_low).append(lane)
            return True
        del self._lanes[lane]
        return False

    def __len__(self) -> int:
        return len(self._lanes)


def _fair_share(ready: int, workers: int) -> int:
    # When far more lanes are ready than workers, taking several per wake-up costs no
    # parallelism and saves lock round trips; 16 bounds head-of-line waiting.
    return max(1, min(16, ready // (2 * workers)))


class ThreadDispatcher:
    """`workers` threads run `execute(ctx) -> bool` (True: done now; False: done later or abandoned)."""

    def __init__(
        self, execute: Callable[[Context], bool], workers: int, abandon: threading.Event | None = None,
        name: str = "worker",
    ) -> None:  # fmt: skip
        self._execute = execute
        self._queue = KeyedQueue()
        self._cond = threading.Condition(threading.Lock())
        self._workers = workers
        self._stopping = False
        # Set: skip queued records, stop after the current one.
        self.abandon = abandon or threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, items: Sequence[Context]) -> None:
        queue = self._queue
        with self._cond:
            woken = 0
            for ctx in items:
                woken += queue.push(ctx)
            if woken:
                # One wake-up per batch; a worker that leaves lanes behind wakes the next (below).
                # Waking one thread per ready lane made fast handlers pay in GIL handoffs.
                self._cond.notify()

    def queued_lanes(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        queue, cond, execute, abandon = self._queue, self._cond, self._execute, self.abandon
        while True:
            with cond:
                while not queue.ready():
                    if self._stopping:
                        return
                    cond.wait()
                taken = queue.take(_fair_share(queue.ready(), self._workers))
                if queue.ready():
                    cond.notify()
            for lane, items in taken:
                done: list[Context] = []
                for ctx in items:
                    ctx._started = True  # set before the check: revoke reads it after setting `closed`
                    if ctx._state.closed or abandon.is_set():
                        ctx._started = False
                        continue
                    try:
                        ok = execute(ctx)
                    except Exception:  # the executor's own failure (e.g. the DLQ refused): keep the worker
                        log.exception("cannot finish %s; its partition stops committing here", ctx)
                        ok = False
                    if ok:
                        ctx._done = True  # committable now, not when the whole lane batch is through
                        done.append(ctx)
                if done:
                    count_completed(done)
                with cond:
                    queue.release(lane, items[0]._state.high)

    def stop(self, timeout: float = 5.0) -> None:
        """Let idle workers exit; a handler still stuck after `timeout` is left behind (daemon thread)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))


class AsyncDispatcher:
    """`workers` coroutines on one event loop thread run `await execute(ctx) -> bool`."""

    def __init__(
        self, execute: Callable[[Context], Awaitable[bool]], workers: int, abandon: threading.Event | None = None,
        name: str = "async",
    ) -> None:  # fmt: skip
        self._execute = execute
        self._queue = KeyedQueue()
        self._lock = threading.Lock()
        self._workers = workers
        self._stopping = False
        self.abandon = abandon or threading.Event()
        self.loop = asyncio.new_event_loop()
        self._wake: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._started = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self._started.set()
        await asyncio.gather(*(self._run() for _ in range(self._workers)))

    def submit(self, items: Sequence[Context]) -> None:
        with self._lock:
            woken = 0
            for ctx in items:
                woken += self._queue.push(ctx)
        if woken and self._wake is not None:
            self.loop.call_soon_threadsafe(self._wake.set)

    def queued_lanes(self) -> int:
        return len(self._queue)

    async def _run(self) -> None:
        queue, lock, execute, abandon, wake = self._queue, self._lock, self._execute, self.abandon, self._wake
        assert wake is not None
        while True:
            with lock:
                taken = queue.take(_fair_share(queue.ready(), self._workers))
            if not taken:
                if self._stopping:
                    return
                # No await between the empty check and clear(): a submit's set() runs after we wait.
                wake.clear()
                await wake.wait()
                continue
            for lane, items in taken:
                done: list[Context] = []
                for ctx in items:
                    ctx._started = True
                    if ctx._state.closed or abandon.is_set():
                        ctx._started = False
                        continue
                    try:
                        ok = await execute(ctx)
                    except Exception:
                        log.exception("cannot finish %s; its partition stops committing here", ctx)
                        ok = False
                    if ok:
                        ctx._done = True  # committable now, not when the whole lane batch is through
                        done.append(ctx)
                if done:
                    count_completed(done)
                with lock:
                    again = queue.release(lane, items[0]._state.high)
                if again:
                    wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        def _stop() -> None:
            self._stopping = True
            if self._wake is not None:
                self._wake.set()

        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(_stop)
            self._thread.join(timeout)
