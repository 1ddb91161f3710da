"""Consumer-group offsets: show them, plan and apply resets, export and re-import them.

Built on Kafka's admin API (the same requests Kafka's own `kafka-consumer-groups` sends), so
offsets written here read the same through that tool and the other way round; committed offsets
are read with a consumer of the group that never joins it (see `committed`). Reset semantics
follow Kafka's ConsumerGroupCommand: a time resolves with ListOffsets(timestamp) and falls back
to the log end when no entry is at or after it; explicit offsets are clamped into
[log start, log end]; only an inactive group (no members) may be changed.
"""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, TypeVar

import isodate
from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import OffsetSpec

from logferry.errors import LogferryError
from logferry.kafka import KafkaSettings

T = TypeVar("T")
TP = tuple[str, int]  # (topic, partition): hashable and sorts the way people read tables

# Errors a coordinator or leader returns while it moves or loads; asking again succeeds.
_TRANSIENT = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
}
_INACTIVE = {ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD}


class OffsetsError(LogferryError):
    """An offsets request that cannot be carried out; the message says why and what to do."""


class ActiveGroupError(OffsetsError):
    """The group has members, so its committed offsets must not be changed under them."""


# ---- what `show` reports ------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    member_id: str
    client_id: str
    host: str
    assignment: tuple[TP, ...]


@dataclass(frozen=True)
class PartitionOffsets:
    topic: str
    partition: int
    committed: int | None  # None: the group never committed this partition
    log_start: int
    log_end: int
    committed_timestamp_ms: int | None  # of the record at the committed position, None when there is none
    member: str | None  # client id of the member it is assigned to

    @property
    def lag(self) -> int | None:
        return None if self.committed is None else max(0, self.log_end - self.committed)


@dataclass(frozen=True)
class GroupOffsets:
    group: str
    state: str
    members: tuple[Member, ...]
    partitions: tuple[PartitionOffsets, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "state": self.state,
            "members": [
                {"member_id": m.member_id, "client_id": m.client_id, "host": m.host,
                 "assignment": [{"topic": t, "partition": p} for t, p in m.assignment]}
                for m in self.members
            ],
            "partitions": [
                {"topic": p.topic, "partition": p.partition, "committed_offset": p.committed,
                 "log_start_offset": p.log_start, "log_end_offset": p.log_end, "lag": p.lag,
                 "committed_timestamp_ms": p.committed_timestamp_ms,
                 "committed_timestamp": iso_ms(p.committed_timestamp_ms), "member": p.member}
                for p in self.partitions
            ],
        }  # fmt: skip


# ---- what `reset` takes and plans ---------------------------------------------------------
ResetKind = Literal["to_datetime", "by_duration", "to_earliest", "to_latest", "to_offset", "shift_by", "from_file"]


@dataclass(frozen=True)
class ResetTarget:
    """Where to move offsets; `value` is epoch ms, a timedelta, an offset, a shift or {tp: offset}."""

    kind: ResetKind
    value: int | timedelta | isodate.Duration | dict[TP, int] | None = None


@dataclass(frozen=True)
class PlannedReset:
    topic: str
    partition: int
    old: int | None
    new: int
    note: str | None = None  # why `new` is not simply what was asked (clamped, fell back to earliest/latest)


@dataclass
class ResetPlan:
    group: str
    state: str
    active_members: int
    resets: list[PlannedReset] = field(default_factory=list)


# ---- parsing user input -------------------------------------------------------------------
def parse_topic_spec(spec: str) -> tuple[str, list[int] | None]:
    """`logs` → all partitions of logs; `logs:0,2` → partitions 0 and 2."""
    topic, sep, parts = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not topic:
        raise OffsetsError(f"--topic {spec!r}: expected TOPIC or TOPIC:P[,P...], e.g. logs or logs:0,2")
    if not sep:
        return topic, None
    try:
        partitions = sorted({int(p) for p in parts.split(",")})
    except ValueError:
        raise OffsetsError(f"--topic {spec!r}: partitions must be integers, e.g. {topic}:0,2") from None
    if any(p < 0 for p in partitions):
        raise OffsetsError(f"--topic {spec!r}: partitions are never negative")
    return topic, partitions


