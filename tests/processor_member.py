"""Handler for processor test members run as subprocesses (`logferry process --handler processor_member:handle`).

Each handled entry is one line `partition offset key seq pid`, written with one O_APPEND
write before the handler returns, so a SIGKILL loses no line of an entry that was done.
"""

from __future__ import annotations

import os
import random
import time

_fd = os.open(os.environ["LOGFERRY_TEST_HANDLED"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
_max_delay = float(os.environ.get("LOGFERRY_TEST_MAX_DELAY", "0.002"))
_pid = os.getpid()


def handle(entry, ctx):
    time.sleep(random.random() * _max_delay)
    key = ctx.key.decode()
    os.write(_fd, f"{ctx.partition} {ctx.offset} {key} {entry['attributes']['seq']} {_pid}\n".encode())
