"""Key-ordered dispatch: records of one lane run strictly in order, one at a time; lanes run in parallel.

A lane is the ordering unit: the record key (`ordering="key"`), the partition
(`"partition"`) or the record itself (`"unordered"`). `KeyedQueue` is the bookkeeping,
shared by the thread dispatcher (blocking handlers) and the asyncio one (`async def`):
a lane is either absent, waiting in the ready queue, or held by exactly one worker, who
takes all its queued records at once and hands the lane back when done. The inline
dispatcher (`inline = true`) needs none of it: the poll thread runs records in fetch order.

Under the GIL, waking a thread per ready lane makes fast handlers pay more in thread
hand-offs than in handling. So a worker takes about `SLICE` seconds of work at a time,
judged by how long records have been taking (wall clock, so handlers that wait on I/O
still spread over many workers), and lanes go back and new ones are taken in one
lock round trip.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from time import perf_counter

from logferry.processors.context import Context
from logferry.processors.tracking import count_completed

log = logging.getLogger("logferry.processors.dispatch")
Lane = Hashable
Taken = list[tuple[Lane, list[Context]]]

SLICE = 0.002  # seconds of handler work a worker takes at once: bounds head-of-line waiting
MAX_TAKE = 1024  # lanes per take, whatever the estimate says


_ABSENT = object()


class KeyedQueue:
    """Not thread-safe by itself; the dispatchers hold a lock around every call.

    `_lanes[lane]` is the lane's queued records, or None while a taker holds it with none
    queued (no empty list per take: fewer allocations, fewer garbage collections)."""

    def __init__(self) -> None:
        self._lanes: dict[Lane, list[Context] | None] = {}
        # High-priority lanes are always taken first.
        self._ready_high: deque[Lane] = deque()
        self._ready_low: deque[Lane] = deque()

    def push(self, ctx: Context) -> bool:
        """Queue a record; True when its lane became ready (it was neither queued nor held)."""
        return self.push_all((ctx,))

    def push_all(self, batch: Sequence[Context]) -> bool:
        """`push` for a whole polled batch in one pass (the per-record hot path); True when a lane became ready."""
        lanes, high, low = self._lanes, self._ready_high, self._ready_low
        get = lanes.get
        woken = False
        for ctx in batch:
            lane = ctx.lane
            items = get(lane, _ABSENT)
            if items is _ABSENT:
                lanes[lane] = [ctx]
                (high if ctx._state.high else low).append(lane)
                woken = True
            elif items is None:  # held, nothing queued yet: the holder readies it on release
                lanes[lane] = [ctx]
            else:
                items.append(ctx)
        return woken

    def ready(self) -> int:
        return len(self._ready_high) + len(self._ready_low)

    def take(self, max_lanes: int = 1, max_records: int | None = None) -> Taken:
        """Hold up to `max_lanes` ready lanes (no more once `max_records` are taken) and take all their
        queued records; at least one lane when any is ready."""
        out: Taken = []
        lanes = self._lanes
        records = 0
        for ready in (self._ready_high, self._ready_low):
            while ready and len(out) < max_lanes and (max_records is None or records < max_records or not out):
                lane = ready.popleft()
                items = lanes[lane]
                out.append((lane, items))  # type: ignore[arg-type]
                lanes[lane] = None
                records += len(items)  # type: ignore[arg-type]
        return out

    def release_all(self, taken: Taken) -> bool:
        """Hand every held lane of a take back; True when any had more records queued and is ready again."""
        lanes = self._lanes
        again = False
        for lane, items in taken:
            if lanes[lane]:
                (self._ready_high if items[0]._state.high else self._ready_low).append(lane)
                again = True
            else:
                del lanes[lane]
        return again

    def __len__(self) -> int:
        return len(self._lanes)


class TakeSizer:
    """How much one worker takes: about `SLICE` seconds of work, by a moving average of wall-clock
    seconds per record, updated once per take (racy float stores from several threads are fine: it
    is only a hint)."""

    def __init__(self) -> None:
        self.record_seconds = SLICE  # start as if handlers were slow: one lane per take

    def take(self, queue: KeyedQueue) -> Taken:
        return queue.take(MAX_TAKE, int(SLICE / self.record_seconds))  # slower handlers: one lane at a time

    def record(self, seconds: float, records: int) -> None:
        if records:
            self.record_seconds = 0.7 * self.record_seconds + 0.3 * max(seconds / records, 1e-7)


def _log_unfinished(ctx: Context, exc: BaseException) -> None:
    log.error("cannot finish %s (%s: %s); its partition stops committing here", ctx, type(exc).__name__, exc,
              exc_info=exc)  # fmt: skip


class ThreadDispatcher:
    """`workers` threads run `execute(ctx) -> bool` (True: done now; False: done later or abandoned)."""

    def __init__(
        self, execute: Callable[[Context], bool], workers: int, abandon: threading.Event | None = None,
        name: str = "worker", after_take: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        """`after_take`: called by the worker after each take (e.g. to publish its metrics in one step)."""
        self._execute = execute
        self._after_take = after_take
        self._queue = KeyedQueue()
        self._cond = threading.Condition(threading.Lock())
        self._sizer = TakeSizer()
        self._stopping = False
        # Set: skip queued records, stop after the current one.
        self.abandon = abandon or threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, items: Sequence[Context]) -> None:
        # Never runs a handler itself: the poll thread must keep polling, committing and serving
        # rebalances however long a handler blocks.
        with self._cond:
            if self._queue.push_all(items):
                self._cond.notify()  # one wake-up per batch; a worker that leaves lanes behind wakes the next

    def queued_lanes(self) -> int:
        return len(self._queue)

    def _run(self) -> None:
        queue, cond, sizer = self._queue, self._cond, self._sizer
        taken: Taken = []
        while True:
            with cond:
                if taken:
                    queue.release_all(taken)
                    taken = []  # an idle worker must not keep its last records alive (see PartitionState.trim)
                while not queue.ready():
                    if self._stopping:
                        return
                    cond.wait()
                taken = sizer.take(queue)
                if queue.ready():
                    cond.notify()
            t0 = perf_counter()
            try:
                handled = self._handle(taken)
            except BaseException:  # _handle keeps handler failures in; whatever else escapes frees the lanes
                with cond:
                    queue.release_all(taken)
                    cond.notify()
                raise
            sizer.record(perf_counter() - t0, handled)

    def _handle(self, taken: Taken) -> int:
        """Run a take's records in lane order; returns how many were run."""
        execute, abandoned = self._execute, self.abandon.is_set
        done: list[Context] = []
        handled = 0
        try:
            for _, items in taken:
                handled += len(items)
                for ctx in items:
                    ctx._started = True  # set before the check: revoke reads it after setting `closed`
                    if ctx._state.closed or abandoned():
                        ctx._started = False
                        continue
                    try:
                        ok = execute(ctx)
                    except BaseException as e:  # the executor's own failure, or a handler's
                        # SystemExit/KeyboardInterrupt: the record stays not done, the worker and lane go on.
                        _log_unfinished(ctx, e)
                        continue
                    if ok:
                        ctx._done = True  # committable at once, not when the whole take is through
                        done.append(ctx)
        finally:
            if done:
                count_completed(done)
            if self._after_take is not None:
                self._after_take()
        return handled

    def stop(self, timeout: float = 5.0) -> None:
        """Let idle workers exit; a handler still stuck after `timeout` is left behind (daemon thread)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.ident is not None:  # started (a runtime that failed before start() stops them too)
                t.join(max(0.0, deadline - time.monotonic()))


class InlineDispatcher:
    """`inline = true`: the poll thread itself runs submitted records, in fetch order, between polls.

    No hand-off to worker threads. For a fast CPU-bound handler the hand-off costs more than the
    handling, and threads cannot run it in parallel under the GIL anyway. Fetch order keeps key and
    partition order. The poll loop calls `run_waiting` once per poll: it runs waiting records for
    about `SLICE_INLINE` seconds, so slow or failing (retrying) handlers still let the loop poll,
    commit, serve rebalances and notice a stop; what waits counts as in flight (max_in_flight
    pauses fetching). A handler's KeyboardInterrupt or SystemExit ends `run()`, unlike on a worker.
    """

    SLICE_INLINE = 0.1  # seconds of handling between two polls

    def __init__(
        self, execute: Callable[[Context], bool], abandon: threading.Event | None = None,
        after_take: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self._execute = execute
        self._after_take = after_take
        self.abandon = abandon or threading.Event()
        self._waiting: deque[Context] = deque()

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 5.0) -> None:
        pass

    def submit(self, items: Sequence[Context]) -> None:
        self._waiting.extend(items)

    def run_waiting(self) -> None:
        """Poll thread: run waiting records until none is left or the slice is used up."""
        waiting, execute, abandoned = self._waiting, self._execute, self.abandon.is_set
        if not waiting:
            return
        done: list[Context] = []
        deadline = perf_counter() + self.SLICE_INLINE
        try:
            while waiting and not abandoned():
                ctx = waiting.popleft()
                if ctx._state.closed:  # revoked or seeked away since it was fetched
                    continue
                ctx._started = True
                try:
                    ok = execute(ctx)
                except Exception as e:  # the executor's own failure: the record stays not done
                    _log_unfinished(ctx, e)
                    continue
                if ok:
                    ctx._done = True
                    done.append(ctx)
                if perf_counter() >= deadline:
                    break
        finally:
            if done:
                count_completed(done)
            if self._after_take is not None:
                self._after_take()


class AsyncDispatcher:
    """`workers` coroutines on one event loop thread run `await execute(ctx) -> bool`."""

    def __init__(
        self, execute: Callable[[Context], Awaitable[bool]], workers: int, abandon: threading.Event | None = None,
        name: str = "async", after_take: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self._execute = execute
        self._after_take = after_take
        self._queue = KeyedQueue()
        self._lock = threading.Lock()
        self._workers = workers
        self._sizer = TakeSizer()
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
            woken = self._queue.push_all(items)
        if woken and self._wake is not None:
            self.loop.call_soon_threadsafe(self._wake.set)

    def queued_lanes(self) -> int:
        return len(self._queue)

    async def _run(self) -> None:
        queue, lock, sizer, wake = self._queue, self._lock, self._sizer, self._wake
        assert wake is not None
        taken: Taken = []
        while True:
            with lock:
                again = queue.release_all(taken) if taken else False
                taken = sizer.take(queue)
            if again:
                wake.set()
            if not taken:
                if self._stopping:
                    return
                # No await between the empty check and clear(): a submit's set() runs after we wait.
                wake.clear()
                await wake.wait()
                continue
            t0 = perf_counter()
            try:
                await self._handle(taken)
            finally:
                sizer.record(perf_counter() - t0, sum(len(items) for _, items in taken))

    async def _handle(self, taken: Taken) -> None:
        execute, abandon = self._execute, self.abandon
        done: list[Context] = []
        try:
            for _, items in taken:
                for ctx in items:
                    ctx._started = True
                    if ctx._state.closed or abandon.is_set():
                        ctx._started = False
                        continue
                    try:
                        ok = await execute(ctx)
                    except asyncio.CancelledError:
                        raise  # the loop is going away: not a handler failure
                    except BaseException as e:  # as in ThreadDispatcher._handle
                        _log_unfinished(ctx, e)
                        continue
                    if ok:
                        ctx._done = True
                        done.append(ctx)
        finally:
            if done:
                count_completed(done)
            if self._after_take is not None:
                self._after_take()

    def stop(self, timeout: float = 5.0) -> None:
        def _stop() -> None:
            self._stopping = True
            if self._wake is not None:
                self._wake.set()

        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(_stop)
            self._thread.join(timeout)
        elif self._thread.ident is None:  # never started: _serve would have closed the loop
            self.loop.close()
