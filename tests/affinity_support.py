"""Shared by the pin_to_cpu tests: which CPUs this process and its threads may run on."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

ALLOWED = os.sched_getaffinity(0)
CPU = max(ALLOWED)
# With one CPU allowed, pinned and unpinned threads look the same: nothing there could fail.
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason=f"this process may use one CPU only ({sorted(ALLOWED)})")


def kafka_threads() -> dict[str, set[int]]:
    """librdkafka's threads (they name themselves rdk:…) and the CPUs each may run on."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            if name.startswith("rdk:"):
                out[f"{name}/{task.name}"] = os.sched_getaffinity(int(task.name))
        except OSError:
            continue  # ended meanwhile
    return out


def python_threads() -> dict[str, set[int]]:
    """This process's Python threads by name and the CPUs each may run on."""
    out = {}
    for t in threading.enumerate():
        if t.native_id is None:
            continue  # not started
        try:
            out[t.name] = os.sched_getaffinity(t.native_id)
        except OSError:
            continue  # ended meanwhile
    return out
