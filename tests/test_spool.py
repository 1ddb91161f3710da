"""The disk spool: order, acks, crash safety, damage handling and size limits (no Kafka needed)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from logferry.collectors.config import AgentConfig
from logferry.collectors.spill import decode, encode
from logferry.collectors.spool import HEADER, Spool, list_segments
from logferry.collectors.spool_repair import check_spool, repair_spool
from logferry.config import validate
from logferry.errors import ConfigError


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def drain(spool: Spool, ack: bool = True) -> list[bytes]:
    out: list[bytes] = []
    while True:
        items = spool.read(max_records=97)
        if not items:
            return out
        out += [i.payload for i in items]
        if ack:
            spool.ack(i.position for i in items)


def payloads(n: int, size: int = 40, tag: str = "r") -> list[bytes]:
    return [f"{tag}{i:06d}".encode().ljust(size, b".") for i in range(n)]


def test_append_read_ack_in_order_and_reclaims_segments(tmp_path: Path) -> None:
    data = payloads(2000)
    with Spool(tmp_path / "s", segment_bytes=8 << 10, max_bytes=1 << 20) as spool:
        for i in range(0, len(data), 50):
            spool.append(data[i : i + 50])
        assert spool.stats().segments > 5
        assert drain(spool) == data
        st_ = spool.stats()
        assert (st_.entries, st_.segments) == (0, 1)
        assert metric("logferry_spool_entries") == 0
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "s").iterdir())


def test_unacked_records_survive_reopen_and_out_of_order_acks_hold_the_cursor(tmp_path: Path) -> None:
    data = payloads(300)
    d = tmp_path / "s"
    with Spool(d, segment_bytes=4 << 10, max_bytes=1 << 20) as spool:
        spool.append(data)
        items = spool.read(max_records=300)
        # Kafka acks partitions independently: everything but record 100 is acknowledged.
        spool.ack(i.position for k, i in enumerate(items) if k != 100)
        assert spool.stats().entries == 200
    with Spool(d, segment_bytes=4 << 10, max_bytes=1 << 20) as spool:
        assert spool.stats().entries == spool.unread_count == 200
        assert drain(spool) == data[100:]
        assert spool.unread_count == 0
    with Spool(d) as spool:
        assert spool.stats().entries == 0
        assert drain(spool) == []


def test_second_owner_is_refused(tmp_path: Path) -> None:
    with Spool(tmp_path / "s"), pytest.raises(ConfigError, match="in use"):
        Spool(tmp_path / "s")


def test_torn_tail_is_skipped_counted_reported_and_repaired(tmp_path: Path) -> None:
    d = tmp_path / "s"
    data = payloads(50)
    with Spool(d) as spool:
        spool.append(data)
    (_, seg), *_ = list_segments(d)
    with seg.open("r+b") as f:  # a crash in the middle of the last write
        f.truncate(seg.stat().st_size - 7)
    (report,) = check_spool(d)
    assert (report.records, report.damaged_spans, report.torn_tail) == (49, 1, True)
    before = metric("logferry_spool_corrupt_records_total")
    with Spool(d) as spool:
        assert drain(spool) == data[:49]
    assert metric("logferry_spool_corrupt_records_total") == before + 1


def test_flipped_byte_costs_one_record_and_repair_keeps_the_rest(tmp_path: Path) -> None:
    d = tmp_path / "s"
    data = payloads(100, size=64)
    with Spool(d) as spool:
        spool.append(data)
    (_, seg), *_ = list_segments(d)
    rec = HEADER.size + 64
    raw = bytearray(seg.read_bytes())
    raw[rec * 10 + HEADER.size + 5] ^= 0xFF  # payload of record 10
    raw[rec * 70 + 3] ^= 0x01  # length field of record 70
    seg.write_bytes(bytes(raw))
    (report,) = check_spool(d)
    assert (report.records, report.damaged_spans, report.torn_tail) == (98, 2, False)
    repaired = repair_spool(d)
    assert repaired[0].damaged_spans == 2
    assert [(r.records, r.damaged_spans) for r in check_spool(d)] == [(98, 0)]
    with Spool(d) as spool:
        assert drain(spool) == [p for i, p in enumerate(data) if i not in (10, 70)]


def test_repair_keeps_the_cursor_on_the_same_record(tmp_path: Path) -> None:
    d = tmp_path / "s"
    data = payloads(100, size=64)
    with Spool(d, cursor_interval=0) as spool:
        spool.append(data)
        items = spool.read(max_records=40)
        spool.ack(i.position for i in items)
    (_, seg), *_ = list_segments(d)
    raw = bytearray(seg.read_bytes())
    raw[(HEADER.size + 64) * 5 + HEADER.size] ^= 0xFF  # an acknowledged record is damaged
    seg.write_bytes(bytes(raw))
    repair_spool(d)
    with Spool(d) as spool:
        assert drain(spool) == data[40:]


def test_drop_oldest_drops_whole_segments_and_counts_them(tmp_path: Path) -> None:
    data = payloads(3000, size=100)
    before = metric("logferry_entries_dropped_total", reason="spool_full")
    with Spool(tmp_path / "s", segment_bytes=16 << 10, max_bytes=64 << 10, when_full="drop_oldest") as spool:
        for i in range(0, len(data), 10):
            spool.append(data[i : i + 10])
        assert spool.stats().bytes <= 64 << 10
        got = drain(spool)
    dropped = metric("logferry_entries_dropped_total", reason="spool_full") - before
    assert dropped == len(data) - len(got) > 0
    assert got == data[-len(got) :]  # the newest survive, in order


def test_block_policy_waits_for_acks_instead_of_dropping(tmp_path: Path) -> None:
    with Spool(tmp_path / "s", segment_bytes=4 << 10, max_bytes=16 << 10, when_full="block") as spool:
        first = payloads(120, size=100)
        spool.append(first)
        more = payloads(100, size=100, tag="m")
        done = threading.Event()
        writer = threading.Thread(target=lambda: (spool.append(more), done.set()))
        writer.start()
        assert not done.wait(0.5), "append should block while the spool is full"
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 220 and time.monotonic() < deadline:
            items = spool.read(max_records=20, timeout=0.2)
            got += [i.payload for i in items]
            spool.ack(i.position for i in items)
        writer.join(5)
        assert done.is_set()
        assert got == first + more


def test_fsync_policies_round_trip(tmp_path: Path) -> None:
    for policy in ("batch", "interval", "never"):
        d = tmp_path / policy
        with Spool(d, fsync=policy, fsync_interval=0.05) as spool:  # type: ignore[arg-type]
            spool.append(payloads(10))
        with Spool(d) as spool:
            assert drain(spool) == payloads(10)


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="when_full"):
        Spool(tmp_path / "a", when_full="drop_newest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="fsync"):
        Spool(tmp_path / "b", fsync="sometimes")  # type: ignore[arg-type]


WRITER = """
import sys
from logferry.collectors.spool import Spool
spool = Spool(sys.argv[1], segment_bytes=32 << 10, max_bytes=64 << 20, fsync="batch")
n = int(sys.argv[2])
while True:
    spool.append([f"k{n + i:07d}".encode().ljust(80, b"x") for i in range(20)])
    n += 20
    print(n, flush=True)
