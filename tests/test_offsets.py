"""`logferry offsets` against the real broker, cross-checked with Kafka's own ConsumerGroupCommand.

Every expected offset is computed from the records the test produced (explicit timestamps), and
both tools must agree with it: logferry's writes read the same through Kafka's tool and back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from logferry.broker import DEFAULT_KAFKA_VERSION
from logferry.broker.local import java_command
from logferry.broker.maven import resolve
from logferry.cli import main
from logferry.kafka import KafkaSettings
from logferry.processors.offsets import GroupOffsetsAdmin, ResetTarget

pytestmark = pytest.mark.kafka

TP = tuple[str, int]
MINUTE_MS = 60_000


# ---- Kafka's own tool ---------------------------------------------------------------------
class KafkaGroupsTool:
    """Runs Kafka's ConsumerGroupCommand from the broker's jars and parses its tables."""

    MAIN = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.classpath = f"{resolve(DEFAULT_KAFKA_VERSION)}/*"
        self.java = java_command()

    def run(self, *args: str) -> str:
        cmd = [self.java, "-cp", self.classpath, self.MAIN, "--bootstrap-server", self.bootstrap, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        # The tool reports many failures on stdout with exit 0, so look for its "Error:" lines too.
        assert proc.returncode == 0 and "Error:" not in proc.stdout, proc.stdout + proc.stderr
        return proc.stdout

    @staticmethod
    def table(text: str, column: str) -> dict[TP, int | None]:
        """{(topic, partition): value of `column`} from a GROUP/TOPIC/PARTITION/... table; '-' is None."""
        rows: dict[TP, int | None] = {}
        header: list[str] | None = None
        for line in text.splitlines():
            cells = line.split()
            if cells[:3] == ["GROUP", "TOPIC", "PARTITION"]:
                header = cells
            elif header and len(cells) >= len(header) - 3 and cells[2].isdigit():
                value = cells[header.index(column)]
                rows[(cells[1], int(cells[2]))] = None if value == "-" else int(value)
        assert header is not None, f"no table in:\n{text}"
        return rows

    def describe(self, group: str) -> dict[TP, int | None]:
        return self.table(self.run("--describe", "--group", group), "CURRENT-OFFSET")

    def reset(self, group: str, topic: str, *option: str) -> dict[TP, int | None]:
        out = self.run("--reset-offsets", "--group", group, "--topic", topic, *option, "--execute")
        return self.table(out, "NEW-OFFSET")


# ---- data with known timestamps -----------------------------------------------------------
@dataclass
class Dataset:
    topic: str
    stamps: dict[int, list[int]]  # partition → record timestamps (ms), index = offset

    def first_at_or_after(self, partition: int, ts_ms: int) -> int:
        """The offset Kafka's ListOffsets(timestamp) gives: first record at or after; log end when none."""
        return bisect_left(self.stamps[partition], ts_ms)

    def tps(self) -> list[TP]:
        return [(self.topic, p) for p in sorted(self.stamps)]


