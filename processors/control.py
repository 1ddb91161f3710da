"""Live replay: a command on a small control topic makes every running member seek its partitions.

`logferry replay --group G --to-datetime ...` publishes a `ReplayCommand` (JSON, keyed by the
group, unique id) to the control topic. Each running Processor reads that topic with its own
non-group consumer, assigned at the topic's end when the member starts, so only commands
issued while it runs are seen. On a command for its group the poll thread (the `on_poll`
hook) seeks every partition it owns *at that moment* to the target, through `Runtime.seek`:
queued work of the old position is skipped and never committed past, a record already
running finishes first because its key's lane stays held, so per-key order holds from the
new position. The member then publishes an acknowledgement naming each partition it moved
(old → new), which `logferry replay` waits for and prints.

Policy for partitions that change hands while the command is handled: only current
assignments seek. A partition a member receives later continues from the group's committed
offset (which is the replay target once the previous owner seeked and committed). A
partition in mid-rebalance when the command arrived may therefore be missed; the
acknowledgements show exactly which partitions moved, and `logferry replay` exits 1 naming
any member that did not answer, so the operator re-issues the command (a new id).

Idempotent: a member applies a command id at most once (ids are remembered for the life of
the process, the reader never rewinds, rebalances do not re-read it). Audited: one log line
per command and per partition, and `logferry_processor_replays_total{trigger="control"}`.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from logferry.kafka import KafkaSettings, close_producer
from logferry.log import LogOnce
from logferry.metrics import REPLAYS
from logferry.processors.offsets import TP, iso_ms
from logferry.processors.runtime import Hooks

if TYPE_CHECKING:
    from logferry.processors.config import ProcessorSection
    from logferry.processors.runtime import Runtime

log = logging.getLogger("logferry.processors.control")
once = LogOnce(log)

CONTROL_TOPIC = "logferry.control"
# Commands only matter to members running when they are issued; a day is plenty for audit.
CONTROL_TOPIC_CONFIG = {"cleanup.policy": "delete", "retention.ms": str(24 * 3600 * 1000)}
REMEMBERED_IDS = 10_000
LOOKUP_TIMEOUT = 5.0


@dataclass(frozen=True)
class ReplayCommand:
    group: str
    kind: Literal["datetime", "earliest"]
    at_ms: int | None = None  # for kind="datetime": first entry at or after this time
    topics: list[str] | None = None  # None: every source topic of the group (not its retry topics)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    issued_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    issued_by: str = field(default_factory=lambda: f"{getpass.getuser()}@{socket.gethostname()}")
    type: str = "replay"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def describe(self) -> str:
        return "earliest" if self.kind == "earliest" else f"{iso_ms(self.at_ms)}"


@dataclass(frozen=True)
class Seek:
    topic: str
    partition: int
    old: int | None
    new: int | None
    note: str = ""


@dataclass(frozen=True)
class Ack:
    id: str
    group: str
    member: str
    host: str
    seeks: list[Seek]
    type: str = "ack"

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def parse_control(value: bytes | None) -> ReplayCommand | Ack | None:
    """A control record, or None when it is not one we understand (counted by the caller's log)."""
    try:
        data = json.loads(value or b"")
        if data.get("type") == "replay":
            return ReplayCommand(**data)
        if data.get("type") == "ack":
            return Ack(**{**data, "seeks": [Seek(*s) if isinstance(s, list) else Seek(**s) for s in data["seeks"]]})
    except (ValueError, TypeError, KeyError, AttributeError):
        pass
    return None


def ensure_control_topic(admin: AdminClient, topic: str) -> None:
    """Create the control topic (one partition: one total order of commands) if it is missing."""
    if topic in admin.list_topics(timeout=10).topics:
        return
    fut = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=-1, config=CONTROL_TOPIC_CONFIG)])
    try:
        fut[topic].result(30)
        log.info("created control topic %s", topic)
    except KafkaException as e:
        if "TOPIC_ALREADY_EXISTS" not in str(e):
            raise


