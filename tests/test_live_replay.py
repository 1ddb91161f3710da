"""`logferry replay` against a RUNNING group on the real broker: every member seeks and carries on.

Two Processor members run in threads of this process; a real `logferry replay` subprocess
publishes the command on a per-test control topic and prints the members' acknowledgements.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from prometheus_client import REGISTRY

from logferry.processors import Processor
from logferry.processors.control import ReplayCommand
from logferry.processors.offsets import GroupOffsetsAdmin
from logferry.schemas import default_codec

pytestmark = pytest.mark.kafka
MINUTE_MS = 60_000
Sent = list[tuple[str, int, int, int, int]]  # (key, seq, timestamp ms, partition, offset)


def produce_timed(bootstrap: str, topic: str, stamps: list[int], keys: int) -> Sent:
    """One LogEntry per timestamp, round-robin over `keys` keys; where Kafka put each, from its reports."""
    codec = default_codec()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    sent: Sent = []

    def report(key: str, seq: int, ts: int) -> Callable[[object, Message], None]:
        return lambda err, msg: sent.append((key, seq, ts, msg.partition(), msg.offset())) if err is None else None

    for i, ts in enumerate(stamps):
        key, seq = f"k{i % keys}", i // keys
        entry = {
            "timestamp": ts * 1000, "received_at": ts * 1000, "host": "h", "source": "test", "service": "svc",
            "level": "info", "message": f"m{i}", "attributes": {"seq": str(seq)},
        }  # fmt: skip
        producer.produce(topic, codec.encode(entry), key=key.encode(), headers=codec.headers, timestamp=ts,
                         on_delivery=report(key, seq, ts))  # fmt: skip
    assert producer.flush(30) == 0
    assert len(sent) == len(stamps)
    return sent


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def committed(bootstrap: str, group: str, topic: str) -> dict[tuple[str, int], int]:
    """The group's committed offsets, read as a non-joining consumer of the group (not the admin API:
    librdkafka 2.16's ListConsumerGroupOffsets can segfault on coordinator errors while polled)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return {(t.topic, t.partition): t.offset for t in c.committed([TopicPartition(topic, p) for p in parts], 10)
                if t.offset >= 0}  # fmt: skip
    except KafkaException:
        return {}  # the coordinator answered late (a loaded machine): the caller polls again
    finally:
        c.close()


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "logferry", *args], capture_output=True, text=True, timeout=timeout)


class Members:
    """Two Processor members of one group in threads, handling into a shared, ordered journal."""

    def __init__(self, bootstrap: str, topic: str, group: str, control: str) -> None:
        self.journal: list[tuple[str, int, int, int]] = []  # (key, seq, partition, offset)
        self.lock = threading.Lock()
        self.handled_once: set[tuple[int, int]] = set()
        self.gate = threading.Event()  # closed: a second handling of an entry waits (the replay is visible)
        self.gate.set()
        self.apps = [
            Processor(
                group, [topic], bootstrap_servers=bootstrap, commit_interval=0.2, control_topic=control, concurrency=8
            )
            for _ in range(2)
        ]
        for app in self.apps:
            app.handler(self.handle)
        self.threads = [threading.Thread(target=a.run, kwargs={"install_signals": False}) for a in self.apps]
        for t in self.threads:
            t.start()

    def handle(self, entry: dict, ctx) -> None:
        where = (ctx.partition, ctx.offset)
        with self.lock:
            again = where in self.handled_once
            self.handled_once.add(where)
        if again:
            assert self.gate.wait(30)
        with self.lock:
            self.journal.append((ctx.key.decode(), int(entry["attributes"]["seq"]), ctx.partition, ctx.offset))

    def count(self) -> int:
        with self.lock:
            return len(self.journal)

    def stop(self) -> None:
        self.gate.set()
        for app in self.apps:
            app.stop()
        for t in self.threads:
            t.join(30)


def replays(group: str) -> float:
    return REGISTRY.get_sample_value("logferry_processor_replays_total", {"group": group, "trigger": "control"}) or 0.0


