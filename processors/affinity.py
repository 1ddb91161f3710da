"""`pin_to_cpu`: the processor's Python threads on one CPU (Linux), Kafka's threads left alone.

The GIL lets one Python thread run bytecode at a time, yet the kernel spreads a processor's poll
thread and workers over all cores; every hand-off of a record between them then moves its objects
between CPU caches. Pinned to one CPU they run as before, minus those misses. librdkafka's threads
do their work outside the GIL and keep the CPUs they were started with.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger("logferry.processors.affinity")


def check_cpu(cpu: int) -> None:
    """Raise ValueError unless this process may run on `cpu` (checked with the config, before any client)."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("pin_to_cpu needs Linux (os.sched_setaffinity)")
    allowed = os.sched_getaffinity(0)
    if cpu not in allowed:
        raise ValueError(f"pin_to_cpu = {cpu}: this process may run on CPUs {sorted(allowed)} only")


def pin_calling_thread(cpu: int | None) -> set[int] | None:
    """Run the calling thread (and threads it starts from now on) on `cpu`; returns the CPUs it had."""
    if cpu is None:
        return None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    return before


def restore(cpus: set[int] | None) -> None:
    """Give the calling thread its CPUs back (the thread that called Processor.run goes on)."""
    if cpus is None:
        return
    with contextlib.suppress(OSError):  # its old CPUs are gone (cpuset changed): it stays where it is
        os.sched_setaffinity(0, cpus)
        return
    log.warning("could not give the calling thread its CPUs %s back", sorted(cpus))
