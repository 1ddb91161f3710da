"""Agent lifecycle edges against a real broker: sources added by SIGHUP under `spill`, the order of
multiline entries pending across a reload, SIGTERM while the buffer is full, the accounting of what
a shutdown could not deliver, and a unix source restarted after a crash.

Where Kafka must be unreachable, the bootstrap address is a free port nobody listens on.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from logferry.broker.local import free_ports
from logferry.collectors import agent as agent_module
from logferry.collectors.agent import Agent
from logferry.collectors.config import AgentConfig
from logferry.collectors.sink import WRITE_AHEAD_WINDOW
from logferry.collectors.spool import Spool
from logferry.collectors.testing import RunningAgent, read_topic, wait_until
from logferry.config import read_toml, validate

pytestmark = pytest.mark.kafka


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def received(source: str) -> float:
    return metric("logferry_source_entries_received_total", source=source, kind="unix")


def undelivered_metric() -> float:
    return metric("logferry_entries_dropped_total", reason="undelivered")


def dead_kafka() -> str:
    (port,) = free_ports(1)
    return f"127.0.0.1:{port}"


def unix_source(name: str, path: Path, **options: Any) -> str:
    opts = "".join(f"{k} = {v!r}\n" for k, v in options.items())
    return f'[[sources]]\nkind = "unix"\nname = "{name}"\naddress = "{path}"\n' + (
        f"[sources.options]\n{opts}" if opts else ""
    )


def base_toml(bootstrap: str, topic: str, state: Path, extra: str = "") -> str:
    return (
        f'[kafka]\nbootstrap_servers = "{bootstrap}"\n[metrics]\nenabled = false\n'
        f'[agent]\nstate_dir = "{state}"\ngrace_period = 1.0\n[route]\ntopic = "{topic}"\n{extra}'
    )


class AgentOnThread:
    """An Agent started from a config file (so `request(SIGHUP)` reloads it), run on a thread."""

    def __init__(self, cfg: Path) -> None:
        self.agent = Agent(validate(AgentConfig, read_toml(cfg), str(cfg)), config_path=cfg)
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.rc = self.agent.run()

    def start(self) -> None:
        self.thread.start()
        agent = self.agent
        wait_until(lambda: agent.sink is not None and len(agent._threads) == len(agent.config.sources),
                   what="agent start")  # fmt: skip

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM; the exit status, or None when the agent did not act on it within `timeout`."""
        self.agent.request(signal.SIGTERM)
        self.thread.join(timeout)
        return None if self.thread.is_alive() else self.rc


@pytest.fixture
def start_agent() -> Iterator[Callable[[Path], AgentOnThread]]:
    """Start agents from config files; any still running when the test ends is stopped."""
    runners: list[AgentOnThread] = []

    def start(cfg: Path) -> AgentOnThread:
        runner = AgentOnThread(cfg)
        runners.append(runner)
        runner.start()
        return runner

    yield start
    for runner in runners:
        if runner.thread.is_alive():
            runner.stop(timeout=30)


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


# ---- 1: a source added by SIGHUP gets the spool's acknowledgements ---------------------------
def test_file_source_added_by_sighup_under_spill_advances_its_checkpoint(
    kafka_settings, make_topic, tmp_path, start_agent
):
    topic = make_topic()
    state = tmp_path / "state"
    cfg = tmp_path / "agent.toml"
    base = base_toml(kafka_settings.bootstrap_servers, topic, state, '[buffer]\npolicy = "spill"\n')
    cfg.write_text(base + unix_source("sock", tmp_path / "a.sock"))
    runner = start_agent(cfg)
    agent = runner.agent
    log = tmp_path / "app.log"
    lines = [f"file line {i}" for i in range(200)]
    log.write_text("".join(f"{x}\n" for x in lines))
    cfg.write_text(
        base + unix_source("sock", tmp_path / "a.sock")
        + f'[[sources]]\nkind = "file"\nname = "files"\naddress = "{log}"\n[sources.options]\n'
        'start_at = "beginning"\npoll_interval = 0.05\ncheckpoint_interval = 0.1\n'
    )  # fmt: skip
    agent.request(signal.SIGHUP)
    wait_until(lambda: "files" in agent.sources, what="file source added by the reload")
    got = read_topic(kafka_settings, topic, len(lines))
    assert [d.entry["message"] for d in got] == lines
    store = agent.sources["files"].store
    size = log.stat().st_size
    wait_until(lambda: [c.offset for c in store.entries()] == [size], timeout=10, what="checkpoint at the end")
    assert runner.stop() == 0


