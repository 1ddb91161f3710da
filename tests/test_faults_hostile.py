"""Hostile clients on the agent's stream sockets (issue 9): a never-ending line, 20k tiny
connections opened and dropped (issue: a million), a client that stalls mid-line. The agent
(`logferry collect`, a subprocess so its RSS is its own) stays up, its memory stays bounded, and
the well-behaved clients' entries all arrive.
"""

from __future__ import annotations

import socket
import threading

import pytest
from faults_support import record_fault, rss_bytes
from test_durability import start_agent, write_toml

from logferry.broker.local import free_ports
from logferry.collectors.testing import read_topic, wait_until

pytestmark = pytest.mark.kafka
ENDLESS_BYTES = 64 << 20
TINY_CONNECTIONS = 20_000


def connect(target: tuple[int, object]) -> socket.socket:
    family, address = target
    s = socket.socket(family, socket.SOCK_STREAM)
    s.connect(address)
    return s


def can_connect(target: tuple[int, object]) -> bool:
    try:
        connect(target).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("kind", ["unix", "syslog"])
def test_hostile_clients_leave_the_agent_up_bounded_and_serving(kind, kafka_settings, make_topic, tmp_path):
    topic = make_topic()
    if kind == "unix":
        address = str(tmp_path / "in.sock")
        target: tuple[int, object] = (socket.AF_UNIX, address)
    else:
        port = free_ports(1)[0]
        address = f"tcp://127.0.0.1:{port}"
        target = (socket.AF_INET, ("127.0.0.1", port))
    cfg = {"kafka": {"bootstrap_servers": kafka_settings.bootstrap_servers}, "route": {"topic": topic},
           "sources": [{"kind": kind, "address": address, "name": "in", "parser": {"kind": "raw"}}],
           "agent": {"state_dir": str(tmp_path / "state")}, "metrics": {"enabled": False}}  # fmt: skip
    log = tmp_path / "agent.log"
    proc = start_agent(write_toml(tmp_path / "agent.toml", cfg), log)
    peak = 0
    try:
        wait_until(lambda: can_connect(target) or proc.poll() is not None, 30, "agent listening")
        assert proc.poll() is None, log.read_text()
        baseline = rss_bytes(proc.pid)

        def endless() -> None:  # 64 MiB, never a newline
            with connect(target) as s:
                chunk = b"x" * (256 << 10)
                for _ in range(ENDLESS_BYTES // len(chunk)):
                    s.sendall(chunk)

        stalled = connect(target)
        stalled.sendall(b"half a li")  # then nothing: neither the rest nor a close
        hog = threading.Thread(target=endless, daemon=True)
        hog.start()
        good = [f"good {i}" for i in range(500)]
        with connect(target) as s:
            s.sendall("".join(g + "\n" for g in good).encode())
        tiny: list[str] = []
        for i in range(TINY_CONNECTIONS):
            with connect(target) as s:
                if i % 10 == 0:  # every tenth says one line; the rest connect and drop
                    tiny.append(f"tiny {i}")
                    s.sendall(f"tiny {i}\n".encode())
            if i % 1000 == 0:
                peak = max(peak, rss_bytes(proc.pid))
        hog.join(60)
        assert not hog.is_alive(), "the agent stopped reading the endless line"
        peak = max(peak, rss_bytes(proc.pid))
        want = set(good) | set(tiny)
        got = read_topic(kafka_settings, topic, len(want), timeout=60, settle=1.0)
        messages = [d.entry["message"] or "" for d in got]
        delivered = [m for m in messages if m in want]
        assert proc.poll() is None, "agent died:\n" + log.read_text()[-3000:]
        proc.terminate()  # with the stalled client still connected
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        stalled.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lost = len(want - set(delivered))
    growth = (peak - baseline) / (1 << 20)
    print(f"\n{kind}: RSS {baseline / (1 << 20):.0f} MiB -> peak {peak / (1 << 20):.0f} MiB "
          f"while a {ENDLESS_BYTES >> 20} MiB line and {TINY_CONNECTIONS} connections arrived")  # fmt: skip
    dup = len(delivered) - len(set(delivered))
    record_fault(f"hostile clients ({kind})", len(want), len(delivered), None, lost, dup)
    assert lost == 0
    assert dup == 0
    assert growth < 64, f"RSS grew {growth:.0f} MiB"
