"""Agent `kill -9` loop and processor member crash/restart loop at the same time, while a writer
appends keyed entries (issue 9): the final accounting written / delivered / handled, and per-key
order end to end by the rule in faults_support.check_key_order.

Pipeline: writer → app.log (file source: checkpoints after ack, so a killed agent re-reads, never
skips) → `logferry collect` (key = service) → 6 partitions → 2 `logferry process` members
(tests/processor_member.py, one shared O_APPEND file, so its line order is the handling order).
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from faults_support import check_key_order, keyed_line, record_fault
from test_durability import start_agent, write_toml
from test_processor_kafka import Member, read_handled

from logferry.collectors.testing import read_topic, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
KEYS = 40
AGENT_KILLS = 4
MEMBER_KILLS = 4


def test_agent_and_member_crash_loops_under_load(kafka_settings, make_topic, group_id, tmp_path):
    topic = make_topic(partitions=6)
    log = tmp_path / "app.log"
    log.touch()
    source = {"kind": "file", "address": str(log), "name": "app",
              "options": {"start_at": "beginning", "poll_interval": 0.05, "checkpoint_interval": 0.2}}  # fmt: skip
    cfg = write_toml(tmp_path / "agent.toml", {
        "kafka": {"bootstrap_servers": kafka_settings.bootstrap_servers}, "sources": [source],
        "route": {"topic": topic}, "key": {"field": "service"}, "agent": {"state_dir": str(tmp_path / "state")},
        "metrics": {"enabled": False}, "buffer": {"max_entries": 5000}, "parser": {"kind": "json"}})  # fmt: skip
    handled = tmp_path / "handled.log"
    bootstrap = kafka_settings.bootstrap_servers
    members = [Member(bootstrap, topic, group_id, handled), Member(bootstrap, topic, group_id, handled)]
    agent_log = tmp_path / "agent.log"
    written = 0
    stop = threading.Event()
    rnd = random.Random(9)

    def write() -> None:
        nonlocal written
        with log.open("a") as f:
            while not stop.is_set():
                f.write("".join(keyed_line(i, KEYS) for i in range(written, written + 100)))
                f.flush()
                written += 100
                time.sleep(0.1)

    def member_crash_loop() -> None:
        for k in range(MEMBER_KILLS):
            if stop.wait(rnd.uniform(2.0, 4.0)):
                return
            i = k % 2
            members[i].proc.kill()
            members[i].proc.wait(10)
            members[i] = Member(bootstrap, topic, group_id, handled)

    agent = None
    try:
        wait_until(lambda: all(m.said("assigned") for m in members), 60, "members in the group")
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        crasher = threading.Thread(target=member_crash_loop, daemon=True)
        crasher.start()
        for _ in range(AGENT_KILLS):
            agent = start_agent(cfg, agent_log)
            time.sleep(rnd.uniform(1.5, 3.0))  # a random moment under load is the point of the fault
            assert agent.poll() is None, agent_log.read_text()[-3000:]
            agent.kill()
            agent.wait()
        stop.set()
        writer.join(10)
        crasher.join(30)
        agent = start_agent(cfg, agent_log)  # the last one runs to the end
        expected = {f"k{k}": len(range(k, written, KEYS)) for k in range(KEYS)}
        try:
            wait_until(lambda: len({(r[2], r[3]) for r in read_handled([handled])}) >= written, 120,
                       "every written entry handled")  # fmt: skip
        except AssertionError as e:
            said = "".join(ln for m in members for ln in m.lines[-15:])
            got = len(read_handled([handled]))
            raise AssertionError(f"{e}; {got} handled of {written}; members said:\n{said}") from None
    finally:
        for m in members:
            m.proc.kill()
        if agent is not None and agent.poll() is None:
            agent.terminate()
            agent.wait(30)
    rows = read_handled([handled])
    report = check_key_order(((k, s) for _, _, k, s, _ in rows), expected)
    delivered = len(read_topic(kafka_settings, topic, written, timeout=60, settle=1.0))
    record_fault(f"agent kill -9 x{AGENT_KILLS} + member kill -9 x{MEMBER_KILLS}", written, delivered,
                 report.handled, report.missing, report.handled - report.distinct)  # fmt: skip
    print(f"key order: {report.rewinds} rewinds (redelivered prefixes), violations: {report.violations}")
    assert report.missing == 0
    assert not report.violations, report.violations
