"""`pin_to_cpu` (agent and processor): the Python threads on one CPU (Linux), Kafka clients' threads free.

The GIL lets one Python thread run bytecode at a time, yet the kernel spreads a process's threads
over all cores: every hand-off between them (a processor's poll thread and its workers, an agent's
source and sink threads) then moves the GIL, and the objects they share, from core to core. Pinned
to one CPU they ran faster (see README's benchmarks; which of the two costs more is not measured).
librdkafka's threads work outside the GIL: clients made before the pin, or inside `unpinned`,
keep the CPUs the thread had before it was pinned.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger("logferry.affinity")
_unpinned_cpus: set[int] | None = None  # the CPUs of the first thread this process pinned, before


def check_cpu(cpu: int) -> None:
    """Raise ValueError unless this process may run on `cpu` (checked with the config, before any client;
    on a reload from a pinned thread, against the CPUs it had before)."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("pin_to_cpu needs Linux (os.sched_setaffinity)")
    allowed = _unpinned_cpus or os.sched_getaffinity(0)
    if cpu not in allowed:
        raise ValueError(f"pin_to_cpu = {cpu}: this process may run on CPUs {sorted(allowed)} only")


def pin_calling_thread(cpu: int | None) -> set[int] | None:
    """Run the calling thread (and threads it starts from now on) on `cpu`; returns the CPUs it had."""
    global _unpinned_cpus
    if cpu is None:
        return None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    if _unpinned_cpus is None:
        _unpinned_cpus = before
    return before


def restore(cpus: set[int] | None) -> None:
    """Give the calling thread its CPUs back (the thread that called run() goes on)."""
    if cpus is None:
        return
    with contextlib.suppress(OSError):  # its old CPUs are gone (cpuset changed): it stays where it is
        os.sched_setaffinity(0, cpus)
        return
    log.warning("could not give the calling thread its CPUs %s back", sorted(cpus))


@contextlib.contextmanager
def unpinned(cpus: set[int] | None) -> Iterator[None]:
    """The block runs on `cpus` (what `pin_calling_thread` returned), so a Kafka client made in it
    starts its threads there; then the thread is pinned again. None: nothing pinned, nothing to do."""
    if cpus is None:
        yield
        return
    pinned = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:  # those CPUs are gone (cpuset changed): the client starts pinned, which only costs speed
        log.warning("cannot leave the pinned CPU for %s; a Kafka client starts its threads pinned", sorted(cpus))
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # the pinned CPU is gone: the thread stays where it is
            os.sched_setaffinity(0, pinned)
