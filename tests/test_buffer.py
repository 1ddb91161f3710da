"""The bounded buffer: limits in entries and bytes, and each full-policy counts exactly what it drops."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import REGISTRY

from logferry.collectors.buffer import Buffer, BufferClosed, Record, record_size


def rec(i: int, size: int = 10) -> Record:
    return ("t", None, str(i).encode().ljust(size, b"."), 0, "src", None)


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("logferry_entries_dropped_total", {"reason": reason}) or 0.0


def values(records: list[Record]) -> list[int]:
    return [int(r[2].rstrip(b".")) for r in records]


def test_drop_newest_counts_exactly_and_keeps_the_oldest():
    buf = Buffer(max_entries=5, max_bytes=10_000, policy="drop_newest")
    before = dropped("buffer_full")
    buf.put([rec(i) for i in range(3)])
    buf.put([rec(i) for i in range(3, 9)])
    assert dropped("buffer_full") - before == 4
    assert values(buf.get(100, 0)) == [0, 1, 2, 3, 4]


def test_drop_oldest_evicts_exactly_and_keeps_the_newest():
    buf = Buffer(max_entries=4, max_bytes=10_000, policy="drop_oldest")
    before = dropped("buffer_evicted")
    buf.put([rec(i) for i in range(10)])
    assert dropped("buffer_evicted") - before == 6
    assert values(buf.get(100, 0)) == [6, 7, 8, 9]


def test_byte_limit_applies_as_well_as_entries():
    buf = Buffer(max_entries=1000, max_bytes=1024, policy="drop_newest")
    before = dropped("buffer_full")
    buf.put([rec(i, 100) for i in range(20)])  # 10 fit in 1024 bytes
    assert len(buf) == 10 and buf.bytes == 1000
    assert dropped("buffer_full") - before == 10


def test_an_entry_larger_than_the_byte_limit_still_passes_an_empty_buffer():
    buf = Buffer(max_entries=10, max_bytes=1024, policy="block")
    buf.put([rec(1, 5000)])
    assert record_size(buf.get(1, 0)[0]) == 5000


def test_block_waits_for_room_and_loses_nothing():
    buf = Buffer(max_entries=10, max_bytes=10_000, policy="block")
    done = threading.Event()

    def writer() -> None:
        for start in range(0, 100, 5):
            buf.put([rec(i) for i in range(start, start + 5)])
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    deadline = time.monotonic() + 5
    while len(buf) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(buf) == 10 and not done.is_set()  # the writer is blocked on a full buffer
    got: list[Record] = []
    while len(got) < 100 and time.monotonic() < deadline + 5:
        got += buf.get(3, 0.5)
    t.join(5)
    assert done.is_set() and values(got) == list(range(100))
    blocked = REGISTRY.get_sample_value("logferry_buffer_blocked_seconds_total")
    assert blocked is not None and blocked > 0


def test_close_releases_a_blocked_writer():
    buf = Buffer(max_entries=1, max_bytes=10_000, policy="block")
    buf.put([rec(0)])
    raised = threading.Event()

    def writer() -> None:
        try:
            buf.put([rec(1)])
        except BufferClosed:
            raised.set()

    t = threading.Thread(target=writer)
    t.start()
    buf.close()
    t.join(5)
    assert raised.is_set()


def test_gauges_follow_depth():
    buf = Buffer(max_entries=100, max_bytes=10_000, policy="block")
    buf.put([rec(i) for i in range(7)])
    assert REGISTRY.get_sample_value("logferry_buffer_entries") == 7
    assert REGISTRY.get_sample_value("logferry_buffer_bytes") == 70
    buf.get(5, 0)
    assert REGISTRY.get_sample_value("logferry_buffer_entries") == 2


class ListSpill:
    """An in-memory stand-in for the disk spool, enough to pin the seam's contract (order, refill)."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def spill(self, records):
        self.records += records

    def refill(self, max_entries, max_bytes):
        out, self.records = self.records[:max_entries], self.records[max_entries:]
        return out

    def pending(self):
        return len(self.records)


def test_spill_seam_keeps_arrival_order():
    spill = ListSpill()
    buf = Buffer(max_entries=3, max_bytes=10_000, policy="spill", spill=spill)
    buf.put([rec(i) for i in range(5)])
    assert spill.pending() == 2
    buf.put([rec(5)])  # room or not, it queues behind what is spilled
    assert spill.pending() == 3
    got: list[Record] = []
    while len(got) < 6:
        got += buf.get(2, 0)
    assert values(got) == list(range(6))


def test_spill_policy_needs_a_spill():
    with pytest.raises(ValueError, match="needs a Spill"):
        Buffer(10, 10_000, "spill")


@pytest.mark.parametrize(("policy", "dropped_tokens"), [("drop_newest", [3, 4]), ("drop_oldest", [0, 1])])
def test_dropped_entries_settle_their_ack_tokens(policy, dropped_tokens):
    # A dropped entry is counted, so its source's checkpoint may move past it instead of waiting forever.
    settled: list[tuple[str, list]] = []
    buf = Buffer(max_entries=3, max_bytes=10_000, policy=policy, settle=lambda s, t: settled.append((s, list(t))))
    buf.put([("t", None, b"v", 0, "file", i) for i in range(5)])
    assert settled == [("file", dropped_tokens)]
