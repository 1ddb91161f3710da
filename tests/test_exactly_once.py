"""Exactly-once consume-transform-produce against the real broker.

A `logferry process --exactly-once` subprocess (tests/eos_member.py returns one result per
input) is SIGKILLed while one of its transactions is open, again and again, and restarted
each time with the same member id. A read_committed reader of the output must then see each
input's result exactly once, in key order.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, IsolationLevel, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from processor_support import LoggedProcess, Running
from prometheus_client import REGISTRY

from logferry.errors import ConfigError
from logferry.processors import Processor
from logferry.processors.control import ReplayCommand, publish_and_wait
from logferry.processors.exactly_once import ExactlyOnceRuntime, Output
from logferry.processors.offsets import GroupOffsetsAdmin
from logferry.processors.runtime import Hooks
from logferry.processors.tracking import PartitionState
from logferry.schemas import default_codec

pytestmark = pytest.mark.kafka
TESTS = Path(__file__).parent
KILLS = 4


def produce(bootstrap: str, topic: str, n: int, keys: int) -> list[tuple[str, int]]:
    codec = default_codec()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    sent = []
    for i in range(n):
        key, seq = f"k{i % keys}", i // keys
        entry = {
            "timestamp": 0, "received_at": 0, "host": "h", "source": "test", "service": "svc", "level": "info",
            "message": f"m{i}", "attributes": {"seq": str(seq)},
        }  # fmt: skip
        producer.produce(topic, codec.encode(entry), key=key.encode(), headers=codec.headers)
        sent.append((key, seq))
    assert producer.flush(30) == 0
    return sent


def read_all(bootstrap: str, topic: str, isolation: str, timeout: float = 30) -> list[tuple[int, str]]:
    """Every record value of `topic` as (partition, value), in partition order, up to the current end."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    parts = list(admin.list_topics(topic, timeout=10).topics[topic].partitions)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                  "isolation.level": isolation, "enable.auto.commit": False})  # fmt: skip
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    out: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout
    try:  # a position is unknown (negative) until the first record: it is at 0 then
        while any(
            max(tp.offset, 0) < ends[tp.partition] for tp in c.position([TopicPartition(topic, p) for p in parts])
        ):
            assert time.monotonic() < deadline, f"reading {topic} ({isolation}) did not reach {ends}"
            for m in c.consume(500, 0.2):
                if m.error() is None:
                    out.append((m.partition(), m.value().decode()))
    finally:
        c.close()
    return out


def open_transaction(admin: AdminClient, topic: str, parts: int) -> bool:
    """True while some partition's last stable offset is below its high watermark (a transaction is open)."""

    def latest(level: IsolationLevel) -> dict[int, int]:
        futs = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest() for p in range(parts)},
                                  isolation_level=level, request_timeout=10)  # fmt: skip
        return {tp.partition: f.result().offset for tp, f in futs.items()}

    return latest(IsolationLevel.READ_COMMITTED) != latest(IsolationLevel.READ_UNCOMMITTED)


