"""Shared by the fault suites (tests/test_faults_*.py): keyed writers, end-to-end order check, the fault table.

Entries are JSON lines {"service": "k<j>", "seq": <n>}: the agent keys by service, so each key's
sequence must reach Kafka and the handler in order.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(os.environ.get("LOGFERRY_FAULT_TABLE", "/tmp/logferry-fault-table.json"))


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid`, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


def keyed_line(i: int, keys: int) -> str:
    """Entry i of a keyed stream: key k<i mod keys>, per-key sequence i // keys."""
    return json.dumps({"service": f"k{i % keys}", "seq": i // keys, "message": f"entry {i}"}) + "\n"


@dataclass
class OrderReport:
    keys: int
    handled: int
    distinct: int
    missing: int
    rewinds: int  # redelivery restarts (at-least-once after a crash/rebalance)
    violations: list[str]


def check_key_order(rows: Iterable[tuple[str, int]], expected: dict[str, int]) -> OrderReport:
    """`rows`: (key, seq) in the order they were handled; `expected`: key -> how many seqs were written.

    The rule, per key: each step is either the next sequence (s + 1) or a rewind to an earlier
    one (<= s, a redelivered prefix after a crash or hand-over, from where the run replays in
    order). Anything else — a skip ahead (s + 2 and beyond) — is an ordering violation; and every
    written sequence must appear at least once.
    """
    last: dict[str, int] = {}
    seen: dict[str, set[int]] = defaultdict(set)
    violations: list[str] = []
    handled = rewinds = 0
    for key, seq in rows:
        handled += 1
        prev = last.get(key, -1)
        if seq == prev + 1:
            pass
        elif seq <= prev:
            rewinds += 1
        else:
            violations.append(f"{key}: {prev} -> {seq}")
        last[key] = seq
        seen[key].add(seq)
    missing = sum(len(set(range(n)) - seen.get(k, set())) for k, n in expected.items())
    distinct = sum(len(v) for v in seen.values())
    return OrderReport(len(seen), handled, distinct, missing, rewinds, violations[:20])


def record_fault(fault: str, written: int, delivered: int, handled: int | None, lost: int, duplicated: int) -> None:
    """One row of the closing table: printed (pytest -s) and merged into TABLE (JSON, keyed by fault)."""
    row = {"written": written, "delivered": delivered, "handled": handled, "lost": lost, "duplicated": duplicated}
    print(f"\nFAULT {fault}: " + ", ".join(f"{k}={v}" for k, v in row.items()))
    try:
        table = json.loads(TABLE.read_text())
    except (OSError, ValueError):
        table = {}
    table[fault] = row
    TABLE.write_text(json.dumps(table, indent=2))
