"""The public API: `Processor(group=..., topics=[...])`, `@app.handler`, `app.run()`, `app.stop()`."""

from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from logferry.config import validate
from logferry.errors import ConfigError
from logferry.kafka import KafkaSettings
from logferry.processors.commits import OffsetCommitter
from logferry.processors.config import ProcessorSection
from logferry.processors.control import ControlListener
from logferry.processors.exactly_once import ExactlyOnceRuntime
from logferry.processors.runtime import Hooks, Runtime

log = logging.getLogger("logferry.processors")
H = TypeVar("H", bound=Callable[..., Any])


class _FrozenWhileRunning:
    """`gc_freeze`, shared by the Processors of one process. Records in flight outlive the young
    generations, so full collections keep coming; each walked every object made at start-up
    (modules, clients) too. Frozen (gc.freeze), they are skipped. Each start freezes what exists
    then; the last Processor to stop unfreezes, unless the program had frozen objects of its own
    before the first start (gc cannot unfreeze selectively: those, and ours, stay frozen)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._program_froze = False

    def hold(self) -> None:
        with self._lock:
            if self._running == 0:
                self._program_froze = gc.get_freeze_count() > 0
            self._running += 1
            gc.freeze()

    def release(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0 and not self._program_froze:
                gc.unfreeze()


_FROZEN = _FrozenWhileRunning()


class Processor:
    """A consumer-group member that runs one handler over log entries.

    >>> app = Processor(group="billing", topics=["logs.app"], ordering="key", concurrency=64)
    >>> @app.handler
    ... def handle(entry, ctx): ...
    >>> app.run()  # until SIGTERM/SIGINT or app.stop()

    Keyword options are those of the `[processor]` config table (`ProcessorSection`):
    inline, max_in_flight, rate_limit, retries, retry_delays, dead_letter_topic, filter, ...
    `where` is an extra Python predicate on the entry, applied before the handler.
    """

    def __init__(
        self,
        group: str,
        topics: list[str],
        *,
        ordering: str = "key",
        concurrency: int = 64,
        kafka: KafkaSettings | None = None,
        bootstrap_servers: str | None = None,
        where: Callable[[dict[str, Any]], bool] | None = None,
        hooks: Hooks | None = None,
        committer: Callable[[Any], OffsetCommitter] | None = None,
        **options: Any,
    ) -> None:
        self.settings = validate(
            ProcessorSection,
            {"group": group, "topics": topics, "ordering": ordering, "concurrency": concurrency, **options},
            "Processor(...)",
        )
        if kafka is None:
            kafka = KafkaSettings(bootstrap_servers=bootstrap_servers) if bootstrap_servers else KafkaSettings()
        self.kafka = kafka
        self.where = where
        self.hooks = hooks or Hooks()
        self.committer = committer
        self._handler: Callable[..., Any] | None = None
        self._stop = threading.Event()
        self._runtime: Runtime | None = None
        self._created = threading.Event()
        self.control: ControlListener | None = None  # the live-replay listener while running

    def handler(self, fn: H) -> H:
        """Register `fn(entry, ctx)`: a plain function runs on worker threads (on the poll thread with
        `inline=True`), `async def` on an event loop."""
        self._handler = fn
        return fn

    def run(self, install_signals: bool = True) -> None:
        """Consume until stop(), SIGTERM or SIGINT; then finish in-flight work (within the grace) and leave."""
        if self._handler is None:
            raise ConfigError("Processor.run(): no handler registered (decorate a function with @app.handler)")
        control = ControlListener.for_settings(self.settings, self.kafka)  # live replay (`logferry replay`)
        runtime = ExactlyOnceRuntime if self.settings.exactly_once else Runtime
        try:
            self._runtime = runtime(
                self.settings, self.kafka, self._handler,
                predicate=self.where, hooks=control.hooks(self.hooks) if control else self.hooks,
                stop_event=self._stop, committer=self.committer,
            )  # fmt: skip
        except BaseException:  # e.g. a setting the handler cannot run with: no listener left behind
            if control is not None:
                control.close()
            raise
        self.control = control
        self._created.set()
        restore: dict[int, Any] = {}
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                restore[sig] = signal.signal(sig, lambda *_: self.stop())
        if self.settings.gc_freeze:
            _FROZEN.hold()
        try:
            self._runtime.run()
        finally:
            if self.settings.gc_freeze:
                _FROZEN.release()
            for sig, previous in restore.items():
                signal.signal(sig, previous)
            if control is not None:
                control.close()

    def stop(self) -> None:
        """Ask the member to stop; safe from any thread or a signal handler."""
        self._stop.set()

    def wait_assigned(self, timeout: float = 30.0) -> bool:
        """Block until this member has partitions (tests, readiness checks)."""
        return self._created.wait(timeout) and self.runtime.assigned_event.wait(timeout)

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the processor is not running")
        return self._runtime