def tail_reader(kafka: KafkaSettings, topic: str) -> Consumer:
    """A non-group consumer of the control topic positioned at its current end."""
    consumer = Consumer(
        kafka.client_config(**{
            # Never joins: assign() only. The id just satisfies the client and commits nothing.
            "group.id": f"logferry-control-reader-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "fetch.wait.max.ms": 100,
        })
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while True:
        try:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)
            break
        except KafkaException:
            if time.monotonic() > deadline:  # a topic created a moment ago has no known leader yet
                consumer.close()
                raise
            time.sleep(0.1)
    # A concrete offset, not OFFSET_END: a command published right after start-up is never skipped.
    consumer.assign([TopicPartition(topic, 0, high)])
    return consumer


def target_offsets(consumer: Consumer, tps: list[TP], cmd: ReplayCommand) -> dict[TP, tuple[int, str]]:
    """Where each partition goes: (offset, note). Same rules as `logferry offsets reset`.

    One batched ListOffsets(timestamp) request; "earliest" is timestamp 0 (every entry is at or
    after it). Only a partition with no entry at or after the time needs its log end.
    """
    at = 0 if cmd.kind == "earliest" else cmd.at_ms or 0
    out: dict[TP, tuple[int, str]] = {}
    for r in consumer.offsets_for_times([TopicPartition(t, p, at) for t, p in tps], timeout=LOOKUP_TIMEOUT):
        if r.error is not None:
            raise KafkaException(r.error)
        if r.offset >= 0:
            low, _ = consumer.get_watermark_offsets(TopicPartition(r.topic, r.partition), cached=True)
            early = cmd.kind == "earliest" or r.offset == low  # cached from fetches: no round trip
            out[(r.topic, r.partition)] = (r.offset, "earliest retained entry" if early else "")
        else:
            _, high = consumer.get_watermark_offsets(TopicPartition(r.topic, r.partition), timeout=LOOKUP_TIMEOUT)
            note = "empty: log end" if cmd.kind == "earliest" else "no entry at or after the time: log end"
            out[(r.topic, r.partition)] = (high, note)
    return out


