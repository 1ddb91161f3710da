"""`inline = true`: the handler runs on the poll thread itself, against the real broker.

The same guarantees as on worker threads (key order, commits after handling, retries and the
dead-letter topic), no worker threads at all, and a handler's SystemExit ends `run()` instead of
being kept in.
"""

from __future__ import annotations

import threading
import time

import pytest
from affinity_support import kafka_threads
from processor_support import Running, committed, entry, log_end, produce, read_topic, run_in_thread, wait_for

from logferry.errors import ConfigError
from logferry.processors import Processor
from logferry.processors.runtime import Hooks

pytestmark = pytest.mark.kafka

PARTITIONS = 3


def test_inline_handles_in_key_order_on_the_poll_thread_and_commits_past_a_dead_letter(
    kafka_bootstrap, make_topic, group_id
):
    topic = make_topic(partitions=PARTITIONS)
    n, poison = 600, 250
    produce(kafka_bootstrap, topic, [(f"k{i % 7}".encode(), entry(i, "poison" if i == poison else "ok"))
                                     for i in range(n)])  # fmt: skip
    dlq = f"{group_id}.dlq"
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, inline=True,
                    retries=2, backoff_initial=0.01, backoff_max=0.02, dead_letter_topic=dlq)  # fmt: skip
    calls: list[tuple[int, bytes, int, int]] = []  # thread id, key, entry number, attempt
    worker_threads: set[str] = set()

    @app.handler
    def handle(e, ctx):
        worker_threads.update(t.name for t in threading.enumerate() if t.name.startswith("worker-"))
        i = int(e["attributes"]["i"])
        calls.append((threading.get_ident(), ctx.key, i, ctx.attempt))
        if i == poison:
            raise ValueError("cannot handle this one")

    running = Running(app)
    with running:
        ends = log_end(kafka_bootstrap, topic, PARTITIONS)
        wait_for(lambda: committed(kafka_bootstrap, group_id, topic, PARTITIONS) == ends, 60,
                 "the group to commit every partition to its end")  # fmt: skip
        poll_thread = running.thread.ident

    assert {t for t, *_ in calls} == {poll_thread} and not worker_threads
    handled = [(key, i) for _, key, i, attempt in calls if attempt == 1]
    assert sorted(i for _, i in handled) == list(range(n))  # every record once (first attempts)
    for k in {key for key, _ in handled}:
        order = [i for key, i in handled if key == k]
        assert order == sorted(order), f"key {k!r} handled out of order"
    assert [a for _, _, i, a in calls if i == poison] == [1, 2, 3]  # in place: 1 try + 2 retries
    dead = read_topic(kafka_bootstrap, dlq, PARTITIONS)  # made with as many partitions as the input
    assert len(dead) == 1 and dead[0].key() == f"k{poison % 7}".encode()


def test_inline_handler_system_exit_ends_run_and_its_record_stays_uncommitted(kafka_bootstrap, make_topic, group_id):
    topic = make_topic(partitions=1)
    produce(kafka_bootstrap, topic, [(b"k", entry(i)) for i in range(20)])
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, inline=True)
    offsets: list[int] = []

    @app.handler
    def handle(e, ctx):
        if ctx.offset == 10:
            raise SystemExit("the handler asked the process to exit")
        offsets.append(ctx.offset)

    t, raised = run_in_thread(app)
    t.join(30)
    if t.is_alive():  # kept in like on a worker thread: stop it, then fail
        app.stop()
        t.join(30)
    assert [type(e) for e in raised] == [SystemExit]
    assert offsets == list(range(10))
    assert committed(kafka_bootstrap, group_id, topic)[0] <= 10  # never past the record that did not finish


def test_inline_with_a_failing_dependency_still_polls_and_stops_within_the_grace(kafka_bootstrap, make_topic, group_id):
    """Every record fails and retries in place (0.4 s each): inline, a fetched batch of 100 would hold
    the poll thread 40 s. Run a slice per poll, the loop keeps polling (the on_poll hook keeps coming)
    and a stop ends within shutdown_grace plus a record."""
    topic = make_topic(partitions=1)
    produce(kafka_bootstrap, topic, [(b"k", entry(i)) for i in range(100)])
    polls: list[float] = []
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, inline=True, retries=2,
                    backoff_initial=0.2, backoff_max=0.2, shutdown_grace=1.0, batch_size=100,
                    hooks=Hooks(on_poll=lambda _rt: polls.append(time.monotonic())))  # fmt: skip
    failures = threading.Semaphore(0)

    @app.handler
    def handle(e, ctx):
        failures.release()
        raise ConnectionError("the database is down")

    t, raised = run_in_thread(app)
    for _ in range(6):  # two records' worth of attempts, about 0.8 s
        assert failures.acquire(timeout=30)
    polled_at = len(polls)
    for _ in range(6):
        assert failures.acquire(timeout=30)
    assert len(polls) > polled_at  # the loop polled between records of one fetched batch
    stopping = time.monotonic()
    app.stop()
    t.join(30)
    assert not t.is_alive() and not raised
    assert time.monotonic() - stopping < 1.0 + 0.4 + 5  # grace + the record running + leaving the group


def test_inline_refuses_an_async_handler_and_leaves_no_client_behind(kafka_bootstrap, group_id):
    app = Processor(group=group_id, topics=["never-created"], bootstrap_servers=kafka_bootstrap, inline=True)

    @app.handler
    async def handle(e, ctx):
        return None

    before = len(kafka_threads())
    with pytest.raises(ConfigError, match="inline") as refused:
        app.run(install_signals=False)
    # While the traceback (and with it every frame's locals) is still alive: the live-replay
    # listener made before the runtime was refused has closed its clients.
    assert refused.traceback and len(kafka_threads()) == before