def committed_total(bootstrap: str, group: str, topic: str, parts: int) -> int:
    """Sum of the group's committed offsets, read as a (non-joining) consumer of the group.

    Not through the admin API: librdkafka 2.16's ListConsumerGroupOffsets segfaults on some
    coordinator errors, and polling a group that commits in transactions hits them.
    """
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                return sum(max(0, tp.offset) for tp in c.committed([TopicPartition(topic, p) for p in range(parts)], 5))
            except KafkaException:  # a loaded machine: the coordinator answers late while transactions settle
                if time.monotonic() > deadline:
                    raise
    finally:
        c.close()


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def freeze_inside_transaction(proc: subprocess.Popen[str], admin: AdminClient, topic: str, parts: int) -> bool:
    """SIGSTOP the member while one of its transactions is open; True once frozen inside one.

    Stopped, it cannot finish the transaction, so an open transaction that stays open for a
    few hundred ms was open when it froze; one that closes was already committing: resume, retry.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if not open_transaction(admin, topic, parts):
            continue
        proc.send_signal(signal.SIGSTOP)
        settle = time.monotonic() + 0.3
        while time.monotonic() < settle and open_transaction(admin, topic, parts):
            pass
        if open_transaction(admin, topic, parts):
            return True
        proc.send_signal(signal.SIGCONT)
    return False


class Member(LoggedProcess):
    def __init__(self, bootstrap: str, src: str, out: str, group: str, cfg: Path, member_id: str = "m1") -> None:
        env = dict(os.environ, PYTHONPATH=str(TESTS), LOGFERRY_TEST_MAX_DELAY="0.004")
        cmd = [sys.executable, "-m", "logferry", "process", "--config", str(cfg), "--handler", "eos_member:handle",
               "--topic", src, "--group", group, "--exactly-once", "--output-topic", out, "--member-id", member_id,
               "--bootstrap-servers", bootstrap]  # fmt: skip
        super().__init__(cmd, env)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.wait(10) == -signal.SIGKILL, self.log()[-3000:]

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.wait(30) == 0, self.log()[-3000:]


def assert_each_result_once(bootstrap: str, out: str, sent: list[tuple[str, int]]) -> list[tuple[int, str]]:
    """read_committed: every input's result exactly once, per key in input order."""
    committed = read_all(bootstrap, out, "read_committed")
    results = Counter(" ".join(v.split()[2:]) for _, v in committed)
    expected = Counter(f"{k} {s}" for k, s in sent)
    assert results == expected, (
        f"duplicates: {[r for r, n in results.items() if n > 1][:5]}, missing: {len(expected - results)}"
    )
    by_key: dict[str, list[int]] = defaultdict(list)
    for _, v in committed:  # one key lives in one output partition
        _, _, key, seq = v.split()
        by_key[key].append(int(seq))
    assert all(seqs == sorted(seqs) for seqs in by_key.values())
    return committed


def test_sigkill_mid_transaction_never_duplicates_for_read_committed_readers(
    kafka_bootstrap, kafka_settings, make_topic, group_id, tmp_path
) -> None:
    src, out = make_topic(partitions=3), make_topic(partitions=3, prefix="out")
    sent = produce(kafka_bootstrap, src, 4000, keys=40)
    cfg = tmp_path / "eos.toml"
    # Static membership: a restarted member takes its partitions back at once instead of after the
    # session timeout. The rate limit paces the work so every kill lands mid-stream.
    cfg.write_text(
        "[processor]\ngroup='x'\ntopics=['x']\ncommit_interval=0.05\nrate_limit=400\nconcurrency=8\n"
        "[metrics]\nenabled=false\n[kafka.extra]\n'group.instance.id'='eos-m1'\n"
    )
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    mid_transaction, done = 0, 0
    for _ in range(KILLS):
        m = Member(kafka_bootstrap, src, out, group_id, cfg)

        # Each incarnation must make progress (its transactions commit) before it is killed.
        def progressed(d: int = done, m: Member = m) -> bool:
            return committed_total(kafka_bootstrap, group_id, src, 3) >= d + 200 or m.proc.poll() is not None

        wait_for(progressed, 60, "progress")
        done = committed_total(kafka_bootstrap, group_id, src, 3)
        assert done < len(sent), "the input ran out before the kills: raise the input size"
        mid_transaction += freeze_inside_transaction(m.proc, admin, out, 3)
        m.kill()
    assert mid_transaction == KILLS, f"only {mid_transaction} of {KILLS} kills hit an open transaction"

    final = Member(kafka_bootstrap, src, out, group_id, cfg)
    try:
        wait_for(lambda: committed_total(kafka_bootstrap, group_id, src, 3) == len(sent), 90, "every input committed")
    finally:
        final.terminate()
    committed = assert_each_result_once(kafka_bootstrap, out, sent)
    # The aborted transactions really held results: an uncommitted reader sees extra copies.
    assert len(read_all(kafka_bootstrap, out, "read_uncommitted")) > len(committed)