class ControlListener:
    """The member side: an `on_poll` hook that applies replay commands for its group."""

    def __init__(self, kafka: KafkaSettings, group: str, source_topics: list[str], topic: str = CONTROL_TOPIC) -> None:
        self.group = group
        self.topic = topic
        self.source_topics = set(source_topics)
        ensure_control_topic(kafka.admin(), topic)
        self.consumer = tail_reader(kafka, topic)
        self.producer = Producer(kafka.client_config(**{"enable.idempotence": True, "linger.ms": 0}))
        self._seen: deque[str] = deque(maxlen=REMEMBERED_IDS)
        self._seen_set: set[str] = set()
        self.applied: list[str] = []  # command ids applied, in order (tests, diagnostics)

    @classmethod
    def for_settings(cls, settings: ProcessorSection, kafka: KafkaSettings) -> ControlListener | None:
        if not settings.live_replay:
            return None
        try:
            return cls(kafka, settings.group, [*settings.topics, *settings.low_priority_topics], settings.control_topic)
        except KafkaException as e:
            # An optional feature must not keep the member from working; `logferry replay` names it as silent.
            log.error("live replay disabled: cannot use control topic %s (%s)", settings.control_topic, e)
            return None

    def hooks(self, base: Hooks) -> Hooks:
        """`base` with this listener chained after its own on_poll."""
        inner: Callable[[Runtime], None] | None = base.on_poll

        def on_poll(runtime: Runtime) -> None:
            if inner is not None:
                inner(runtime)
            self(runtime)

        return Hooks(on_assign=base.on_assign, on_poll=on_poll)

    def __call__(self, runtime: Runtime) -> None:
        """Poll thread: handle whatever commands arrived since the last loop (usually none)."""
        for msg in self.consumer.consume(100, 0):
            if msg.error() is not None:
                once.warning(f"control:{msg.error().name()}", "control topic %s: %s", self.topic, msg.error())
                continue
            cmd = parse_control(msg.value())
            if cmd is None:
                once.warning("control:bad", "control topic %s: ignoring an unreadable record at offset %d",
                             self.topic, msg.offset())  # fmt: skip
            elif isinstance(cmd, ReplayCommand) and cmd.group == self.group and cmd.id not in self._seen_set:
                self._remember(cmd.id)
                self.apply(runtime, cmd)
        self.producer.poll(0)

    def _remember(self, cid: str) -> None:
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(cid)
        self._seen_set.add(cid)

    def apply(self, runtime: Runtime, cmd: ReplayCommand) -> list[Seek]:
        wanted = set(cmd.topics) if cmd.topics else self.source_topics
        tps = [tp for tp in runtime.assignment() if tp[0] in wanted]
        log.warning("replay %s for group %s issued by %s: seeking %d partition(s) to %s", cmd.id, self.group,
                    cmd.issued_by, len(tps), cmd.describe())  # fmt: skip
        seeks: list[Seek] = []
        try:
            targets = target_offsets(runtime.consumer, tps, cmd) if tps else {}
        except KafkaException as e:
            log.error("replay %s: cannot look up the target offsets (%s); nothing moved", cmd.id, e)
            targets = {}
            seeks = [Seek(t, p, None, None, f"failed: {e}") for t, p in tps]
        before = self._positions(runtime, sorted(targets))
        for (t, p), (offset, note) in sorted(targets.items()):
            old_pos = before.get((t, p))
            try:
                runtime.seek(t, p, offset)
            except (KafkaException, ValueError) as e:
                log.error("replay %s: %s[%d] not moved: %s", cmd.id, t, p, e)
                seeks.append(Seek(t, p, old_pos, None, f"failed: {e}"))
                continue
            REPLAYS.labels(self.group, "control").inc()
            log.warning("replay %s: %s[%d] %s → %d%s", cmd.id, t, p, "-" if old_pos is None else old_pos, offset,
                        f" ({note})" if note else "")  # fmt: skip
            seeks.append(Seek(t, p, old_pos, offset, note))
        self.applied.append(cmd.id)
        ack = Ack(cmd.id, self.group, runtime.consumer.memberid() or "", socket.gethostname(), seeks)
        self.producer.produce(self.topic, key=self.group.encode(), value=ack.to_bytes())
        self.producer.poll(0)
        return seeks

    @staticmethod
    def _positions(runtime: Runtime, tps: list[TP]) -> dict[TP, int]:
        """Where the member stood: its commit point, else (nothing handled since it got the partition)
        the group's committed offset, which is where it started."""
        at = {tp: c for tp in tps if (c := runtime.states[tp].committable()) is not None}
        unknown = [TopicPartition(t, p) for t, p in tps if (t, p) not in at]
        if unknown:
            try:
                at |= {(r.topic, r.partition): r.offset for r in runtime.consumer.committed(unknown, LOOKUP_TIMEOUT)}
            except KafkaException as e:  # only the audit's "old" column suffers
                log.warning("replay: cannot read the committed offsets (%s)", e)
        return {tp: o for tp, o in at.items() if o >= 0}

    def close(self) -> None:
        close_producer(self.producer, 5)
        self.consumer.close()


def publish_and_wait(
    kafka: KafkaSettings, cmd: ReplayCommand, members: set[str], wait: float, topic: str = CONTROL_TOPIC
) -> dict[str, Ack]:
    """Publish `cmd`, then collect acknowledgements until every member in `members` answered or `wait` passed."""
    ensure_control_topic(kafka.admin(), topic)
    reader = tail_reader(kafka, topic)  # before publishing, so no acknowledgement can slip past
    producer = Producer(kafka.client_config(**{"enable.idempotence": True}))
    try:
        producer.produce(topic, key=cmd.group.encode(), value=cmd.to_bytes())
        if producer.flush(10) != 0:
            raise KafkaException(f"the replay command was not acknowledged by Kafka at {kafka.bootstrap_servers}")
        acks: dict[str, Ack] = {}
        deadline = time.monotonic() + wait
        while not members <= acks.keys() and time.monotonic() < deadline:
            for msg in reader.consume(100, 0.2):
                rec = parse_control(msg.value()) if msg.error() is None else None
                if isinstance(rec, Ack) and rec.id == cmd.id:
                    acks[rec.member] = rec
        return acks
    finally:
        reader.close()
        close_producer(producer, 1)  # flushed above, or the command failed: nothing to wait for


def ack_rows(acks: dict[str, Ack]) -> list[dict[str, Any]]:
    return [
        {"member": a.member, "host": a.host, **asdict(s)}
        for a in sorted(acks.values(), key=lambda a: a.member)
        for s in a.seeks
    ]
