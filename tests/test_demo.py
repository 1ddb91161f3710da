"""`logferry demo`: the order/completeness check itself, then a whole quick run against the session broker."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import posix_ipc
import pytest
import sysv_ipc

from logferry.demo.check import Handle, check_order

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def handles(*pairs: tuple[str, int]) -> list[Handle]:
    return [Handle(key, seq, 0, i, i) for i, (key, seq) in enumerate(pairs)]


def test_check_order_accepts_interleaved_keys_and_counts_redeliveries():
    got = check_order(
        handles(("a", 0), ("b", 0), ("a", 1), ("a", 0), ("a", 1), ("b", 1), ("a", 2)),
        {"a": [0, 1, 2], "b": [0, 1]},
    )
    assert (got.expected, got.handled, got.missing, got.violations) == (5, 5, 0, 0)
    assert got.duplicates == 2  # a:0 and a:1 again, as after a rebalance


def test_check_order_flags_an_entry_handled_before_an_earlier_one_of_its_key():
    got = check_order(handles(("a", 0), ("a", 2), ("a", 1), ("b", 1)), {"a": [0, 1, 2], "b": [0, 1]})
    assert got.violations == 2  # a:2 before a:1, and b:1 before b:0
    assert got.missing == 1  # b:0 never came
    assert got.handled == 4


def test_check_order_follows_the_expected_sequence_of_a_replay_window():
    window = {"a": [7, 8, 9]}
    assert check_order(handles(("a", 7), ("a", 8), ("a", 9)), window).violations == 0
    got = check_order(handles(("a", 3), ("a", 8), ("a", 9)), window)
    # a:3 is outside the window; a:8 and a:9 both ran while a:7 was still owed
    assert (got.unexpected, got.violations, got.missing) == (1, 2, 1)


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_quick_demo_runs_checks_and_plots(kafka_bootstrap, kafka_settings, tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "logferry", "demo", "--quick", "--json", "--out", str(out),
         "--bootstrap-servers", kafka_bootstrap],
        capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads(done.stdout)
    assert s["ok"] and s["failures"] == []
    assert json.loads((out / "summary.json").read_text()) == s

    # Every entry written got through every stage exactly once.
    written = s["written"]
    assert written > 0
    assert s["accepted_by_agent"] == s["agent_acked"] == s["delivered_to_kafka"] == written
    assert s["agent_drops"] == 0
    first = s["first_pass"]
    assert first["expected"] == first["handled"] == written
    assert first["missing"] == first["violations"] == first["unexpected"] == 0
    assert first["calls"] == first["handled"] + first["duplicates"]

    # The replay re-handled its whole window, in key order, and the window is the burst onwards.
    replay = s["replay"]
    assert replay["partitions_moved"] == s["plan"]["partitions"] and replay["silent_members"] == []
    burst_entries = s["plan"]["burst_rate"] * s["plan"]["burst_s"]
    assert burst_entries * 0.5 < replay["expected"] <= written
    assert replay["handled"] == replay["expected"]
    assert replay["missing"] == replay["violations"] == replay["unexpected"] == 0

    # The burst was shaved: lag rose above its pre-burst level, then drained to 0.
    lag = s["lag"]
    assert lag["max"] > lag["pre_burst"] and lag["max"] > 0
    assert lag["drained"] and lag["final"] == 0 and s["lag_rose_then_drained"]
    assert s["rates"]["peak_ingest"] > s["plan"]["group_rate_limit"]
    assert all(rc == 0 for rc in s["member_exits"].values())

    plot = out / "demo.png"
    assert s["plot"] == str(plot)
    assert plot.read_bytes()[:8] == PNG_MAGIC and plot.stat().st_size > 10_000

    # Nothing left behind: on the user's cluster the demo's topic goes, and so do its message queues.
    admin, deadline = kafka_settings.admin(), time.monotonic() + 20
    while s["topic"] in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, f"topic {s['topic']} still exists"
        time.sleep(0.2)
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.MessageQueue(s["sources"]["posix_mq"])
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.MessageQueue(int(s["sources"]["sysv_mq"], 0))


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_interrupted_demo_leaves_no_process_or_ipc_object(kafka_bootstrap, tmp_path):
    log = tmp_path / "demo.log"
    with log.open("w") as sink:
        demo = subprocess.Popen(
            [sys.executable, "-m", "logferry", "demo", "--quick", "--out", str(tmp_path / "results"),
             "--bootstrap-servers", kafka_bootstrap],
            stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "400"},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 90
            while "warm-up" not in log.read_text():  # the agent and both members are running
                assert demo.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "the demo never reached its warm-up"
                time.sleep(0.2)
            demo.send_signal(signal.SIGINT)
            assert demo.wait(60) == 130
        finally:
            if demo.poll() is None:
                demo.kill()
    text = log.read_text()
    pids = [int(p) for p in re.findall(r"\(pid (\d+),", text)]
    assert len(pids) == 3  # the agent and two members
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    socket_dir = Path(re.search(r"unix:(\S+)/app\.sock", text).group(1))
    assert not socket_dir.exists()
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.MessageQueue(re.search(r"posix_mq:(/[\w-]+)", text).group(1))
    with pytest.raises(sysv_ipc.ExistentialError):
        sysv_ipc.MessageQueue(int(re.search(r"sysv_mq:(0x[0-9a-f]+)", text).group(1), 0))