def test_rebalances_around_a_killed_member_never_duplicate(
    kafka_bootstrap, kafka_settings, make_topic, group_id, tmp_path
) -> None:
    """B dies inside a transaction; A takes B's partitions over (rebalance); B comes back (rebalance)."""
    src, out = make_topic(partitions=4), make_topic(partitions=4, prefix="out")
    sent = produce(kafka_bootstrap, src, 3000, keys=40)
    cfg = tmp_path / "eos.toml"
    cfg.write_text(
        "[processor]\ngroup='x'\ntopics=['x']\ncommit_interval=0.05\nrate_limit=150\nconcurrency=8\n"
        "session_timeout_ms=6000\n[metrics]\nenabled=false\n"
    )
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    offsets = GroupOffsetsAdmin(kafka_settings)

    def members_owning_all(n: int) -> bool:
        _, members, _ = offsets.describe(group_id)
        return len(members) == n and sum(len(m.assignment) for m in members) == 4 and all(m.assignment for m in members)

    a = Member(kafka_bootstrap, src, out, group_id, cfg, member_id="a")
    b = Member(kafka_bootstrap, src, out, group_id, cfg, member_id="b")
    try:
        wait_for(lambda: members_owning_all(2), 60, "two members")
        wait_for(lambda: committed_total(kafka_bootstrap, group_id, src, 4) >= 300, 60, "progress")
        assert freeze_inside_transaction(b.proc, admin, out, 4)
        b.kill()
        wait_for(lambda: members_owning_all(1), 60, "A to take B's partitions over")
        b = Member(kafka_bootstrap, src, out, group_id, cfg, member_id="b")  # aborts its predecessor's transaction
        wait_for(lambda: members_owning_all(2), 60, "B back in the group")
        assert committed_total(kafka_bootstrap, group_id, src, 4) < len(sent), "the input ran out: raise its size"
        wait_for(lambda: committed_total(kafka_bootstrap, group_id, src, 4) == len(sent), 120, "every input committed")
    finally:
        for m in (a, b):
            if m.proc.poll() is None:
                m.terminate()
    assert_each_result_once(kafka_bootstrap, out, sent)


def test_exactly_once_in_process_with_outputs_of_every_kind(kafka_bootstrap, make_topic, group_id) -> None:
    src, out = make_topic(partitions=2), make_topic(partitions=2, prefix="out")
    sent = produce(kafka_bootstrap, src, 200, keys=5)
    codec = default_codec()
    app = Processor(group_id, [src], bootstrap_servers=kafka_bootstrap, exactly_once=True, output_topic=out,
                    member_id=uuid.uuid4().hex[:8], commit_interval=0.1, live_replay=False)  # fmt: skip

    @app.handler
    async def handle(entry, ctx):
        seq = int(entry["attributes"]["seq"])
        if seq % 2:
            return None  # nothing for odd entries
        entry["message"] = f"copy {ctx.key.decode()} {seq}"
        return [entry, Output(f"note {seq}", key="notes")]

    t = threading.Thread(target=app.run, kwargs={"install_signals": False})
    t.start()
    try:
        even = sum(1 for _, s in sent if s % 2 == 0)
        wait_for(lambda: len(read_all(kafka_bootstrap, out, "read_committed")) >= 2 * even, 60, "the results")
    finally:
        app.stop()
        t.join(30)
    got = [v for _, v in read_all(kafka_bootstrap, out, "read_committed")]
    notes = Counter(v for v in got if v.startswith("note "))
    assert notes == Counter(f"note {s}" for _, s in sent if s % 2 == 0)
    c = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"r-{uuid.uuid4().hex[:6]}",
                  "isolation.level": "read_committed", "auto.offset.reset": "earliest"})  # fmt: skip
    c.subscribe([out])
    copies: list[str] = []
    deadline = time.monotonic() + 30
    while len(copies) < even and time.monotonic() < deadline:
        for m in c.consume(500, 0.2):
            if m.error() is None and m.key() != b"notes":
                copies.append(codec.decode(m.value(), m.headers())["message"])
    c.close()
    assert sorted(copies) == sorted(f"copy {k} {s}" for k, s in sent if s % 2 == 0)


