"""`[agent] pin_to_cpu`: source and sink threads on one CPU, the producers' threads on the process's CPUs."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from affinity_support import ALLOWED, CPU, kafka_threads, needs_two_cpus, python_threads

from logferry import affinity
from logferry.collectors.agent import Agent
from logferry.collectors.buffer import Buffer
from logferry.collectors.config import AgentConfig, SinkSettings
from logferry.collectors.sink import KafkaSink
from logferry.collectors.testing import read_topic, wait_until
from logferry.config import validate
from logferry.kafka import KafkaSettings

pytestmark = needs_two_cpus


@pytest.mark.kafka
def test_pinned_agent_runs_sources_and_sink_on_one_cpu_and_delivers(kafka_settings, make_topic, tmp_path):
    topic, sock = make_topic(), tmp_path / "app.sock"
    config = {"kafka": {"bootstrap_servers": kafka_settings.bootstrap_servers}, "metrics": {"enabled": False},
              "agent": {"pin_to_cpu": CPU, "state_dir": str(tmp_path / "state"), "grace_period": 5.0},
              "sources": [{"kind": "unix", "name": "app", "address": str(sock)}],
              "route": {"topic": topic}}  # fmt: skip
    agent = Agent(validate(AgentConfig, config))
    after: dict[str, object] = {}

    def run() -> None:
        after["rc"] = agent.run()
        after["cpus"] = os.sched_getaffinity(0)  # the thread that called run(), once it returned

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    wait_until(sock.exists, what="the agent's socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(sock))
        client.sendall(b"".join(f"line {i}\n".encode() for i in range(100)))
    got = read_topic(kafka_settings, topic, 100)
    ours, kafka = python_threads(), kafka_threads()
    agent.request(15)  # SIGTERM: drain and exit
    caller.join(30)

    assert [d.entry["message"] for d in got] == [f"line {i}" for i in range(100)]
    assert ours["source-app"] == ours["kafka-sink"] == {CPU}, ours
    assert kafka and all(c == ALLOWED for c in kafka.values()), kafka
    assert after == {"rc": 0, "cpus": ALLOWED}


def test_a_producer_the_pinned_sink_thread_makes_starts_its_threads_on_the_free_cpus():
    """The sink makes a new producer on its own (pinned) thread when a source starts wanting
    acknowledgements; librdkafka's threads of that producer must not inherit the pin."""
    with socket.socket() as s:  # a Kafka that is away: the producers only need to exist
        s.bind(("127.0.0.1", 0))
        kafka = KafkaSettings(bootstrap_servers=f"127.0.0.1:{s.getsockname()[1]}")
        made: dict[str, KafkaSink] = {}

        def start_pinned() -> None:  # as Agent.run does: pin, then make the sink and start its thread
            free = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {CPU})
            made["sink"] = KafkaSink(kafka, SinkSettings(), Buffer(100, 1 << 20), None, free).start()

        t = threading.Thread(target=start_pinned)
        t.start()
        t.join()
        sink = made["sink"]
        first = sink.producer
        sink.set_ack("files", lambda tokens: None)  # a file source appears: reports per delivery from now on
        wait_until(lambda: sink.producer is not first, what="the sink's new producer")
        kafka_now = kafka_threads()
        sink_cpus = python_threads()["kafka-sink"]
        sink.stop_now()
        sink.close()
    assert sink_cpus == {CPU}
    assert kafka_now and all(c == ALLOWED for c in kafka_now.values()), kafka_now


def test_a_cpu_the_agent_may_not_use_is_refused_with_the_config():
    with pytest.raises(Exception, match="may run on CPUs"):
        validate(AgentConfig, {"agent": {"pin_to_cpu": CPU + 1}})


def test_a_reload_on_the_pinned_thread_checks_the_cpu_against_the_process_cpus():
    """SIGHUP re-validates the config on the agent's (pinned) thread: another CPU of the process is fine."""
    other = min(ALLOWED)
    checked: dict[str, object] = {}

    def pinned_reload() -> None:
        before = affinity.pin_calling_thread(CPU)
        try:
            checked["config"] = validate(AgentConfig, {"agent": {"pin_to_cpu": other}})
        except Exception as e:
            checked["error"] = e
        finally:
            affinity.restore(before)

    t = threading.Thread(target=pinned_reload)
    t.start()
    t.join()
    assert "error" not in checked, checked