def produce(bootstrap: str, topic: str, stamps: dict[int, list[int]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for partition, times in stamps.items():
        for i, ts in enumerate(times):
            producer.produce(topic, f"{partition}-{i}".encode(), key=b"k", partition=partition, timestamp=ts)
    assert producer.flush(30) == 0


@pytest.fixture(scope="module")
def dataset(kafka_bootstrap: str) -> Iterator[Dataset]:
    """3 partitions x 12 records, spaced 10/15/20 minutes apart, ending ~17 min ago (inside retention).

    Timestamps sit ≥2 minutes away from `now - 1h`, so --by-duration PT1H resolves the same for
    both tools however many seconds apart they run.
    """
    admin = KafkaSettings(bootstrap_servers=kafka_bootstrap).admin()
    topic = f"offsets-{uuid.uuid4().hex[:10]}"
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)
    base = int(time.time() * 1000) - 240 * MINUTE_MS
    stamps = {p: [base + (i * (10 + 5 * p) + 3) * MINUTE_MS for i in range(12)] for p in range(3)}
    produce(kafka_bootstrap, topic, stamps)
    yield Dataset(topic, stamps)
    admin.delete_topics([topic])[topic].result(30)


@pytest.fixture(scope="module")
def tool(kafka_bootstrap: str) -> KafkaGroupsTool:
    return KafkaGroupsTool(kafka_bootstrap)


@pytest.fixture
def offsets(kafka_settings: KafkaSettings) -> GroupOffsetsAdmin:
    return GroupOffsetsAdmin(kafka_settings)


def new_group() -> str:
    return f"offsets-group-{uuid.uuid4().hex[:10]}"


def commit(admin: GroupOffsetsAdmin, group: str, offsets: dict[TP, int]) -> None:
    target = ResetTarget("from_file", offsets)
    admin.execute(admin.plan(group, target))


Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(kafka_bootstrap: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """`logferry ARGS` in-process through main(), as a user runs it: (exit code, stdout, stderr)."""
    monkeypatch.setenv("LOGFERRY_BOOTSTRAP_SERVERS", kafka_bootstrap)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["logferry", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capsys.readouterr()
        code = exit_info.value.code
        return (code if isinstance(code, int) else 1), captured.out, captured.err

    return run


def flat(text: str) -> str:
    """Rich wraps at the console width; compare messages with whitespace collapsed."""
    return " ".join(text.split())


def fmt_time(ms: int, tz: timezone) -> str:
    """The format both tools accept: Kafka's needs milliseconds and an explicit offset or Z."""
    return datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="milliseconds")


PLUS2 = timezone(timedelta(hours=2))


def expected_for(option: str, value: str, d: Dataset, before: dict[TP, int]) -> dict[TP, int]:
    ends = {(d.topic, p): len(s) for p, s in d.stamps.items()}
    if option == "--to-datetime":
        ts = int(datetime.fromisoformat(value).timestamp() * 1000)
        return {(d.topic, p): d.first_at_or_after(p, ts) for p in d.stamps}
    if option == "--by-duration":
        assert value == "PT1H"
        ts = int(time.time() * 1000) - 60 * MINUTE_MS
        return {(d.topic, p): d.first_at_or_after(p, ts) for p in d.stamps}
    if option == "--to-earliest":
        return dict.fromkeys(ends, 0)
    if option == "--to-latest":
        return ends
    if option == "--to-offset":
        return {tp: min(max(int(value), 0), end) for tp, end in ends.items()}
    if option == "--shift-by":
        return {tp: min(max(before[tp] + int(value), 0), ends[tp]) for tp in ends}
    raise AssertionError(option)


RESET_CASES = [
    # (option, value builder from the dataset); the value is computed, never a literal offset.
    ("--to-datetime", lambda d: fmt_time(d.stamps[1][5], PLUS2)),  # exactly a record's time, non-UTC zone
    ("--to-datetime", lambda d: fmt_time(d.stamps[2][3] + 1, UTC)),  # just after a record: the next one
    ("--to-datetime", lambda d: fmt_time(d.stamps[0][-1] + MINUTE_MS, UTC)),  # after everything: log end
    ("--by-duration", lambda d: "PT1H"),
    ("--to-earliest", lambda d: None),
    ("--to-latest", lambda d: None),
    ("--to-offset", lambda d: "4"),
    ("--to-offset", lambda d: str(len(d.stamps[0]) + 50)),  # beyond the log end: clamped
    ("--shift-by", lambda d: "-2"),
    ("--shift-by", lambda d: "+100"),  # clamped to the log end
]


@pytest.mark.parametrize(
    ("option", "make_value"), RESET_CASES, ids=[f"{o}-{i}" for i, (o, _) in enumerate(RESET_CASES)]
)
def test_each_reset_option_agrees_with_kafkas_tool(option, make_value, dataset, tool, offsets, cli) -> None:
    value = make_value(dataset)
    ours, theirs = new_group(), new_group()
    before = {tp: 6 + tp[1] for tp in dataset.tps()}  # a committed position for --shift-by to move
    commit(offsets, ours, before)
    commit(offsets, theirs, before)
    expected = expected_for(option, value, dataset, before)
    args = [option] if value is None else [option, value]

    code, out, err = cli("offsets", "reset", "-g", ours, "-t", dataset.topic, *args, "--execute", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert {(r["topic"], r["partition"]): r["new_offset"] for r in plan["partitions"]} == expected
    assert {(r["topic"], r["partition"]): r["old_offset"] for r in plan["partitions"]} == before
    notes = [r["note"] for r in plan["partitions"]]
    if option in ("--to-offset", "--shift-by") and any(v == len(dataset.stamps[p]) for (_, p), v in expected.items()):
        assert all("clamped" in n for n in notes), notes  # asked beyond the log end, and said so
    elif option not in ("--to-datetime", "--by-duration"):
        assert notes == [None] * len(notes)
    # logferry's write, read by Kafka's tool:
    assert tool.describe(ours) == expected
    # Kafka's write (same option), read by logferry, with the committed entry's time and the lag:
    assert tool.reset(theirs, dataset.topic, *args) == expected
    shown = offsets.show(theirs)
    assert {(p.topic, p.partition): p.committed for p in shown.partitions} == expected
    for p in shown.partitions:
        stamps = dataset.stamps[p.partition]
        assert p.log_end == len(stamps)
        assert p.lag == len(stamps) - expected[(p.topic, p.partition)]
        at = expected[(p.topic, p.partition)]
        assert p.committed_timestamp_ms == (stamps[at] if at < len(stamps) else None)


def test_from_file_and_export_round_trip_with_kafkas_csv(dataset, tool, offsets, cli, tmp_path) -> None:
    group, theirs = new_group(), new_group()
    start = {(dataset.topic, p): 2 + 3 * p for p in dataset.stamps}
    commit(offsets, group, start)
    undo = tmp_path / "undo.csv"
    code, _, err = cli(
        "offsets", "reset", "-g", group, "-t", dataset.topic,
        "--to-latest", "--execute", "--export", str(undo),
    )  # fmt: skip
    assert code == 0, err
    # Kafka's reset-plan CSV: no header, topic,partition,offset.
    assert undo.read_text() == "".join(f"{t},{p},{o}\n" for (t, p), o in sorted(start.items()))
    assert offsets.committed(group) == {tp: len(dataset.stamps[tp[1]]) for tp in start}

    code, _, err = cli("offsets", "reset", "-g", group, "--from-file", str(undo), "--execute")
    assert code == 0, err
    assert offsets.committed(group) == start
    # Kafka's tool reads our file the same way.
    assert tool.reset(theirs, dataset.topic, "--from-file", str(undo)) == start
    # And we read the file Kafka's --export writes.
    kafka_csv = tmp_path / "kafka.csv"
    kafka_csv.write_text(
        tool.run("--reset-offsets", "--group", theirs, "--topic", dataset.topic, "--to-current", "--export")
    )
    other = new_group()
    code, _, err = cli("offsets", "reset", "-g", other, "--from-file", str(kafka_csv), "--execute")
    assert code == 0, err
    assert offsets.committed(other) == start


def test_dry_run_changes_nothing(dataset, offsets, cli) -> None:
    group = new_group()
    before = {tp: 5 for tp in dataset.tps()}
    commit(offsets, group, before)
    reset = ["offsets", "reset", "-g", group, "-t", dataset.topic, "--to-earliest"]
    code, out, err = cli(*reset)
    assert code == 0, err
    assert "dry run, nothing changed" in flat(out) and "add --execute to apply" in flat(out)
    code, out, err = cli(*reset, "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["executed"] is False
    assert [(r["old_offset"], r["new_offset"]) for r in plan["partitions"]] == [(5, 0)] * len(before)
    assert offsets.committed(group) == before


def test_active_group_is_refused_and_shown_with_its_member(dataset, offsets, kafka_settings, cli):
    group = new_group()
    consumer = Consumer(kafka_settings.client_config(**{"group.id": group, "client.id": "live-member"}))
    try:
        consumer.subscribe([dataset.topic])
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(0.2)
        assert consumer.assignment(), "the consumer never got partitions"
        consumer.commit(offsets=[TopicPartition(dataset.topic, 0, 3)], asynchronous=False)

        code, _, err = cli("offsets", "reset", "-g", group, "-t", dataset.topic, "--to-earliest", "--execute")
        assert code == 2
        assert f"group {group} is active (1 member(s)" in flat(err)
        assert offsets.committed(group) == {(dataset.topic, 0): 3}

        code, out, _ = cli("offsets", "show", "-g", group, "--json")
        shown = json.loads(out)
        assert shown["state"] == "STABLE"
        assert [m["client_id"] for m in shown["members"]] == ["live-member"]
        assert {p["member"] for p in shown["partitions"]} == {"live-member"}
        row0 = next(p for p in shown["partitions"] if p["partition"] == 0)
        assert (row0["committed_offset"], row0["lag"]) == (3, len(dataset.stamps[0]) - 3)
        assert row0["committed_timestamp_ms"] == dataset.stamps[0][3]
    finally:
        consumer.close()


def test_retention_moved_log_start_clamps_and_says_so(make_topic, kafka_settings, tool, offsets, cli):
    topic = make_topic(partitions=1)
    base = int(time.time() * 1000) - 30 * MINUTE_MS
    stamps = [base + i * MINUTE_MS for i in range(6)]
    produce(kafka_settings.bootstrap_servers, topic, {0: stamps})
    deleted_before = 3
    admin = kafka_settings.admin()
    admin.delete_records([TopicPartition(topic, 0, deleted_before)])[TopicPartition(topic, 0, deleted_before)].result(
        30
    )

    group, theirs = new_group(), new_group()
    code, out, err = cli(
        "offsets", "reset", "-g", group, "-t", topic, "--to-datetime",
        fmt_time(stamps[0] - MINUTE_MS, UTC), "--json",
    )  # fmt: skip
    assert code == 0, err
    [row] = json.loads(out)["partitions"]
    assert row["new_offset"] == deleted_before
    assert "before the earliest retained entry" in row["note"]

    code, out, err = cli("offsets", "reset", "-g", group, "-t", topic, "--to-offset", "1", "--execute")
    assert code == 0, err
    assert f"asked 1, below the log start {deleted_before}: clamped" in flat(out)
    assert tool.describe(group) == {(topic, 0): deleted_before}
    assert tool.reset(theirs, topic, "--to-offset", "1") == {(topic, 0): deleted_before}


BAD_INPUT = [
    # (args after `offsets`, words the one-line error must contain); {t} = an existing topic, {g} = a new group
    (["show", "-g", "{g}"], "has no committed offsets"),
    (["show", "-g", "{g}", "-t", "{t}"], "has no committed offsets"),
    (["reset", "-g", "{g}", "--all-topics", "--to-earliest"], "has no committed offsets"),
    (["reset", "-g", "{g}", "-t", "no-such-topic-{g}", "--to-earliest"], "do not exist"),
    (["show", "-g", "{g}", "-t", "no-such-topic-{g}"], "do not exist"),
    (["reset", "-g", "{g}", "-t", "{t}:1,7", "--to-earliest"], "no partition 7"),
    (["reset", "-g", "{g}", "-t", "{t}:x", "--to-earliest"], "partitions must be integers"),
    (["reset", "-g", "{g}", "-t", "{t}", "--by-duration", "1H"], "not an ISO-8601 duration"),
    (["reset", "-g", "{g}", "-t", "{t}", "--by-duration", "-PT1H"], "must be longer than zero"),
    (["reset", "-g", "{g}", "-t", "{t}", "--to-datetime", "yesterday"], "not an ISO-8601 date-time"),
    (["reset", "-g", "{g}", "-t", "{t}", "--to-earliest", "--to-offset", "3"], "exactly one of"),
    (["reset", "-g", "{g}", "-t", "{t}"], "exactly one of"),
    (["reset", "-g", "{g}", "-t", "{t}", "--shift-by", "-1"], "no committed offset"),
    (["reset", "-g", "{g}", "--to-earliest"], "--topic"),
    (["reset", "-g", "{g}", "--from-file", "/nonexistent/offsets.csv"], "cannot read"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=[" ".join(a[:1] + a[3:]) for a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_line_and_exit_2(args, message, dataset, cli) -> None:
    group = new_group()
    argv = [a.format(t=dataset.topic, g=group) for a in args]
    code, _, err = cli("offsets", *argv)
    assert code == 2
    assert flat(err).startswith("error:") and message in flat(err), err
    assert "Traceback" not in err


def test_malformed_csv_names_the_line(dataset, cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{dataset.topic},0,5\n{dataset.topic},zero,5\n")
    code, _, err = cli("offsets", "reset", "-g", new_group(), "--from-file", str(bad))
    assert code == 2
    assert "line 2: partition and offset must be integers" in flat(err)
