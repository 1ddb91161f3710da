"""`logferry process --replay-from/--replay-by/--as-group` against the real broker.

Members are real `logferry process` subprocesses running tests/processor_member.py, which
appends `partition offset key seq pid` per handled entry to a file.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Producer
from processor_support import LoggedProcess

from logferry.cli import main
from logferry.kafka import KafkaSettings
from logferry.processors.offsets import GroupOffsetsAdmin, ResetTarget
from logferry.schemas import default_codec

pytestmark = pytest.mark.kafka
TESTS = Path(__file__).parent
MINUTE_MS = 60_000
Sent = list[tuple[str, int, int]]  # (key, seq, timestamp ms) in produce order


def produce_entries(bootstrap: str, topic: str, stamps: list[int], keys: int = 10, start: int = 0) -> Sent:
    """One LogEntry per timestamp, round-robin over `keys` keys; seq counts per key from entry `start` on."""
    codec = default_codec()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    sent: Sent = []
    for i, ts in enumerate(stamps, start=start):
        key, seq = f"k{i % keys}", i // keys
        entry = {
            "timestamp": ts * 1000, "received_at": ts * 1000, "host": "h", "source": "test", "service": "svc",
            "level": "info", "message": f"m{i}", "attributes": {"seq": str(seq)},
        }  # fmt: skip
        producer.produce(topic, codec.encode(entry), key=key.encode(), headers=codec.headers, timestamp=ts)
        sent.append((key, seq, ts))
    assert producer.flush(30) == 0
    return sent


def wait_for(cond: Callable[[], bool], timeout: float, what: str, *members: Member) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            logs = "".join(m.log()[-4000:] for m in members)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
        time.sleep(0.1)


def caught_up(admin: GroupOffsetsAdmin, group: str, topic: str) -> bool:
    tps = admin.select([(topic, None)])
    ends = {tp: end for tp, (_, end) in admin.watermarks(tps).items()}
    return admin.committed(group, tps) == ends


class Member(LoggedProcess):
    """A `logferry process` subprocess; its stderr is collected so tests can await log lines."""

    def __init__(self, bootstrap: str, topic: str, group: str, out: Path, *extra: str) -> None:
        env = dict(os.environ, LOGFERRY_TEST_HANDLED=str(out), PYTHONPATH=str(TESTS), LOGFERRY_TEST_MAX_DELAY="0")
        cfg = out.with_suffix(".toml")
        cfg.write_text("[processor]\ngroup='x'\ntopics=['x']\ncommit_interval=0.2\n[metrics]\nenabled=false\n")
        cmd = [
            sys.executable, "-m", "logferry", "process", "--config", str(cfg), "--handler", "processor_member:handle",
            "--topic", topic, "--group", group, "--bootstrap-servers", bootstrap, *extra,
        ]  # fmt: skip
        super().__init__(cmd, env)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.wait(30)


def handled(*files: Path) -> list[tuple[str, int]]:
    """(key, seq) per handled entry, in each member's handling order."""
    rows = []
    for f in files:
        if f.exists():
            for line in f.read_text().splitlines():
                _, _, key, seq, _ = line.split()
                rows.append((key, int(seq)))
    return rows


def assert_key_order(rows: list[tuple[str, int]]) -> None:
    last: dict[str, int] = {}
    for key, seq in rows:
        assert seq > last.get(key, -1), f"{key}: seq {seq} handled after {last[key]}"
        last[key] = seq


@pytest.fixture
def admin(kafka_settings: KafkaSettings) -> GroupOffsetsAdmin:
    return GroupOffsetsAdmin(kafka_settings)


def processed_to_end(admin: GroupOffsetsAdmin, group: str, topic: str) -> dict[tuple[str, int], int]:
    """A group that has handled everything: its committed offsets sit at the log end."""
    plan = admin.plan(group, ResetTarget("to_latest"), [(topic, None)])
    admin.execute(plan)
    return {(r.topic, r.partition): r.new for r in plan.resets}