"""


def test_kill_9_loses_nothing_that_append_returned(tmp_path: Path) -> None:
    """SIGKILL a writer at arbitrary moments: every record whose append returned is there, in order."""
    d = tmp_path / "s"
    stored = 0
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(stored)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        confirmed = stored
        for line in proc.stdout:
            confirmed = int(line)
            if confirmed >= stored + 300 * (round_ + 1):
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with Spool(d) as spool:
            got = drain(spool, ack=False)
        stored = len(got)
        assert stored >= confirmed
        assert got == [f"k{i:07d}".encode().ljust(80, b"x") for i in range(stored)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=40),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=3),
)
def test_any_damage_keeps_every_untouched_record(tmp_path: Path, sizes: list[int], cut: float, flips: list) -> None:
    d = tmp_path / f"h{time.monotonic_ns()}"
    data = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    with Spool(d) as spool:
        spool.append(data)
    (_, seg), *_ = list_segments(d)
    original = seg.read_bytes()
    raw = bytearray(original)
    for where, xor in flips:
        raw[min(int(where * len(raw)), len(raw) - 1)] ^= xor
    raw = raw[: int(cut * len(raw))]
    seg.write_bytes(bytes(raw))
    bounds, pos = [], 0
    for p in data:
        bounds.append((pos, pos + HEADER.size + len(p)))
        pos += HEADER.size + len(p)
    damaged = {i for i, (a, b) in enumerate(bounds) if raw[a:b] != original[a:b]}
    expected = [p for i, p in enumerate(data) if i not in damaged]
    assert sum(r.records for r in check_spool(d)) == len(expected)
    repair_spool(d)
    assert all(r.damaged_spans == 0 for r in check_spool(d))
    with Spool(d) as spool:
        assert drain(spool) == expected


@given(
    topic=st.text(min_size=1, max_size=30),
    key=st.none() | st.binary(max_size=40),
    value=st.binary(max_size=300),
    ts=st.integers(0, 2**62),
    source=st.text(max_size=20),
    token=st.none() | st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)),
)
def test_spilled_records_round_trip(topic, key, value, ts, source, token) -> None:
    record = (topic, key, value, ts, source, token)
    assert decode(encode(record)) == record


def test_spool_settings_are_validated_with_the_key_named() -> None:
    cfg = validate(AgentConfig, {"spool": {"fsync": "interval", "fsync_interval_ms": 50}, "agent": {"state_dir": "/x"}})
    assert (cfg.spool.fsync, cfg.spool.fsync_interval_ms, str(cfg.agent.state_dir)) == ("interval", 50, "/x")
    assert AgentConfig().spool.fsync == "batch"  # the stated default
    with pytest.raises(ConfigError, match=r"spool\.fsync"):
        validate(AgentConfig, {"spool": {"fsync": "sometimes"}})
