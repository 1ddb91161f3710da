"""`pin_to_cpu`: the poll loop and the workers run on one CPU, librdkafka's threads on all (real broker)."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest
from processor_support import entry, produce, wait_for

from logferry.errors import ConfigError
from logferry.processors import Processor
from logferry.processors.runtime import Hooks

pytestmark = pytest.mark.kafka


def kafka_threads() -> dict[str, set[int]]:
    """librdkafka's threads in this process (named rdk:…) and the CPUs each may run on."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            if name.startswith("rdk:"):
                out[f"{name}/{task.name}"] = os.sched_getaffinity(int(task.name))
        except OSError:
            continue  # ended meanwhile
    return out


def test_pinned_processor_runs_its_python_threads_on_one_cpu_and_leaves_kafka_threads_free(
    kafka_bootstrap, make_topic, group_id
):
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    topic = make_topic(partitions=3)
    n = 300
    produce(kafka_bootstrap, topic, [(f"k{i % 11}".encode(), entry(i)) for i in range(n)])
    poll_cpus: list[set[int]] = []
    hooks = Hooks(on_poll=lambda rt: poll_cpus.append(os.sched_getaffinity(0)))
    app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, concurrency=4,
                    pin_to_cpu=cpu, hooks=hooks)  # fmt: skip
    handled: dict[str, set[int]] = {}  # worker thread name → its CPUs, seen while handling
    count = [0]

    @app.handler
    def handle(e, ctx):
        handled[threading.current_thread().name] = os.sched_getaffinity(0)
        count[0] += 1

    after: dict[str, set[int]] = {}

    def run() -> None:
        app.run(install_signals=False)
        after["cpus"] = os.sched_getaffinity(0)  # the thread that called run(), once it returned

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    wait_for(lambda: count[0] >= n, 60, "every record handled")
    while_running = kafka_threads()
    app.stop()
    caller.join(30)

    assert handled and all(name.startswith("worker") for name in handled)
    assert all(cpus == {cpu} for cpus in handled.values()), handled
    assert poll_cpus and all(cpus == {cpu} for cpus in poll_cpus)
    assert while_running and all(cpus == allowed for cpus in while_running.values()), while_running
    assert after["cpus"] == allowed


def test_a_cpu_the_process_may_not_use_is_refused_before_any_client_exists(kafka_bootstrap, make_topic, group_id):
    allowed = os.sched_getaffinity(0)
    app = Processor(group=group_id, topics=[make_topic()], bootstrap_servers=kafka_bootstrap,
                    pin_to_cpu=max(allowed) + 1)  # fmt: skip
    app.handler(lambda e, ctx: None)
    with pytest.raises(ConfigError, match=re.escape(f"may run on CPUs {sorted(allowed)} only")):
        app.run(install_signals=False)
    assert app._runtime is None and app.control is None  # no consumer, producer or live-replay listener made
    assert os.sched_getaffinity(0) == allowed