# ---- 3: pending multiline entries keep their place across a reload ---------------------------
def test_reload_keeps_a_pending_multiline_entry_before_newer_lines(kafka_settings, make_topic, tmp_path, start_agent):
    topic = make_topic()
    cfg = tmp_path / "agent.toml"
    # Long timeout: the pending entry is released only by the next start line or the reload's flush.
    base = base_toml(kafka_settings.bootstrap_servers, topic, tmp_path / "state",
                     '[multiline]\nstart_pattern = "^\\\\S"\ntimeout = 60.0\n')  # fmt: skip
    app = unix_source("app", tmp_path / "app.sock")
    cfg.write_text(base + app + unix_source("other", tmp_path / "o.sock", backlog=16))
    runner = start_agent(cfg)
    agent = runner.agent
    sink = agent.sink
    assert sink is not None
    client = connect(tmp_path / "app.sock")
    client.sendall(b"A first\n  cont a\n")
    wait_until(lambda: received("app") >= 2, what="A read")
    # The reload restarts `other` (its options changed). While it stops, `app` keeps reading: B and C.
    other = agent.sources["other"]
    close = other.close
    base_delivered = sink.delivered_total

    def slow_close() -> None:
        client.sendall(b"B second\nC third\n")
        # B and C (one read) release an entry whichever pipeline processes them: wait until it is in Kafka.
        wait_until(lambda: sink.delivered_total > base_delivered, what="an entry released during the reload")
        close()

    other.close = slow_close  # type: ignore[method-assign]
    cfg.write_text(base + app + unix_source("other", tmp_path / "o.sock", backlog=32))
    agent.request(signal.SIGHUP)
    wait_until(lambda: agent.sources.get("other") not in (None, other), what="reload")
    client.sendall(b"D fourth\n")
    wait_until(lambda: received("app") >= 5, what="D read")
    client.close()
    assert runner.stop() == 0
    got = read_topic(kafka_settings, topic, 4, settle=1.0)
    assert [d.entry["message"] for d in got] == ["A first\n  cont a", "B second", "C third", "D fourth"]


# ---- 2: SIGTERM is acted on while the main thread has entries the buffer cannot take ------------
def test_sigterm_with_a_full_buffer_and_a_pending_multiline_entry_exits_and_counts_all(tmp_path, start_agent):
    sock = tmp_path / "m.sock"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        base_toml(dead_kafka(), "never", tmp_path / "state",
                  '[buffer]\nmax_entries = 10\npolicy = "block"\n[sink]\nqueue_max_messages = 10\n'
                  '[multiline]\nstart_pattern = "^\\\\S"\ntimeout = 0.2\n')
        + unix_source("multi", sock)
    )  # fmt: skip
    runner = start_agent(cfg)
    agent = runner.agent
    before_undelivered = undelivered_metric()
    before_purged = metric("logferry_delivery_failures_total", topic="never", reason="_PURGE_QUEUE")
    n = 30  # 10 in the producer, 10 in the buffer, 9 blocked in the source's put, 1 pending multiline
    client = connect(sock)
    client.sendall(b"".join(b"line %d\n" % i for i in range(n)))
    wait_until(lambda: received("multi") == n, what="all lines read")
    buffer, sink = agent.buffer, agent.sink
    assert buffer is not None and sink is not None
    wait_until(lambda: len(buffer) == 10 and sink.in_flight == 10, what="buffer and producer full")
    wait_until(lambda: _joiners_empty(agent), what="the pending multiline entry expired into the main loop")
    assert runner.stop(timeout=20) == 0, "SIGTERM not acted on: the main thread is stuck"
    assert agent.undelivered == n
    wait_until(lambda: not agent._threads["multi"].is_alive(), what="source thread ended")
    purged = metric("logferry_delivery_failures_total", topic="never", reason="_PURGE_QUEUE") - before_purged
    assert undelivered_metric() - before_undelivered + purged == n  # every entry counted by a metric
    client.close()


def _joiners_empty(agent: Agent) -> bool:
    assert agent.pipeline is not None
    return all(st.joiner is None or st.joiner.pending == 0 for st in agent.pipeline._sources.values())


