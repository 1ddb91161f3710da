"""The demo's processor handler: `logferry process --handler logferry.demo.handler:record`.

It records what it handled — service (the key), seq, partition, offset, handle time — one line
per call into `$LOGFERRY_DEMO_RECORDS/<pid>.tsv`, so the demo can check per-key order and
completeness across both members of the group. Each line is one O_APPEND write: a line is
never torn, and nothing waits in a buffer when the member is stopped.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

RECORDS_ENV = "LOGFERRY_DEMO_RECORDS"


class Recorder:
    def __init__(self) -> None:
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _open(self) -> int:
        directory = os.environ.get(RECORDS_ENV)
        if not directory:
            raise RuntimeError(f"{RECORDS_ENV} is not set: the demo handler needs a directory for its records")
        path = os.path.join(directory, f"{os.getpid()}.tsv")
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, entry: dict[str, Any], ctx: Any) -> None:
        seq = entry["attributes"].get("seq", "-1")
        line = f"{entry['service']}\t{seq}\t{ctx.partition}\t{ctx.offset}\t{time.time_ns()}\n".encode()
        with self._lock:  # handlers of different keys run on parallel threads
            if self._fd is None:
                self._fd = self._open()
            os.write(self._fd, line)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


record = Recorder()
