"""The agent: sources (a thread each) → pipeline → bounded buffer → Kafka sink, plus /metrics.

Signals:
- SIGTERM / SIGINT: stop reading, drain the buffer into Kafka within `agent.grace_period`,
  log what could not be delivered, exit 0. A second one exits at once (status 1).
- SIGHUP: re-read the config file. Sources whose settings changed are restarted, the
  pipeline (parser, filter, route, key) is swapped; buffered entries stay where they are.
  Changes to [kafka], [sink] and [buffer] need a restart and are reported as such.

When every source is finite (stdin) the agent exits once they ended and everything read
is delivered (0), or Kafka refused some of it for good (1).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logferry import __version__, affinity
from logferry.collectors.buffer import SOURCE, UNDELIVERED, Buffer, BufferClosed, Record, Spill
from logferry.collectors.config import AgentConfig, SourceSettings
from logferry.collectors.fsutil import default_state_dir
from logferry.collectors.pipeline import Pipeline
from logferry.collectors.profiling import profiled
from logferry.collectors.sink import AckCallback, KafkaSink
from logferry.collectors.sources import source_class
from logferry.collectors.sources.base import Frames, Source
from logferry.collectors.spill import make_spill
from logferry.config import deep_merge, read_toml, validate
from logferry.errors import ConfigError, LogferryError
from logferry.metrics import BUILD_INFO, SOURCE_ERRORS, Health, MetricsServer

log = logging.getLogger("logferry.agent")
TICK = 0.2  # how often the main loop flushes quiet multiline entries and checks for work
RESTART_DELAY = 1.0  # before restarting a source whose run() raised
CARRY_PUT_TIMEOUT = 0.05  # the main thread's longest wait per source for buffer room: signals come first

# The disk spool (issue 4) plugs in here: given the config, return the Spill for `policy = "spill"`.
SpillFactory = Callable[[AgentConfig], Spill]


def build_source(s: SourceSettings, state_dir: Path | None = None) -> Source:
    cls = source_class(s.kind)
    assert s.name is not None  # AgentConfig names every source
    options = dict(s.options)
    if s.kind == "file":  # checkpoints live in the agent's state dir
        options.setdefault("state_dir", str(state_dir or default_state_dir()))
    return cls(s.name, s.address, options)


def default_parsers(config: AgentConfig) -> dict[str, str]:
    """A source class may name the parser its channel speaks (syslog → syslog) via `default_parser`."""
    out = {}
    for s in config.sources:
        kind = getattr(source_class(s.kind), "default_parser", None)
        if kind:
            out[s.kind] = kind
    return out


@dataclass(slots=True)
class _Lane:
    """One source's way into the buffer, shared by its thread and the main thread.

    `process` guards "which pipeline, and process with it" against a reload or an expiry touching the
    same multiline joiners; `put` lets one thread at a time put this source's entries, so they reach
    the buffer in the order they were read. `carry`: older entries (multiline entries released by a
    reload or an expiry) that go into the buffer before anything the source reads next.
    """

    process: threading.Lock = field(default_factory=threading.Lock)
    put: threading.Lock = field(default_factory=threading.Lock)
    carry: list[Record] = field(default_factory=list)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        config_path: Path | None = None,
        overrides: dict[str, Any] | None = None,
        extra_sources: list[dict[str, Any]] | None = None,
        spill_factory: SpillFactory | None = make_spill,
    ) -> None:
        """`overrides` and `extra_sources` (from CLI flags) are applied again on every reload."""
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.extra_sources = extra_sources or []
        self.spill_factory = spill_factory
        self.sources: dict[str, Source] = {}
        self._settings: dict[str, SourceSettings] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lanes: dict[str, _Lane] = {}
        # Source name → its acknowledgement callback. One mapping, shared with the spool (spill policy)
        # and updated as SIGHUP starts and stops sources, so a new source object gets its acks.
        self._acks: dict[str, AckCallback] = {}
        self._finished: set[str] = set()
        self._wakeup = threading.Event()
        self._signals: list[int] = []
        self._stop_requests = 0
        self.pipeline: Pipeline | None = None
        self.buffer: Buffer | None = None
        self.sink: KafkaSink | None = None
        self.metrics: MetricsServer | None = None
        self.undelivered = 0
        self._free_cpus: set[int] | None = None  # the CPUs run()'s thread had before `pin_to_cpu`

    # ---- start-up ---------------------------------------------------------------------
    def _start(self) -> None:
        cfg = self.config
        if not cfg.sources:
            raise ConfigError("no sources: add [[sources]] to the config or pass --source KIND:ADDRESS")
        spill = None
        if cfg.buffer.policy == "spill":
            if self.spill_factory is None:
                raise ConfigError("buffer.policy: 'spill' needs the disk spool, which this agent was built without")
            spill = self.spill_factory(cfg)
        self.pipeline = Pipeline(cfg, default_parsers(cfg), self._settle)
        opened: list[Source] = []
        try:
            for s in cfg.sources:
                src = build_source(s, cfg.agent.state_dir)
                src.open()
                opened.append(src)
                self.sources[src.name] = src
                self._settings[src.name] = s
        except BaseException:
            for src in opened:
                src.close()
            raise
        try:  # nothing half-started: a failure below (e.g. metrics address in use) closes the sources again
            self.buffer = Buffer(cfg.buffer.max_entries, cfg.buffer.max_bytes, cfg.buffer.policy, spill, self._settle)
            for src in self.sources.values():
                if type(src).delivered is not Source.delivered:
                    self._acks[src.name] = src.delivered
            self.sink = KafkaSink(cfg.kafka, cfg.sink, self.buffer, self._acks, self._free_cpus)
            if spill is not None and hasattr(spill, "attach"):
                spill.attach(self.sink, self._acks)  # spooled records: acked to the spool, then to their source
            self.sink.start()
            if cfg.metrics.enabled:
                health = Health()
                sink = self.sink
                health.alive = lambda: sink._thread.is_alive()
                health.ready = lambda: sink._thread.is_alive() and bool(self.sources)
                self.metrics = MetricsServer(cfg.metrics.address, health).start()
        except BaseException:
            if self.sink is not None:
                self.sink.stop_now()
            for src in opened:
                src.close()
            if spill is not None and hasattr(spill, "close"):
                spill.close()
            raise
        BUILD_INFO.info({"version": __version__, "role": "agent"})
        for name in self.sources:
            self._spawn(name)
        log.info(
            "collecting from %s into Kafka at %s",
            ", ".join(f"{s.kind}:{s.address or '-'} ({s.name})" for s in cfg.sources),
            cfg.kafka.bootstrap_servers,
        )

    def _spawn(self, name: str) -> None:
        self._lane(name)
        t = threading.Thread(
            target=profiled(self._run_source, f"source-{name}"),
            args=(self.sources[name],),
            name=f"source-{name}",
            daemon=True,
        )
        self._threads[name] = t
        t.start()

    def _run_source(self, src: Source) -> None:
        while not src.stopping.is_set():
            try:
                src.run(self.emit)
            except BufferClosed:
                return
            except Exception:
                SOURCE_ERRORS.labels(source=src.name, kind=src.kind, reason="crashed").inc()
                log.exception("source %s crashed; restarting it in %.0fs", src.name, RESTART_DELAY)
                src.stopping.wait(RESTART_DELAY)
                continue
            if src.finite:
                break
        self._finished.add(src.name)
        self._wakeup.set()

    def _settle(self, source: str, tokens: Sequence[Any]) -> None:
        """Entries dropped by the filter or a buffer policy will never be acked: settle them now."""
        src = self.sources.get(source)
        if src is not None:
            src.delivered(tokens)

    def emit(self, batch: Frames) -> None:
        """What every source calls: parse/route/encode, then into the buffer (may block: backpressure)."""
        assert self.pipeline is not None and self.buffer is not None
        lane = self._lane(batch.source)
        with lane.put:
            with lane.process:
                records = self.pipeline.process(batch)
                if lane.carry:
                    records = [*lane.carry, *records]
                    lane.carry = []
            if records:
                self.buffer.put(records)

    def _lane(self, source: str) -> _Lane:
        lane = self._lanes.get(source)
        return lane if lane is not None else self._lanes.setdefault(source, _Lane())

    @contextmanager
    def _sources_paused(self) -> Iterator[None]:
        """No source processes a batch meanwhile (a put in progress goes on; it holds older entries)."""
        with ExitStack() as stack:
            for lane in list(self._lanes.values()):
                stack.enter_context(lane.process)
            yield

    def _carry(self, records: Iterable[Record]) -> None:
        """Hand entries the main thread released to their sources' lanes (with _sources_paused held)."""
        for r in records:
            self._lane(r[SOURCE]).carry.append(r)

    def _put_carried(self, timeout: float) -> None:
        """Put carried entries of sources whose own thread is not putting, waiting at most `timeout`
        each; what does not fit stays carried, to be offered again next tick. A source busy putting
        takes its carry along with its next batch."""
        assert self.buffer is not None
        for name, lane in list(self._lanes.items()):
            if not lane.carry:
                if name not in self.sources:
                    self._lanes.pop(name, None)  # a removed source whose last entries are in
                continue
            if not lane.put.acquire(blocking=False):
                continue
            try:
                with lane.process:
                    carry, lane.carry = lane.carry, []
                rest = self.buffer.put(carry, timeout=timeout)
                if rest:
                    with lane.process:
                        lane.carry = [*rest, *lane.carry]
            finally:
                lane.put.release()

    # ---- the main loop ----------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        try:
            # `pin_to_cpu`: this thread and every thread it starts from here (sources, sink, metrics)
            # on one CPU; the sink makes its producers on the CPUs this thread had.
            self._free_cpus = affinity.pin_calling_thread(self.config.agent.pin_to_cpu)
            self._start()
            while True:
                self._wakeup.wait(TICK)
                self._wakeup.clear()
                assert self.pipeline is not None and self.buffer is not None
                if self._signals:
                    sig = self._signals.pop(0)
                    if sig == signal.SIGHUP:
                        self.reload()
                        continue
                    log.info("%s: stopping; draining into Kafka for up to %.0fs", signal.Signals(sig).name,
                             self.config.agent.grace_period)  # fmt: skip
                    return self._shutdown(self.config.agent.grace_period, finite=False)
                with self._sources_paused():
                    self._carry(self.pipeline.expired())
                self._put_carried(CARRY_PUT_TIMEOUT)
                if all(s.finite for s in self.sources.values()) and set(self.sources) <= self._finished:
                    # Bounded by librdkafka's delivery timeout: after it every entry is acked or failed.
                    return self._shutdown(self.config.sink.delivery_timeout_ms / 1000 + 5, finite=True)
        finally:
            affinity.restore(self._free_cpus)
            self._restore_signals()

    def _shutdown(self, grace: float, finite: bool) -> int:
        assert self.pipeline is not None and self.buffer is not None and self.sink is not None
        deadline = time.monotonic() + grace
        for src in self.sources.values():
            src.stop()
        for name, t in self._threads.items():
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("source %s did not stop in time", name)
        with self._sources_paused():
            self._carry(self.pipeline.flush())  # pending multiline entries, behind what their sources read
        not_put = self._put_carried_until(deadline)
        left = self.sink.drain(max(0.0, deadline - time.monotonic()))
        self.buffer.close()  # a source still stuck in put gets BufferClosed; what it held is counted
        spill = self.buffer.spill
        close_spill = getattr(spill, "close", None)
        if close_spill is not None:
            # Before sink.close(), which purges what the producer holds (never acknowledged: it stays spooled).
            close_spill()  # an append still waiting for spool room ends, and what it held is counted
        for t in self._threads.values():
            t.join(1.0)  # sources that were stuck in a put end now
        # Left in memory only (not spooled): counted as undelivered. What the producer holds is
        # counted by sink.close()'s purge (delivery failures, reason _PURGE_QUEUE).
        self.buffer.discard()
        for src in self.sources.values():
            src.close()
        if self.metrics is not None:
            self.metrics.stop()
        sink = self.sink
        left += not_put + self.buffer.refused + getattr(spill, "unstored", 0)
        self.undelivered = left + sink.failed_total
        log.info(
            "stopped: %d entr(y/ies) delivered, %d refused by Kafka, %d not delivered within the grace period",
            sink.delivered_total, sink.failed_total, left,
        )  # fmt: skip
        sink.close()
        if finite and self.undelivered:
            return 1
        return 0

    def _put_carried_until(self, deadline: float) -> int:
        """At shutdown: put every carried entry by `deadline`; count the rest as undelivered (returned)."""
        assert self.buffer is not None
        lost = 0
        for name, lane in list(self._lanes.items()):
            if not lane.carry:
                continue
            # A source still blocked in its own put holds older entries: wait for it, up to the deadline.
            if lane.put.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    with lane.process:
                        carry, lane.carry = lane.carry, []
                    rest = self.buffer.put(carry, timeout=max(0.0, deadline - time.monotonic()))
                finally:
                    lane.put.release()
            else:
                with lane.process:
                    rest, lane.carry = lane.carry, []
            if rest:
                lost += len(rest)
                UNDELIVERED.inc(len(rest))
                log.warning("source %s: %d pending entr(y/ies) found no buffer room before the deadline", name,
                            len(rest))  # fmt: skip
        return lost

    # ---- signals ----------------------------------------------------------------------
    def _install_signals(self) -> None:
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # tests drive the agent from a thread and call request_stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, sig: int, _frame: Any) -> None:
        if sig != signal.SIGHUP and self._stop_requests:
            left = (len(self.buffer) if self.buffer else 0) + (self.sink.in_flight if self.sink else 0)
            sys.stderr.write(f"logferry: second {signal.Signals(sig).name}: exiting now, {left} entries undelivered\n")
            os._exit(1)
        self.request(sig)

    def request(self, sig: int) -> None:
        """Ask the main loop to act on a signal (also how tests stop or reload an agent)."""
        if sig != signal.SIGHUP:
            self._stop_requests += 1
        self._signals.append(sig)
        self._wakeup.set()

    # ---- reload -----------------------------------------------------------------------
    def reload(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP: no config file to reload (started from flags only)")
            return
        try:
            data = deep_merge(read_toml(self.config_path), self.overrides)
            if self.extra_sources:
                data["sources"] = [*data.get("sources", []), *self.extra_sources]
            new = validate(AgentConfig, data, str(self.config_path))
            pipeline = Pipeline(new, default_parsers(new), self._settle)
        except LogferryError as e:
            log.error("SIGHUP: keeping the running config; the new one is invalid:\n%s", e)
            return
        for section in ("kafka", "sink", "buffer", "metrics"):
            if getattr(new, section) != getattr(self.config, section):
                log.warning("SIGHUP: changes to [%s] take effect only after a restart", section)
        if new.agent.pin_to_cpu != self.config.agent.pin_to_cpu:
            log.warning("SIGHUP: a change of agent.pin_to_cpu takes effect only after a restart")
        old_pipeline = self.pipeline
        assert old_pipeline is not None
        self.config = new
        wanted = {s.name: s for s in new.sources}
        for name in list(self.sources):  # stopped under the old pipeline: their last reads are processed by it
            if wanted.get(name) != self._settings[name]:
                self._stop_source(name)
        # The swap, with every source paused between batches: the old joiners' pending entries are
        # carried ahead of whatever each source reads next, and none is fed after its flush.
        with self._sources_paused():
            self._carry(old_pipeline.flush())
            self.pipeline = pipeline
        for name, s in wanted.items():
            if name not in self.sources:
                self._add_source(s)
        self._put_carried(CARRY_PUT_TIMEOUT)
        log.info("SIGHUP: config reloaded from %s (%d source(s))", self.config_path, len(self.sources))

    def _stop_source(self, name: str) -> None:
        src = self.sources.pop(name)
        src.stop()
        self._threads.pop(name).join(10)
        src.close()
        self._settings.pop(name)
        self._acks.pop(name, None)  # the closed source takes no more acks; a restarted one registers its own
        self._finished.discard(name)

    def _add_source(self, s: SourceSettings) -> None:
        assert s.name is not None and self.sink is not None
        try:
            src = build_source(s, self.config.agent.state_dir)
            src.open()
        except LogferryError as e:
            log.error("SIGHUP: source %s not started: %s", s.name, e)
            return
        self.sources[s.name] = src
        self._settings[s.name] = s
        if type(src).delivered is not Source.delivered:
            self._acks[s.name] = src.delivered  # the spool forwards through this same mapping
            self.sink.set_ack(s.name, src.delivered)
        self._spawn(s.name)
