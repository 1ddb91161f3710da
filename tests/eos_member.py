"""Handler for exactly-once test members (`logferry process --exactly-once --handler eos_member:handle`).

Returns one result per entry naming the input record, so a reader of the output topic can
check that each input's result appears exactly once.
"""

from __future__ import annotations

import os
import random
import time

_max_delay = float(os.environ.get("LOGFERRY_TEST_MAX_DELAY", "0.002"))


def handle(entry, ctx):
    time.sleep(random.random() * _max_delay)
    return f"{ctx.partition} {ctx.offset} {ctx.key.decode()} {entry['attributes']['seq']}"