def test_replay_from_rehandles_exactly_the_entries_at_or_after_the_time_once_per_group(
    kafka_bootstrap, make_topic, admin, tmp_path
) -> None:
    topic = make_topic(partitions=3)
    base = int(time.time() * 1000) - 60 * MINUTE_MS
    sent = produce_entries(kafka_bootstrap, topic, [base + i * 1000 for i in range(300)])
    group = f"replay-{uuid.uuid4().hex[:8]}"
    processed_to_end(admin, group, topic)
    since = sent[180][2]  # exactly an entry's time: it is included
    expected = sorted((k, s) for k, s, ts in sent if ts >= since)
    iso = datetime.fromtimestamp(since / 1000, UTC).isoformat(timespec="milliseconds")

    files = [tmp_path / "a.log", tmp_path / "b.log"]
    a = Member(kafka_bootstrap, topic, group, files[0], "--replay-from", iso)
    b: Member | None = None
    try:
        wait_for(lambda: len(handled(*files)) >= len(expected) and caught_up(admin, group, topic), 60, "the replay", a)
        # A replica started with the same flag while the group runs must not replay again:
        b = Member(kafka_bootstrap, topic, group, files[1], "--replay-from", iso)
        wait_for(lambda: "assigned " in b.log() and "already running" in b.log(), 60, "b to join without replaying")
        # New entries after b joined: once both members have handled them, any second replay would show.
        more = produce_entries(kafka_bootstrap, topic, [int(time.time() * 1000) + i for i in range(30)], start=300)
        more_rows = sorted((k, s) for k, s, _ in more)
        wait_for(lambda: len(handled(*files)) >= len(expected) + len(more_rows) and caught_up(admin, group, topic),
                 60, "the new entries")  # fmt: skip
    finally:
        a.stop()
        if b is not None:
            b.stop()
    rows = handled(*files)
    assert sorted(rows) == sorted(expected + more_rows)  # exactly these, each once
    assert_key_order(handled(files[0]))
    assert "replay: " in a.log() and "already running" not in a.log()


def test_replay_by_as_group_rebuilds_beside_the_live_group(kafka_bootstrap, make_topic, admin, tmp_path) -> None:
    topic = make_topic(partitions=2)
    now = int(time.time() * 1000)
    # 40 entries a minute apart, each half a minute off the whole minute, so "PT30M ago" falls
    # 30 s from any entry whichever second the member computes it in.
    sent = produce_entries(kafka_bootstrap, topic, [now - (60 - i) * MINUTE_MS - 30_000 for i in range(40)])
    live, side = f"live-{uuid.uuid4().hex[:8]}", f"side-{uuid.uuid4().hex[:8]}"
    live_offsets = processed_to_end(admin, live, topic)
    cutoff = now - 30 * MINUTE_MS
    expected = sorted((k, s) for k, s, ts in sent if ts >= cutoff)

    out = tmp_path / "side.log"
    member = Member(kafka_bootstrap, topic, live, out, "--as-group", side, "--replay-by", "PT30M")
    try:
        wait_for(
            lambda: len(handled(out)) >= len(expected) and caught_up(admin, side, topic), 60, "the side group", member
        )
    finally:
        member.stop()
    assert sorted(handled(out)) == expected
    assert_key_order(handled(out))
    assert admin.committed(live) == live_offsets  # the live group was never touched


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--as-group", "{g}"], "is the processor's own group"),
        (["--replay-from", "last tuesday"], "--replay-from 'last tuesday': not an ISO-8601 date-time"),
        (["--replay-by", "30m"], "--replay-by '30m': not an ISO-8601 duration"),
        (["--replay-from", "2026-01-01T00:00Z", "--replay-by", "PT1H"], "not both"),
    ],
)
def test_bad_replay_options_exit_2(extra, message, kafka_bootstrap, capsys, monkeypatch, tmp_path) -> None:
    group = f"bad-{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "p.toml"
    cfg.write_text("[processor]\ngroup='x'\ntopics=['x']\n[metrics]\nenabled=false\n")
    argv = ["logferry", "process", "--handler", "x:y", "-t", "t", "-g", group, "-b", kafka_bootstrap, "-c", str(cfg)]
    monkeypatch.setattr(sys, "argv", argv + [a.format(g=group) for a in extra])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())
