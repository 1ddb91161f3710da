"""`sysv_mq:KEY` — a SysV message queue (msgget/msgrcv via sysv_ipc); one message = one entry.

The message type becomes the attribute `mq_type`, so routing and filters can use it
(`logs.{mq_type}`, or `key = "mq_type"`). SysV queues have no file descriptor to poll:
the source drains the queue without blocking and, when it is empty, waits on its stop
event with a short back-off (50 µs up to `idle_wait`, 20 ms by default), which bounds
both the idle latency and the idle CPU.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import sysv_ipc
from pydantic import Field

from logferry.collectors.sources.base import Emit, Source
from logferry.collectors.sources.ipcutil import FileMode, message_frames
from logferry.config import StrictModel, validate
from logferry.errors import ConfigError
from logferry.log import LogOnce

log = logging.getLogger("logferry.sources.sysv_mq")
log_once = LogOnce(log)

MIN_IDLE_WAIT = 50e-6
KEY_RANGE = (-(1 << 31), (1 << 32) - 1)  # key_t is 32 bits; ipcs shows keys unsigned


def kernel_msgmax() -> int:
    """The largest message the kernel accepts; receiving with this size never fails with E2BIG."""
    try:
        return int(Path("/proc/sys/kernel/msgmax").read_text())
    except (OSError, ValueError):
        return 8192


def parse_key(address: str) -> int:
    """`KEY` as decimal or 0x-hex; the signed 32-bit value msgget wants."""
    try:
        key = int(address, 0)
    except ValueError:
        raise ConfigError(f"sysv_mq key {address!r} is not an integer (decimal or 0x-hex, e.g. 0x4c4f47)") from None
    if key == 0 or not KEY_RANGE[0] <= key <= KEY_RANGE[1]:
        raise ConfigError(f"sysv_mq key {address!r} must be a non-zero 32-bit integer (0 is IPC_PRIVATE)")
    return key - (1 << 32) if key >= 1 << 31 else key


class SysvMqOptions(StrictModel):
    create: bool = True  # create the queue if it does not exist
    mode: FileMode = 0o660
    type: int = 0  # receive only this message type; 0 = every type
    batch: int = Field(1000, ge=1)
    idle_wait: float = Field(0.02, gt=0, le=1)  # longest pause between polls of an empty queue


class SysvMqSource(Source):
    kind = "sysv_mq"

    def __init__(self, name: str, address: str, options: dict | None = None) -> None:
        super().__init__(name, address, options)
        self.opts = validate(SysvMqOptions, self.options, f"source {name!r} (sysv_mq) options")
        self.queue: sysv_ipc.MessageQueue | None = None
        self._max_size = kernel_msgmax()
        self._gone = False  # the queue was removed under us and is not back yet

    def open(self) -> None:
        try:
            self.key = parse_key(self.address)
        except ConfigError as e:
            raise ConfigError(f"source {self.name!r}: {e}") from None
        self.queue = self._attach(self.opts.create)

    def _attach(self, create: bool) -> sysv_ipc.MessageQueue:
        where = f"source {self.name!r}: sysv_mq queue with key {self.address}"
        try:
            return sysv_ipc.MessageQueue(
                self.key, sysv_ipc.IPC_CREAT if create else 0, mode=self.opts.mode, max_message_size=self._max_size
            )
        except sysv_ipc.ExistentialError:
            raise ConfigError(f"{where} does not exist (create = false: create it or set create = true)") from None
        except sysv_ipc.PermissionsError as e:
            raise ConfigError(f"{where}: permission denied ({e})") from None
        except (ValueError, OSError) as e:
            raise ConfigError(f"{where}: cannot open ({e})") from None

    def run(self, emit: Emit) -> None:
        wait = MIN_IDLE_WAIT
        while not self.stopping.is_set():
            got = self._drain_once(emit)
            if got:
                wait = MIN_IDLE_WAIT
            else:
                self.stopping.wait(wait)
                wait = min(wait * 2, self.opts.idle_wait)

    def _drain_once(self, emit: Emit) -> int:
        """Receive up to one batch and hand it on, one Frames per run of equal message types."""
        queue = self.queue
        assert queue is not None, "open() first"
        received: list[tuple[bytes, int]] = []
        append, receive, wanted = received.append, queue.receive, self.opts.type
        try:
            for _ in range(self.opts.batch):
                append(receive(block=False, type=wanted))
        except sysv_ipc.BusyError:
            pass  # drained
        except sysv_ipc.ExistentialError:
            self._queue_removed()
        except OSError as e:
            if e.errno != errno.E2BIG:
                raise
            # msgmax was raised after we started: a larger message waits; read with the new limit.
            self._max_size = max(self._max_size * 2, kernel_msgmax())
            self.queue = self._attach(create=False)
        self._emit_runs(emit, received)
        return len(received)

    def _emit_runs(self, emit: Emit, received: list[tuple[bytes, int]]) -> None:
        """One Frames per run of equal message types (they become the `mq_type` attribute)."""
        if not received:
            return
        types = [t for _, t in received]
        if types.count(types[0]) == len(types):  # the common case: one type, one batch
            self._emit_run(emit, [m for m, _ in received], types[0])
            return
        start = 0
        for i in range(1, len(received) + 1):
            if i == len(received) or types[i] != types[start]:
                self._emit_run(emit, [m for m, _ in received[start:i]], types[start])
                start = i

    def _emit_run(self, emit: Emit, messages: list[bytes], mq_type: int) -> None:
        frames, empty = message_frames(messages)
        for _ in range(empty):
            self.error("empty_message")
        self.emit_frames(emit, frames, attributes={"mq_type": str(mq_type)})

    def _queue_removed(self) -> None:
        """Someone ran ipcrm: count it, and recreate the queue when allowed (else wait for it)."""
        if not self._gone:
            self._gone = True
            self.error("queue_removed")
            log_once.warning("queue_removed", "source %r: sysv_mq queue %s was removed", self.name, self.address)
        try:
            self.queue = self._attach(self.opts.create)
            self._gone = False
        except ConfigError:
            self.stopping.wait(self.opts.idle_wait)  # not back yet; the run loop tries again

    def close(self) -> None:
        self.queue = None  # a SysV queue has no per-process handle to release; never remove it
