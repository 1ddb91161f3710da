"""`posix_mq:/name` — a POSIX message queue (mq_open via posix_ipc); one message = one entry.

On Linux a queue descriptor is a file descriptor, so the source waits in poll() on it
(plus a wake-up pipe) and then drains the queue without blocking, in batches. Messages
left in the queue when the agent stops stay in the kernel for the next start. Message
priorities are the kernel's business (higher ones are received first); they are not kept.
"""

from __future__ import annotations

import re
import select

import posix_ipc
from pydantic import Field

from logferry.collectors.sources.base import Emit, Source
from logferry.collectors.sources.ipcutil import FileMode, Waker, message_frames
from logferry.config import StrictModel, validate
from logferry.errors import ConfigError

_QUEUE_NAME = re.compile(r"/[^/\x00]{1,254}")
LIMITS_HINT = "Linux limits: /proc/sys/fs/mqueue/msg_max and msgsize_max (for non-root users)"


class PosixMqOptions(StrictModel):
    create: bool = True  # create the queue if it does not exist
    mode: FileMode = 0o660
    # Only used when the source creates the queue; an existing queue keeps its own attributes.
    max_messages: int = Field(posix_ipc.QUEUE_MESSAGES_MAX_DEFAULT, ge=1)
    max_message_size: int = Field(posix_ipc.QUEUE_MESSAGE_SIZE_MAX_DEFAULT, ge=1)
    batch: int = Field(1000, ge=1)  # messages handed on together


class PosixMqSource(Source):
    kind = "posix_mq"

    def __init__(self, name: str, address: str, options: dict | None = None) -> None:
        super().__init__(name, address, options)
        self.opts = validate(PosixMqOptions, self.options, f"source {name!r} (posix_mq) options")
        self.queue: posix_ipc.MessageQueue | None = None
        self._waker = Waker()

    def open(self) -> None:
        where = f"source {self.name!r}: posix_mq queue {self.address!r}"
        if not _QUEUE_NAME.fullmatch(self.address):
            raise ConfigError(f"{where}: a queue name is one leading slash and a name, e.g. posix_mq:/app-logs")
        o = self.opts
        try:
            self.queue = posix_ipc.MessageQueue(
                self.address,
                posix_ipc.O_CREAT if o.create else 0,
                mode=o.mode,
                max_messages=o.max_messages,
                max_message_size=o.max_message_size,
                read=True,
                write=False,
            )
        except posix_ipc.ExistentialError:
            raise ConfigError(f"{where} does not exist (create = false: create it or set create = true)") from None
        except posix_ipc.PermissionsError as e:
            raise ConfigError(f"{where}: permission denied ({e})") from None
        except (ValueError, OSError) as e:
            raise ConfigError(f"{where}: cannot open ({e}; {LIMITS_HINT})") from None
        self.queue.block = False

    def run(self, emit: Emit) -> None:
        queue = self.queue
        assert queue is not None, "open() first"
        poller = select.poll()
        poller.register(queue.mqd, select.POLLIN)
        poller.register(self._waker.fd, select.POLLIN)
        batch_size, receive = self.opts.batch, queue.receive
        while not self.stopping.is_set():
            poller.poll()
            self._waker.drain()
            while not self.stopping.is_set():
                batch: list[bytes] = []
                append = batch.append
                try:
                    for _ in range(batch_size):
                        append(receive()[0])
                except posix_ipc.BusyError:
                    pass  # drained
                self._emit_nonempty(emit, batch)
                if len(batch) < batch_size:
                    break

    def _emit_nonempty(self, emit: Emit, batch: list[bytes]) -> None:
        frames, empty = message_frames(batch)
        for _ in range(empty):
            self.error("empty_message")
        self.emit_frames(emit, frames)

    def wake(self) -> None:
        self._waker.wake()

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()  # never unlink: unread messages stay for the next start
            self.queue = None
        self._waker.close()