def test_exactly_once_needs_an_output_topic() -> None:
    with pytest.raises(ConfigError, match="exactly_once needs an output_topic"):
        Processor("g", ["t"], exactly_once=True)


def test_live_replay_of_an_exactly_once_member_reproduces_each_result_once_more(
    kafka_bootstrap, kafka_settings, make_topic, group_id
) -> None:
    src, out, control = make_topic(partitions=2), make_topic(partitions=2, prefix="out"), make_topic(prefix="ctl")
    sent = produce(kafka_bootstrap, src, 300, keys=6)
    app = Processor(group_id, [src], bootstrap_servers=kafka_bootstrap, exactly_once=True, output_topic=out,
                    member_id=uuid.uuid4().hex[:8], commit_interval=0.1, control_topic=control)  # fmt: skip

    @app.handler
    def handle(entry, ctx):
        return f"{ctx.partition} {ctx.offset} {ctx.key.decode()} {entry['attributes']['seq']}"

    t = threading.Thread(target=app.run, kwargs={"install_signals": False})
    t.start()
    try:
        wait_for(lambda: committed_total(kafka_bootstrap, group_id, src, 2) == len(sent), 60, "the first pass")
        member = app.runtime.consumer.memberid()
        acks = publish_and_wait(kafka_settings, ReplayCommand(group_id, "earliest"), {member}, 30, control)
        assert sorted((s.partition, s.new) for s in acks[member].seeks) == [(0, 0), (1, 0)]
        wait_for(lambda: len(read_all(kafka_bootstrap, out, "read_committed")) >= 2 * len(sent), 60, "the replay")
    finally:
        app.stop()
        t.join(30)
    results = Counter(" ".join(v.split()[2:]) for _, v in read_all(kafka_bootstrap, out, "read_committed"))
    assert results == Counter(f"{k} {s}" for k, s in sent * 2)


def test_a_timed_out_commit_is_committed_again_never_aborted(kafka_bootstrap, make_topic, group_id, monkeypatch):
    """librdkafka: a commit_transaction that timed out may still commit; it must be called again, not aborted."""
    # No time at all: a commit needs at least one round trip to the coordinator, so every first
    # call times out (1 ms let a fast local commit through now and then) and is resumed.
    monkeypatch.setattr(ExactlyOnceRuntime, "commit_timeout", 0.0)
    src, out = make_topic(partitions=2), make_topic(partitions=2, prefix="out")
    sent = produce(kafka_bootstrap, src, 300, keys=6)
    app = Processor(group_id, [src], bootstrap_servers=kafka_bootstrap, exactly_once=True, output_topic=out,
                    member_id=uuid.uuid4().hex[:8], commit_interval=0.05, live_replay=False)  # fmt: skip

    @app.handler
    def handle(entry, ctx):
        return f"{ctx.partition} {ctx.offset} {ctx.key.decode()} {entry['attributes']['seq']}"

    with Running(app):
        wait_for(lambda: committed_total(kafka_bootstrap, group_id, src, 2) == len(sent), 60, "every input committed")
    retries = REGISTRY.get_sample_value("logferry_processor_transaction_commit_retries_total", {"group": group_id})
    assert retries and retries > 0, "no commit timed out: the test did not exercise the in-doubt path"
    committed = assert_each_result_once(kafka_bootstrap, out, sent)
    # Nothing was aborted: a read_uncommitted reader sees no extra (aborted) copies.
    assert len(read_all(kafka_bootstrap, out, "read_uncommitted")) == len(committed) == len(sent)


