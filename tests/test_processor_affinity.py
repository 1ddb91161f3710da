"""`pin_to_cpu`: the poll loop and the workers run on one CPU, Kafka's client threads on the caller's (real broker)."""

from __future__ import annotations

import os
import re
import threading

import pytest
from affinity_support import ALLOWED, CPU, kafka_threads, needs_two_cpus
from processor_support import entry, produce, wait_for

from logferry.errors import ConfigError
from logferry.processors import Processor
from logferry.processors.runtime import Hooks

pytestmark = pytest.mark.kafka


def run_recording(app: Processor) -> tuple[threading.Thread, dict[str, object]]:
    """app.run() on a thread that afterwards records its own CPUs (and what run() raised)."""
    after: dict[str, object] = {}

    def run() -> None:
        try:
            app.run(install_signals=False)
        except Exception as e:
            after["raised"] = e
        after["cpus"] = os.sched_getaffinity(0)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, after


@needs_two_cpus
@pytest.mark.parametrize("kind", ["threads", "asyncio"])
def test_pinned_processor_runs_its_python_threads_on_one_cpu_and_leaves_kafka_threads_free(
    kafka_bootstrap, make_topic, group_id, kind
):
    topic = make_topic(partitions=3)
    n = 300
    produce(kafka_bootstrap, topic, [(f"k{i % 11}".encode(), entry(i)) for i in range(n)])
    poll_cpus: list[set[int]] = []
    hooks = Hooks(on_poll=lambda rt: poll_cpus.append(os.sched_getaffinity(0)))
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, concurrency=4,
                    pin_to_cpu=CPU, hooks=hooks)  # fmt: skip
    handled: dict[int, set[int]] = {}  # handler thread → its CPUs, seen while handling
    lock = threading.Lock()
    count = [0]

    def seen() -> None:
        with lock:
            handled[threading.get_ident()] = os.sched_getaffinity(0)
            count[0] += 1

    if kind == "threads":
        app.handler(lambda e, ctx: seen())
    else:

        async def handle(e, ctx):
            seen()

        app.handler(handle)
    caller, after = run_recording(app)
    wait_for(lambda: count[0] >= n, 60, "every record handled")
    while_running = kafka_threads()
    app.stop()
    caller.join(30)

    assert not caller.is_alive() and "raised" not in after, after
    assert handled and caller.ident not in handled  # on workers / the event loop thread, not the poll thread
    assert all(cpus == {CPU} for cpus in handled.values()), handled
    assert poll_cpus and all(cpus == {CPU} for cpus in poll_cpus)
    assert while_running and all(cpus == ALLOWED for cpus in while_running.values()), while_running
    assert after["cpus"] == ALLOWED  # the caller's thread goes on where it could before


@needs_two_cpus
def test_the_caller_gets_its_cpus_back_when_the_loop_fails(kafka_bootstrap, make_topic, group_id):
    def fail(rt) -> None:
        raise RuntimeError("a hook that breaks the loop")

    app = Processor(group=group_id, topics=[make_topic()], bootstrap_servers=kafka_bootstrap, pin_to_cpu=CPU,
                    hooks=Hooks(on_poll=fail))  # fmt: skip
    app.handler(lambda e, ctx: None)
    caller, after = run_recording(app)
    caller.join(30)
    assert not caller.is_alive()
    assert isinstance(after["raised"], RuntimeError)
    assert after["cpus"] == ALLOWED


def test_a_cpu_the_process_may_not_use_is_refused_with_the_config():
    """Refused where the config is validated: before the CLI claims a replay or any client exists."""
    with pytest.raises(ConfigError, match=re.escape(f"may run on CPUs {sorted(ALLOWED)} only")):
        Processor(group="g", topics=["t"], pin_to_cpu=CPU + 1)