def parse_datetime(text: str, flag: str = "--to-datetime") -> int:
    """ISO-8601 date-time → epoch ms. Without a zone it is local time, as in Kafka's tool."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise OffsetsError(
            f"{flag} {text!r}: not an ISO-8601 date-time; e.g. 2026-11-20T10:00:00Z or 2026-11-20T10:00:00.000+02:00"
        ) from None
    return int(when.astimezone(UTC).timestamp() * 1000)


def parse_duration(text: str, flag: str = "--by-duration") -> timedelta | isodate.Duration:
    try:
        duration = isodate.parse_duration(text)
    except (isodate.ISO8601Error, ValueError):
        raise OffsetsError(f"{flag} {text!r}: not an ISO-8601 duration; e.g. PT1H, PT30M, P1DT12H") from None
    now = datetime.now(UTC)
    if now - duration >= now:
        raise OffsetsError(f"{flag} {text!r}: must be longer than zero (it counts back from now)")
    return duration


def read_offsets_csv(path: Path, group: str) -> dict[TP, int]:
    """Kafka's reset-plan CSV: `topic,partition,offset`, or `group,topic,partition,offset` for several groups."""
    try:
        text = path.read_text()
    except OSError as e:
        raise OffsetsError(f"--from-file {path}: cannot read ({e.strerror})") from None
    offsets: dict[TP, int] = {}
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) == 4:
            if row[0] != group:
                continue
            row = row[1:]
        if len(row) != 3:
            raise OffsetsError(f"--from-file {path} line {n}: expected topic,partition,offset; got {','.join(row)!r}")
        try:
            offsets[(row[0], int(row[1]))] = int(row[2])
        except ValueError:
            if n == 1 and row[1].strip().lower() == "partition":
                continue  # a header line
            raise OffsetsError(f"--from-file {path} line {n}: partition and offset must be integers") from None
    if not offsets:
        raise OffsetsError(f"--from-file {path}: no offsets for group {group!r} in it")
    return offsets


