"""The processor runtime against the real broker: order, commits, hand-over, shaping, dead letters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from logferry.processors import Processor
from logferry.schemas import default_codec

pytestmark = pytest.mark.kafka
TESTS = Path(__file__).parent
LEVELS = ("info", "warning", "error", "debug")


def entry(seq: int, key: str, **over) -> dict:
    e = {
        "timestamp": 1_700_000_000_000_000 + seq, "received_at": 1_700_000_000_000_000, "host": "h",
        "source": "test", "service": f"svc{seq % 3}", "level": LEVELS[seq % 4], "message": f"m{seq}",
        "attributes": {"seq": str(seq), "key": key},
    }  # fmt: skip
    e.update(over)
    return e


def produce(bootstrap: str, topic: str, n: int, keys: int, start: int = 0, **over) -> dict[str, list[int]]:
    """n entries round-robin over `keys` keys; attributes.seq counts per key. Returns key -> seqs."""
    codec = default_codec()
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    sent: dict[str, list[int]] = defaultdict(list)
    for i in range(start, start + n):
        key = f"k{i % keys}"
        seq = i // keys
        sent[key].append(seq)
        e = entry(seq, key, **over)
        while True:
            try:
                p.produce(topic, codec.encode(e), key=key.encode(), headers=codec.headers)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    assert p.flush(30) == 0
    return sent


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "watermarks"})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        c.close()


def lag(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    ends = end_offsets(bootstrap, topic, partitions)
    done = committed(bootstrap, group, topic, partitions)
    return sum(ends[p] - max(0, done[p]) for p in ends)


def wait_for(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def start(app: Processor) -> threading.Thread:
    t = threading.Thread(target=app.run, kwargs={"install_signals": False}, daemon=True)
    t.start()
    assert app.wait_assigned(30), "no partitions assigned"
    return t


def read_handled(files: list[Path]) -> list[tuple[int, int, str, int, int]]:
    rows = []
    for f in files:
        if f.exists():
            for line in f.read_text().splitlines():
                p, o, k, s, pid = line.split()
                rows.append((int(p), int(o), k, int(s), int(pid)))
    return rows


def assert_not_committed_ahead(commits: dict[int, int], handled: set[tuple[int, int]]) -> None:
    for p, c in commits.items():
        missing = [o for o in range(max(0, c)) if (p, o) not in handled]
        assert not missing, f"partition {p} committed at {c} but offsets {missing[:5]}... were never handled"


# ---- the done-when scenario ---------------------------------------------------------------
def test_two_members_100k_entries_key_order_and_commits(kafka_bootstrap, make_topic, group_id):
    """100k entries, 1000 keys, 6 partitions, 2 members, random delays: all handled, in key order,
    and at every moment the committed offsets are behind what was handled."""
    topic = make_topic(partitions=6)
    handled: list[tuple[int, int, str, int]] = []  # list.append is atomic: the handler threads share it
    lock = threading.Lock()

    def make_member() -> Processor:
        app = Processor(group=group_id, topics=[topic], bootstrap_servers=kafka_bootstrap, concurrency=32,
                        commit_interval=0.2)  # fmt: skip

        @app.handler
        def handle(e, ctx):
            if int(e["attributes"]["seq"]) % 7 == 0:
                time.sleep(0.001 * (ctx.offset % 3))  # random-ish delays that reorder finishing
            handled.append((ctx.partition, ctx.offset, e["attributes"]["key"], int(e["attributes"]["seq"]), id(app)))

        return app

    a, b = make_member(), make_member()
    threads = [start(a), start(b)]  # both in the group before the entries arrive
    wait_for(lambda: len(a.runtime.assignment()) == 3 and len(b.runtime.assignment()) == 3, 30, "a 3/3 split")
    t0 = time.monotonic()
    sent = produce(kafka_bootstrap, topic, 100_000, 1000)
    violations: list[str] = []

    def check_commits() -> None:  # nothing committed ahead of work, sampled while running
        while len(handled) < 100_000:
            commits = committed(kafka_bootstrap, group_id, topic, 6)
            with lock:
                done = {(p, o) for p, o, *_ in list(handled)}
            try:
                assert_not_committed_ahead(commits, done)
            except AssertionError as e:
                violations.append(str(e))
                return
            time.sleep(0.2)

    checker = threading.Thread(target=check_commits, daemon=True)
    checker.start()
    try:
        wait_for(lambda: len({(p, o) for p, o, *_ in list(handled)}) >= 100_000, 120, "every entry handled", 0.2)
        wait_for(lambda: lag(kafka_bootstrap, group_id, topic, 6) == 0, 30, "everything committed", 0.2)
        checker.join(10)
    finally:  # a failure here must not leave members running into the next test
        a.stop()
        b.stop()
        for t in threads:
            t.join(30)
    assert not violations, violations[0]
    assert {id(a), id(b)} == {m for *_, m in handled}, "both members took part"
    per_member_key: dict[tuple[int, str], list[int]] = defaultdict(list)
    for _, _, key, seq, member in handled:
        per_member_key[(member, key)].append(seq)
    for (member, key), seqs in per_member_key.items():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"{key} out of order on {member}"
    got = defaultdict(set)
    for _, _, key, seq, _ in handled:
        got[key].add(seq)
    assert {k: sorted(v) for k, v in got.items()} == sent
    print(f"handled {len(handled)} deliveries of 100000 entries in {time.monotonic() - t0:.1f}s, "
          f"duplicates {len(handled) - 100_000}")  # fmt: skip


class Member:
    """A `logferry process` subprocess whose stderr is collected (and drained, so it never blocks)."""

    def __init__(self, bootstrap: str, topic: str, group: str, out: Path, *extra: str) -> None:
        env = dict(os.environ, LOGFERRY_TEST_HANDLED=str(out), PYTHONPATH=str(TESTS), LOGFERRY_TEST_MAX_DELAY="0.01")
        # Config for what the flags do not cover: a short session so a killed member is noticed fast.
        cfg = out.with_suffix(".toml")
        cfg.write_text("[processor]\ngroup='x'\ntopics=['x']\nsession_timeout_ms=6000\ncommit_interval=0.2\n"
                       "[metrics]\nenabled=false\n")  # fmt: skip
        cmd = [
            sys.executable, "-m", "logferry", "process", "--handler", "processor_member:handle", "--topic", topic,
            "--group", group, "--bootstrap-servers", bootstrap, "--concurrency", "32", "--config", str(cfg), *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)


def test_killed_member_hands_over_without_loss_or_reordering(kafka_bootstrap, make_topic, group_id, tmp_path):
    topic = make_topic(partitions=6)
    files = [tmp_path / "a.log", tmp_path / "b.log"]
    a = Member(kafka_bootstrap, topic, group_id, files[0])
    b = Member(kafka_bootstrap, topic, group_id, files[1])
    try:
        wait_for(lambda: a.said("assigned") and b.said("assigned"), 60, "both members in the group")
        sent = produce(kafka_bootstrap, topic, 20_000, 1000)
        # Kill b once both members have handled a share: b has work in flight, uncommitted.
        wait_for(lambda: all(f.exists() and f.stat().st_size > 20_000 for f in files), 60, "both members working")
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(10)
        # More after the kill, on every partition: a must take over b's partitions even when b
        # happened to finish its share before the signal landed.
        for key, seqs in produce(kafka_bootstrap, topic, 10_000, 1000, start=20_000).items():
            sent[key] += seqs
        wait_for(lambda: len({(r[0], r[1]) for r in read_handled(files)}) >= 30_000, 90, "a to finish b's share")
        wait_for(lambda: lag(kafka_bootstrap, group_id, topic, 6) == 0, 30, "everything committed")
        a.proc.send_signal(signal.SIGTERM)  # graceful stop: commits what is done and leaves the group
        assert a.proc.wait(30) == 0, "".join(a.lines[-20:])
        assert a.said("revoked")
    finally:
        for m in (a, b):
            if m.proc.poll() is None:
                m.proc.kill()
    rows = read_handled(files)
    assert_not_committed_ahead(committed(kafka_bootstrap, group_id, topic, 6), {(p, o) for p, o, *_ in rows})
    pids = {pid for *_, pid in rows}
    assert len(pids) == 2
    by_member_key: dict[tuple[int, str], list[int]] = defaultdict(list)
    for _, _, key, seq, pid in rows:
        by_member_key[(pid, key)].append(seq)
    for (pid, key), seqs in by_member_key.items():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"{key} out of order in member {pid}"
    got = defaultdict(set)
    for _, _, key, seq, _ in rows:
        got[key].add(seq)
    assert {k: sorted(v) for k, v in got.items()} == sent, "an entry was missed"
    dups = sum(c - 1 for c in Counter((p, o) for p, o, *_ in rows).values())
    parts = {pid: {p for p, _, _, _, q in rows if q == pid} for pid in pids}
    assert parts[a.proc.pid] & parts[b.proc.pid], "a took over partitions b had been working on"
    print(f"hand-over after SIGKILL: {len(rows)} deliveries of 30000 entries, {dups} duplicates; "
          f"killed member had handled {sum(1 for r in rows if r[4] == b.proc.pid)}")  # fmt: skip
