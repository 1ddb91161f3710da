"""`shm:NAME` — entries from a shared-memory ring that applications fill with ShmWriter.

The source creates the ring (or attaches to the one a previous run left, resuming at its
stored tail) and reads it in batches. The ring has no file descriptor to wait on: when
it is empty the source waits on its stop event with a back-off (50 µs up to `idle_wait`,
5 ms by default). See `logferry.collectors.shm_ring` for the layout and writer rules.

Counted here: entries overwritten before they were read (logferry_shm_overwrites_total,
exact, from entry numbers), entries writers dropped after their timeout and entries
writers cut to the slot size (logferry_source_errors_total, reasons `shm_writer_timeout`
and `frame_truncated`, from the ring's shared counters).
"""

from __future__ import annotations

from pydantic import Field

from logferry.collectors.shm_ring import _TIMEOUTS, RingError, ShmRing
from logferry.collectors.sources.base import Emit, Source
from logferry.config import StrictModel, validate
from logferry.errors import ConfigError
from logferry.metrics import SHM_OVERWRITES, SOURCE_ERRORS

MIN_IDLE_WAIT = 50e-6


class ShmOptions(StrictModel):
    slots: int = Field(4096, ge=2)
    slot_size: int = Field(1024, ge=32, multiple_of=8)  # bytes per slot, 16 of them header
    multi_writer: bool = False  # several writer processes: they share a POSIX semaphore
    batch: int = Field(4096, ge=1)
    idle_wait: float = Field(0.005, gt=0, le=1)


class ShmSource(Source):
    kind = "shm"

    def __init__(self, name: str, address: str, options: dict | None = None) -> None:
        super().__init__(name, address, options)
        self.opts = validate(ShmOptions, self.options, f"source {name!r} (shm) options")
        self.ring: ShmRing | None = None
        self._overwrites = SHM_OVERWRITES.labels(source=name)
        self._timeouts = SOURCE_ERRORS.labels(source=name, kind=self.kind, reason="shm_writer_timeout")
        self._timeouts_seen = 0

    def open(self) -> None:
        o = self.opts
        try:
            self.ring = ShmRing.create_or_attach(self.address, o.slots, o.slot_size, o.multi_writer)
        except RingError as e:
            raise ConfigError(f"source {self.name!r}: {e}") from None
        except OSError as e:
            raise ConfigError(f"source {self.name!r}: cannot open shm ring {self.address!r}: {e}") from None
        # Drops that happened before this run were counted by the run that saw them (or by nobody,
        # when the agent was down): report only what happens from now on.
        self._timeouts_seen = self.ring.words[_TIMEOUTS]

    def run(self, emit: Emit) -> None:
        ring = self.ring
        assert ring is not None, "open() first"
        wait = MIN_IDLE_WAIT
        while not self.stopping.is_set():
            entries, lost, truncated = ring.read(self.opts.batch)
            if lost:
                self._overwrites.inc(lost)
            for _ in range(truncated):
                self.error("frame_truncated")
            self._count_writer_timeouts(ring)
            if entries:
                self.emit_frames(emit, entries)
                wait = MIN_IDLE_WAIT
            else:
                self.stopping.wait(wait)
                wait = min(wait * 2, self.opts.idle_wait)

    def _count_writer_timeouts(self, ring: ShmRing) -> None:
        total = ring.words[_TIMEOUTS]
        if total > self._timeouts_seen:
            self._timeouts.inc(total - self._timeouts_seen)
            self._timeouts_seen = total

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()  # never unlinked here: writers keep their ring across agent restarts
            self.ring = None