def write_offsets_csv(path: Path, offsets: dict[TP, int]) -> None:
    """The same format Kafka's `kafka-consumer-groups --export` writes: no header, topic,partition,offset."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for (topic, partition), offset in sorted(offsets.items()):
        writer.writerow([topic, partition, offset])
    path.write_text(buf.getvalue())


def iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- the admin side -----------------------------------------------------------------------
class GroupOffsetsAdmin:
    """Reads and changes one cluster's consumer-group offsets."""

    def __init__(self, settings: KafkaSettings, timeout: float = 15.0) -> None:
        self.settings = settings
        self.timeout = timeout
        self.admin = settings.admin()

    # -- plumbing
    def _retry(self, what: str, call: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return call()
            except KafkaException as e:
                err = e.args[0] if e.args else None
                transient = isinstance(err, KafkaError) and (err.code() in _TRANSIENT or err.retriable())
                if not transient or time.monotonic() > deadline:
                    reason = err.str() if isinstance(err, KafkaError) else str(e)
                    raise OffsetsError(f"{what}: {reason}") from None
                time.sleep(0.2)

    def topic_partitions(self, topics: Iterable[str]) -> dict[str, int]:
        """{topic: partition count}; an unknown topic is an error (never auto-created)."""
        wanted = sorted(set(topics))
        # Listing all topics never triggers auto-creation, unlike a metadata request naming one.
        md = self._retry("listing topics", lambda: self.admin.list_topics(timeout=self.timeout))
        missing = [t for t in wanted if t not in md.topics or md.topics[t].error is not None]
        if missing:
            raise OffsetsError(f"topic(s) {', '.join(missing)} do not exist on {self.settings.bootstrap_servers}")
        return {t: len(md.topics[t].partitions) for t in wanted}

    def describe(self, group: str) -> tuple[str, tuple[Member, ...], bool]:
        """(state name, members, inactive?)."""
        desc = self._retry(
            f"describing group {group}",
            lambda: self.admin.describe_consumer_groups([group], request_timeout=self.timeout)[group].result(),
        )
        members = tuple(
            Member(m.member_id, m.client_id, m.host, tuple(sorted(assigned(m.assignment)))) for m in desc.members
        )
        return desc.state.name, members, desc.state in _INACTIVE and not members

    def committed(self, group: str, tps: Sequence[TP] | None = None) -> dict[TP, int]:
        """Committed offsets of `group` (for `tps`, or every partition it committed).

        Read through a consumer with the group's id that never subscribes, so it does not join
        the group: Consumer.committed() (OffsetFetch), not the admin API, whose
        ListConsumerGroupOffsets crashed librdkafka 2.16 while a transactional group committed.
        Without `tps` it asks for every partition of every topic (one request).
        """
        if tps is None:
            md = self._retry("listing topics", lambda: self.admin.list_topics(timeout=self.timeout))
            tps = [(t, p) for t, m in md.topics.items() if not t.startswith("__") for p in m.partitions]
        if not tps:
            return {}
        wanted = [TopicPartition(t, p) for t, p in tps]
        consumer = Consumer(self.settings.client_config(**{"group.id": group, "enable.auto.commit": False}))
        try:
            res = self._retry(
                f"reading committed offsets of group {group}", lambda: consumer.committed(wanted, self.timeout)
            )
        finally:
            consumer.close()
        return {(tp.topic, tp.partition): tp.offset for tp in res if tp.error is None and tp.offset >= 0}

    def list_offsets(self, tps: Sequence[TP], spec: OffsetSpec) -> dict[TP, tuple[int, int]]:
        """{tp: (offset, record timestamp ms)}; offset -1 when no record matches a timestamp spec."""
        if not tps:
            return {}

        def call() -> dict[TP, tuple[int, int]]:
            futures = self.admin.list_offsets(
                {TopicPartition(t, p): spec for t, p in tps}, request_timeout=self.timeout
            )
            return {(tp.topic, tp.partition): (f.result().offset, f.result().timestamp) for tp, f in futures.items()}

        return self._retry("listing partition offsets", call)

    def watermarks(self, tps: Sequence[TP]) -> dict[TP, tuple[int, int]]:
        """{tp: (log start offset, log end offset)}."""
        start = self.list_offsets(tps, OffsetSpec.earliest())
        end = self.list_offsets(tps, OffsetSpec.latest())
        return {tp: (start[tp][0], end[tp][0]) for tp in tps}

    def select(self, specs: Sequence[tuple[str, list[int] | None]]) -> list[TP]:
        """The partitions named by --topic specs, checked against the cluster."""
        counts = self.topic_partitions(t for t, _ in specs)
        selected: set[TP] = set()
        for topic, partitions in specs:
            n = counts[topic]
            bad = [p for p in partitions or [] if p >= n]
            if bad:
                raise OffsetsError(f"topic {topic} has partitions 0..{n - 1}; no partition {', '.join(map(str, bad))}")
            selected.update((topic, p) for p in (partitions if partitions is not None else range(n)))
        return sorted(selected)

    # -- show
    def show(self, group: str, specs: Sequence[tuple[str, list[int] | None]] = ()) -> GroupOffsets:
        state, members, _ = self.describe(group)
        committed = self.committed(group)
        owner = {tp: m.client_id for m in members for tp in m.assignment}
        tps = self.select(specs) if specs else sorted(set(committed) | set(owner))
        if not committed and not members:
            raise OffsetsError(
                f"group {group} has no committed offsets and no members (Kafka treats an unknown group "
                "as empty): check the group name"
            )
        marks = self.watermarks(tps)
        # The record a restarted member would read next: at the committed offset, or the log start
        # when retention already removed it.
        positions = {tp: max(committed[tp], marks[tp][0]) for tp in tps if tp in committed}
        stamps = record_timestamps(self.settings, {tp: o for tp, o in positions.items() if o < marks[tp][1]})
        rows = tuple(
            PartitionOffsets(t, p, committed.get((t, p)), *marks[(t, p)], stamps.get((t, p)), owner.get((t, p)))
            for t, p in tps
        )
        return GroupOffsets(group, state, members, rows)

    # -- reset
    def resolve_partitions(
        self, group: str, specs: Sequence[tuple[str, list[int] | None]], all_topics: bool, target: ResetTarget
    ) -> list[TP]:
        if target.kind == "from_file":
            assert isinstance(target.value, dict)
            in_file = sorted(target.value)
            self.select([(t, sorted(p for tt, p in in_file if tt == t)) for t in {t for t, _ in in_file}])
            if not specs:
                return in_file
            chosen = set(self.select(specs))
            picked = [tp for tp in in_file if tp in chosen]
            if not picked:
                raise OffsetsError("--from-file: none of its partitions is among the --topic partitions given")
            return picked
        if all_topics:
            tps = sorted(self.committed(group))
            if not tps:
                raise OffsetsError(
                    f"group {group} has no committed offsets (Kafka treats an unknown group as empty), so "
                    "--all-topics selects nothing: name the topics with --topic"
                )
            return tps
        if not specs:
            raise OffsetsError("name the partitions to reset: --topic T[:P,...] (repeatable) or --all-topics")
        return self.select(specs)

    def plan(
        self,
        group: str,
        target: ResetTarget,
        specs: Sequence[tuple[str, list[int] | None]] = (),
        all_topics: bool = False,
    ) -> ResetPlan:
        state, members, _ = self.describe(group)
        tps = self.resolve_partitions(group, specs, all_topics, target)
        current = self.committed(group, tps)
        marks = self.watermarks(tps)
        plan = ResetPlan(group, state, len(members))
        kind, value = target.kind, target.value
        at_time: dict[TP, tuple[int, int]] = {}
        ts_ms = 0
        if kind in ("to_datetime", "by_duration"):
            if isinstance(value, int):
                ts_ms = value
            else:
                assert isinstance(value, timedelta | isodate.Duration)
                ts_ms = int((datetime.now(UTC) - value).timestamp() * 1000)
            at_time = self.list_offsets(tps, OffsetSpec.for_timestamp(ts_ms))
        for tp in tps:
            start, end = marks[tp]
            old = current.get(tp)
            note: str | None = None
            if kind in ("to_datetime", "by_duration"):
                offset, found_ts = at_time[tp]
                if offset < 0:
                    new, note = end, f"no entry at or after {iso_ms(ts_ms)}: log end"
                else:
                    new = offset
                    if offset == start and found_ts > ts_ms:
                        note = f"{iso_ms(ts_ms)} is before the earliest retained entry ({iso_ms(found_ts)}): earliest"
            elif kind == "to_earliest":
                new = start
            elif kind == "to_latest":
                new = end
            else:
                if kind == "to_offset":
                    assert isinstance(value, int)
                    asked = value
                elif kind == "shift_by":
                    assert isinstance(value, int)
                    if old is None:
                        raise OffsetsError(
                            f"cannot shift {tp[0]}:{tp[1]}: group {group} has no committed offset there "
                            "(use --to-offset, --to-earliest or --to-datetime)"
                        )
                    asked = old + value
                else:
                    assert isinstance(value, dict)
                    asked = value[tp]
                new = min(max(asked, start), end)
                if asked > end:
                    note = f"asked {asked}, beyond the log end {end}: clamped"
                elif asked < start:
                    note = f"asked {asked}, below the log start {start}: clamped"
            plan.resets.append(PlannedReset(tp[0], tp[1], old, new, note))
        return plan

    def execute(self, plan: ResetPlan) -> None:
        """Commit the planned offsets; refuses while the group has members, like Kafka's tool."""
        group = plan.group
        state, members, inactive = self.describe(group)
        if not inactive:
            raise ActiveGroupError(active_message(group, state, len(members)))
        req = ConsumerGroupTopicPartitions(group, [TopicPartition(r.topic, r.partition, r.new) for r in plan.resets])
        res = self._retry(
            f"committing offsets of group {group}",
            lambda: self.admin.alter_consumer_group_offsets([req], request_timeout=self.timeout)[group].result(),
        )
        failed = [tp for tp in res.topic_partitions if tp.error is not None]
        if failed:
            codes = {tp.error.code() for tp in failed}
            if codes & {KafkaError.UNKNOWN_MEMBER_ID, KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION}:
                raise ActiveGroupError(f"group {group} became active while resetting; stop its consumers and retry")
            detail = ", ".join(f"{tp.topic}:{tp.partition} ({tp.error.str()})" for tp in failed)
            raise OffsetsError(f"group {group}: Kafka refused offsets for {detail}")


def assigned(assignment: object) -> list[TP]:
    tps = getattr(assignment, "topic_partitions", None) or []
    return [(tp.topic, tp.partition) for tp in tps]


def active_message(group: str, state: str, members: int) -> str:
    return (
        f"group {group} is active ({members} member(s), state {state}): offsets can only be reset while no "
        "consumer of the group runs (as with kafka-consumer-groups); stop them, or replay from the running "
        "processor instead"
    )


def record_timestamps(settings: KafkaSettings, positions: dict[TP, int], timeout: float = 10.0) -> dict[TP, int | None]:
    """Timestamp of the first record at or after each position, read with a short-lived consumer.

    assign()+seek never joins or creates a group, so peeking leaves no trace. A partition whose
    position holds no record (only transaction markers until the end) reports None.
    """
    if not positions:
        return {}
    consumer = Consumer(
        settings.client_config(**{
            "group.id": f"logferry-offsets-peek-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        })
    )  # fmt: skip
    found: dict[TP, int | None] = {}
    try:
        consumer.assign([TopicPartition(t, p, o) for (t, p), o in positions.items()])
        deadline = time.monotonic() + timeout
        while len(found) < len(positions) and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=len(positions), timeout=0.5):
                tp = (msg.topic(), msg.partition())
                if tp in found or tp not in positions:
                    continue
                err = msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    continue  # transient fetch trouble: the deadline bounds the wait
                ts_type, ts = msg.timestamp() if err is None else (TIMESTAMP_NOT_AVAILABLE, 0)
                found[tp] = None if ts_type == TIMESTAMP_NOT_AVAILABLE else ts
                consumer.pause([TopicPartition(*tp)])
    finally:
        consumer.close()
    return found
