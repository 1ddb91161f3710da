"""What the demo verifies from the handlers' records: every expected entry handled, per-key order held.

Order, per key, in handle-time order: handling seq s while an earlier expected seq of that key
has not been handled yet is a violation. Handling an entry again (at-least-once redelivery
after a rebalance) is a duplicate, counted but not a violation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from logferry.kafka import KafkaSettings
from logferry.schemas import default_codec


@dataclass(frozen=True)
class Handle:
    key: str
    seq: int
    partition: int
    offset: int
    t_ns: int  # wall clock at the handler call (members share the machine's clock)


def read_records(directory: Path) -> list[Handle]:
    """Every handler call of every member, in handle-time order."""
    out: list[Handle] = []
    for path in sorted(directory.glob("*.tsv")):
        for line in path.read_text().splitlines():
            key, seq, partition, offset, t_ns = line.split("\t")
            out.append(Handle(key, int(seq), int(partition), int(offset), int(t_ns)))
    out.sort(key=lambda h: h.t_ns)
    return out


@dataclass
class OrderCheck:
    expected: int  # entries that had to be handled
    calls: int  # handler calls counted in this check
    handled: int  # distinct expected entries handled
    missing: int  # expected but never handled
    duplicates: int  # handled again (redelivery), not an order problem
    unexpected: int  # handled but not expected here (e.g. outside a replay window)
    violations: int  # handled before an earlier entry of the same key

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def check_order(handles: list[Handle], expected: dict[str, list[int]]) -> OrderCheck:
    """`expected[key]`: the seqs that must be handled, in the order they must be handled."""
    by_key: dict[str, list[Handle]] = defaultdict(list)
    for h in handles:
        by_key[h.key].append(h)
    missing = duplicates = unexpected = violations = 0
    for key in by_key.keys() | expected.keys():
        order = expected.get(key, [])
        index = {seq: i for i, seq in enumerate(order)}
        seen: set[int] = set()
        next_i = 0  # every expected entry before this one has been handled
        for h in by_key.get(key, []):
            i = index.get(h.seq)
            if i is None:
                unexpected += 1
            elif i in seen:
                duplicates += 1
            else:
                violations += i != next_i
                seen.add(i)
                while next_i in seen:
                    next_i += 1
        missing += len(order) - len(seen)
    total = sum(len(v) for v in expected.values())
    return OrderCheck(total, len(handles), total - missing, missing, duplicates, unexpected, violations)


def read_window(kafka: KafkaSettings, topic: str, partitions: int, since_ms: int) -> dict[str, list[int]]:
    """Per key, the seqs of the entries a replay to `since_ms` re-handles, in their partition order.

    Same lookup as the members' seek (ListOffsets by timestamp), read up to the log end.
    """
    codec = default_codec()
    consumer = Consumer(kafka.client_config(**{"group.id": "logferry-demo-window", "enable.auto.commit": False}))
    try:
        found = consumer.offsets_for_times([TopicPartition(topic, p, since_ms) for p in range(partitions)], timeout=10)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
        starts = {tp.partition: tp.offset for tp in found if 0 <= tp.offset < ends[tp.partition]}
        consumer.assign([TopicPartition(topic, p, off) for p, off in starts.items()])
        window: dict[str, list[int]] = defaultdict(list)
        left = sum(ends[p] - off for p, off in starts.items())
        while left > 0:
            msgs = consumer.consume(1000, 5.0)
            if not msgs:
                raise TimeoutError(f"reading the replay window of {topic}: {left} entries did not arrive")
            for msg in msgs:
                if msg.error() is not None:
                    continue
                entry = codec.decode(msg.value(), msg.headers())
                window[entry["service"]].append(int(entry["attributes"].get("seq", "-1")))
                left -= 1
        return dict(window)
    finally:
        consumer.close()