def test_a_member_whose_transactions_cannot_commit_fetches_nothing_new_until_one_does(
    kafka_bootstrap, make_topic, group_id, monkeypatch
):
    """Handled records' results wait in memory for a transaction. With the coordinator out of reach
    the member pauses instead of reading the whole backlog into memory; once commits work again
    it goes on, and each result is committed once."""
    outage = threading.Event()
    outage.set()
    settle = ExactlyOnceRuntime._settle
    # A commit in doubt for as long as the outage lasts (as if commit_transaction kept timing out).
    monkeypatch.setattr(
        ExactlyOnceRuntime, "_settle", lambda self, wait: False if outage.is_set() else settle(self, wait)
    )
    src, out = make_topic(partitions=2), make_topic(partitions=2, prefix="out")
    sent = produce(kafka_bootstrap, src, 6000, keys=8)
    batch = 20
    app = Processor(group_id, [src], bootstrap_servers=kafka_bootstrap, exactly_once=True, output_topic=out,
                    member_id=uuid.uuid4().hex[:8], live_replay=False, commit_interval=0.05, batch_size=batch,
                    inline=True)  # fmt: skip
    handled = [0]

    @app.handler
    def handle(entry, ctx):
        handled[0] += 1
        return f"{ctx.partition} {ctx.offset} {ctx.key.decode()} {entry['attributes']['seq']}"

    with Running(app):
        wait_for(lambda: "transaction" in app.runtime.pauses.global_reasons, 30, "the member to pause")
        at_pause = handled[0]
        threading.Event().wait(1.0)  # a measured window in which an unpaused member reads on
        during = handled[0]
        outage.clear()
        wait_for(lambda: committed_total(kafka_bootstrap, group_id, src, 2) == len(sent), 60, "every input committed")
    # After the pause only what the loop had already fetched (a batch or two) was handled.
    assert during <= at_pause + 2 * batch < len(sent), (at_pause, during)
    assert_each_result_once(kafka_bootstrap, out, sent)


def test_repeated_seeks_retain_no_old_partition_state(kafka_bootstrap, make_topic, group_id) -> None:
    """Every seek retires a partition state; late results of its running work are dropped, and the
    states themselves must not pile up in the exactly-once bookkeeping (memory bounded by assignment)."""
    src, out = make_topic(partitions=2), make_topic(partitions=2, prefix="out")
    sent = produce(kafka_bootstrap, src, 40, keys=4)
    handled = 0
    seeks = 0
    total_seeks = 60

    def replay_again(runtime) -> None:
        nonlocal seeks
        if seeks < total_seeks and handled >= len(sent):
            for t, p in runtime.assignment():
                runtime.seek(t, p, 0)
            seeks += 1

    app = Processor(group_id, [src], bootstrap_servers=kafka_bootstrap, exactly_once=True, output_topic=out,
                    member_id=uuid.uuid4().hex[:8], commit_interval=0.05, live_replay=False, concurrency=2,
                    hooks=Hooks(on_poll=replay_again))  # fmt: skip

    @app.handler
    def handle(entry, ctx):
        nonlocal handled
        handled += 1
        return f"{ctx.partition} {ctx.offset} {ctx.key.decode()} {entry['attributes']['seq']}"

    with Running(app):
        wait_for(lambda: seeks == total_seeks, 60, "the seeks")
        wait_for(lambda: committed_total(kafka_bootstrap, group_id, src, 2) == len(sent), 60, "the last replay")
        gc.collect()
        alive = sum(1 for o in gc.get_objects() if isinstance(o, PartitionState))
    # 120 states were retired; only the current ones (and a few a worker or the priority
    # bookkeeping still points at) may be alive.
    assert alive <= 8, f"{alive} partition states alive after {2 * total_seeks} were retired"