def test_live_replay_seeks_every_member_and_keeps_key_order(kafka_bootstrap, kafka_settings, make_topic) -> None:
    topic = make_topic(partitions=4)
    control = make_topic(partitions=1, prefix="control")
    group = f"live-{uuid.uuid4().hex[:8]}"
    base = int(time.time() * 1000) - 60 * MINUTE_MS
    sent = produce_timed(kafka_bootstrap, topic, [base + i * 1000 for i in range(800)], keys=16)
    cut = sent[500][2]  # an entry's own time: included
    replayed = [s for s in sent if s[2] >= cut]
    targets = {p: min(o for _, _, _, pp, o in replayed if pp == p) for p in {s[3] for s in replayed}}
    ends = {p: max(o for _, _, _, pp, o in sent if pp == p) + 1 for p in {s[3] for s in sent}}
    admin = GroupOffsetsAdmin(kafka_settings)
    replays_before = replays(group)

    members = Members(kafka_bootstrap, topic, group, control)
    try:
        wait_for(lambda: members.count() == len(sent), 60, "the first pass")
        wait_for(
            lambda: committed(kafka_bootstrap, group, topic) == {(topic, p): e for p, e in ends.items()},
            30,
            "commits at the end",
        )
        wait_for(lambda: len(admin.describe(group)[1]) == 2 and all(m.assignment for m in admin.describe(group)[1]),
                 30, "two members sharing the partitions")  # fmt: skip
        members.gate.clear()  # replayed entries now wait, so the rewound offsets are observable

        iso = datetime.fromtimestamp(cut / 1000, UTC).isoformat(timespec="milliseconds")
        res = run_cli("replay", "--group", group, "--to-datetime", iso, "--control-topic", control,
                      "-b", kafka_bootstrap, "--json")  # fmt: skip
        assert res.returncode == 0, res.stderr + res.stdout
        report = json.loads(res.stdout)
        assert report["silent_members"] == []
        assert {r["member"] for r in report["partitions"]} == {m.member_id for m in admin.describe(group)[1]}
        assert {r["partition"]: (r["old"], r["new"]) for r in report["partitions"]} == {
            p: (ends[p], targets[p]) for p in ends
        }
        # Lag shows the replay: the group's committed offsets went back to the targets.
        wait_for(
            lambda: committed(kafka_bootstrap, group, topic) == {(topic, p): o for p, o in targets.items()},
            30,
            "rewound commits",
        )
        assert members.count() == len(sent)  # nothing of the replay ran before the gate opened
        members.gate.set()
        wait_for(lambda: members.count() == len(sent) + len(replayed), 60, "the replay")
        wait_for(
            lambda: committed(kafka_bootstrap, group, topic) == {(topic, p): e for p, e in ends.items()},
            30,
            "caught up again",
        )

        # Idempotent: the same command id again changes nothing.
        cmd_id = report["id"]
        dup = ReplayCommand(group, "datetime", cut, id=cmd_id)
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(control, key=group.encode(), value=dup.to_bytes())
        assert producer.flush(10) == 0
        _, control_end = admin.watermarks([(control, 0)])[(control, 0)]

        def read_past_duplicate() -> bool:
            return all(
                app.control.consumer.position([TopicPartition(control, 0)])[0].offset >= control_end
                for app in members.apps
            )

        wait_for(read_past_duplicate, 30, "members to read the duplicate command")
        assert all(app.control.applied == [cmd_id] for app in members.apps)
        assert all(t.is_alive() for t in members.threads)  # nothing crashed
    finally:
        members.stop()
    assert not any(t.is_alive() for t in members.threads)
    assert replays(group) - replays_before == len(ends)
    assert members.count() == len(sent) + len(replayed)

    # Each entry at or after the cut handled exactly twice, the rest once; per key in order from the new position.
    counts = defaultdict(int)
    for _, _, p, o in members.journal:
        counts[(p, o)] += 1
    assert counts == {(p, o): 2 if ts >= cut else 1 for _, _, ts, p, o in sent}
    by_key: dict[str, list[int]] = defaultdict(list)
    for key, seq, _, _ in members.journal:
        by_key[key].append(seq)
    for key, seqs in by_key.items():
        first = sorted(s for k, s, *_ in sent if k == key)
        again = sorted(s for k, s, ts, *_ in sent if k == key and ts >= cut)
        assert seqs == first + again, key


def test_replay_of_an_unknown_group_says_so(kafka_bootstrap) -> None:
    res = run_cli("replay", "--group", f"nobody-{uuid.uuid4().hex[:8]}", "--by-duration", "PT30M",
                  "-b", kafka_bootstrap)  # fmt: skip
    assert res.returncode == 2
    err = " ".join(res.stderr.split())
    assert "is unknown" in err and "no committed offsets" in err


def test_replay_of_a_stopped_group_points_to_offsets_reset(kafka_bootstrap, kafka_settings, make_topic) -> None:
    topic = make_topic(partitions=1)
    group = f"stopped-{uuid.uuid4().hex[:8]}"
    admin = kafka_settings.admin()
    from confluent_kafka import ConsumerGroupTopicPartitions

    admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, [TopicPartition(topic, 0, 0)])])[
        group
    ].result(30)
    res = run_cli("replay", "--group", group, "--to-earliest", "-b", kafka_bootstrap)
    assert res.returncode == 2
    assert "has no running members" in " ".join(res.stderr.split())
    assert "logferry offsets reset" in " ".join(res.stderr.split())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--by-duration", "30 minutes"], "--by-duration '30 minutes': not an ISO-8601 duration"),
        (["--by-duration", "PT0S"], "must be longer than zero"),
        (["--to-datetime", "yesterday"], "--to-datetime 'yesterday': not an ISO-8601 date-time"),
        (["--to-earliest", "--by-duration", "PT1H"], "give exactly one of"),
        ([], "give exactly one of"),
    ],
)
def test_bad_replay_targets_exit_2_before_touching_kafka(flags, message) -> None:
    # An unreachable broker: the flags must be refused before any connection is tried.
    res = run_cli("replay", "--group", "g", *flags, "-b", "127.0.0.1:1", timeout=30)
    assert res.returncode == 2
    assert message in " ".join(res.stderr.split())
