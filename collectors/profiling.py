"""Opt-in per-thread profiling: LOGFERRY_PROFILE_DIR=DIR makes each agent thread dump cProfile stats there.

`python -m cProfile` sees only the main thread, while the agent's work happens in the
source and sink threads; `logferry bench ingest --profile` sets this and merges the files.
"""

from __future__ import annotations

import cProfile
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "LOGFERRY_PROFILE_DIR"


def profiled(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    target = os.environ.get(ENV)
    if not target:
        return fn

    def run(*args: Any) -> Any:
        prof = cProfile.Profile()
        prof.enable()
        try:
            return fn(*args)
        finally:
            prof.disable()
            prof.dump_stats(Path(target) / f"{name}.prof")

    return run