# ---- 4: a drain timeout accounts for every entry the sink took ---------------------------------
def test_drain_timeout_counts_the_batch_the_sink_could_not_queue(tmp_path, start_agent):
    sock = tmp_path / "s.sock"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(base_toml(dead_kafka(), "never", tmp_path / "state", '[buffer]\npolicy = "spill"\n')
                   + unix_source("spilled", sock))  # fmt: skip
    runner = start_agent(cfg)
    agent = runner.agent
    n = 2 * WRITE_AHEAD_WINDOW + 5000
    with connect(sock) as client:
        client.sendall(b"".join(b"entry %d\n" % i for i in range(n)))
    wait_until(lambda: received("spilled") == n, what="all lines read")
    buffer, sink = agent.buffer, agent.sink
    assert buffer is not None and sink is not None
    # librdkafka holds one window; the sink holds the next batch it took but cannot queue.
    wait_until(lambda: sink.in_flight == WRITE_AHEAD_WINDOW and len(buffer) + sink.in_flight < n,
               what="a batch taken by the sink and stuck")  # fmt: skip
    assert runner.stop() == 0
    assert agent.undelivered == n


def test_spool_closed_under_a_blocked_append_counts_what_it_did_not_store(tmp_path, start_agent):
    sock = tmp_path / "f.sock"
    cfg = tmp_path / "agent.toml"
    state = tmp_path / "state"
    cfg.write_text(
        base_toml(dead_kafka(), "never", state,
                  '[buffer]\npolicy = "spill"\n[spool]\nmax_bytes = 1048576\nsegment_bytes = 65536\n'
                  'when_full = "block"\n')
        + unix_source("full", sock)
    )  # fmt: skip
    runner = start_agent(cfg)
    agent = runner.agent
    before_undelivered = undelivered_metric()
    before_read = received("full")
    client = connect(sock)
    writer = threading.Thread(
        target=lambda: _send_quietly(client, b"".join(b"%06d %s\n" % (i, b"x" * 120) for i in range(20_000))),
        daemon=True,
    )
    writer.start()
    source_thread = agent._threads["full"]
    wait_until(lambda: _waiting_in(source_thread, "_make_room"), what="the source blocked on the full spool")
    assert runner.stop() == 0
    wait_until(lambda: not agent._threads["full"].is_alive(), what="source thread ended")
    client.close()
    writer.join(10)
    with Spool(state / "spool") as spool:
        spooled = spool.pending
    accepted = received("full") - before_read
    assert spooled + (undelivered_metric() - before_undelivered) == accepted


def _waiting_in(thread: threading.Thread, function: str) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def _send_quietly(client: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the agent closes the connection at shutdown
        client.sendall(data)


# ---- 5: a crashed unix source keeps serving the clients it had ---------------------------------
def test_unix_source_restarted_after_a_crash_keeps_serving_its_clients(kafka_settings, make_topic, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    monkeypatch.setattr(agent_module, "RESTART_DELAY", 0.0)
    topic = make_topic()
    sock = tmp_path / "c.sock"
    crashed = metric("logferry_source_errors_total", source="crashy", kind="unix", reason="crashed")
    cfg = {"kafka": {"bootstrap_servers": kafka_settings.bootstrap_servers}, "route": {"topic": topic},
           "sources": [{"kind": "unix", "address": str(sock), "name": "crashy"}]}  # fmt: skip
    with RunningAgent(cfg) as agent:
        client = connect(sock)
        client.sendall(b"before\n")
        assert [d.entry["message"] for d in read_topic(kafka_settings, topic, 1)] == ["before"]
        pipeline = agent.pipeline
        assert pipeline is not None

        def crash_once(batch: Any) -> list:
            del pipeline.process  # the next call is the pipeline's own again
            raise RuntimeError("injected crash inside the source's run()")

        pipeline.process = crash_once  # type: ignore[method-assign]
        client.sendall(b"lost in the crash\n")
        wait_until(lambda: metric("logferry_source_errors_total", source="crashy", kind="unix", reason="crashed")
                   == crashed + 1, what="the crash")  # fmt: skip
        client.sendall(b"after\n")
        got = read_topic(kafka_settings, topic, 2, timeout=15)
        assert [d.entry["message"] for d in got] == ["before", "after"]
        src = agent.sources["crashy"]
        client.close()
        wait_until(lambda: len(src._clients) == 0, timeout=10, what="the client's connection released")
