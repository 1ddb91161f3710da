"""Fuzzing the framing, parsers and codec (issue 9): a bounded atheris run, or when atheris cannot
be imported here, a hypothesis loop over the same targets with a fixed example budget (said
out loud, never skipped). Every input in tests/fuzz_regressions/ is replayed.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz_targets import check
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TESTS = Path(__file__).parent
REGRESSIONS = sorted((TESTS / "fuzz_regressions").iterdir())
FUZZ_SECONDS = int(os.environ.get("LOGFERRY_FUZZ_SECONDS", "30"))
FALLBACK_EXAMPLES = 5000


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_fuzz_regressions(path):
    check(path.read_bytes())


@pytest.mark.slow
def test_fuzz_framing_parsers_codec(tmp_path):
    if importlib.util.find_spec("atheris") is None:
        print(f"\natheris is not installed: hypothesis fallback, {FALLBACK_EXAMPLES} examples")

        @settings(max_examples=FALLBACK_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=1024))
        def fuzz(data: bytes) -> None:
            check(data)

        fuzz()
        return
    cmd = [sys.executable, str(TESTS / "fuzz_targets.py"), f"-max_total_time={FUZZ_SECONDS}", "-max_len=2048",
           f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=FUZZ_SECONDS + 120)
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*"))
    found = {p.name: base64.b64encode(p.read_bytes()).decode() for p in crashes}
    runs = [ln for ln in run.stderr.splitlines() if "stat::number_of_executed_units" in ln]
    print(f"\natheris {FUZZ_SECONDS}s: {runs[0].split(':')[-1].strip() if runs else '?'} inputs")
    assert not found and run.returncode == 0, (
        f"fuzzing found {found} (base64); save each under tests/fuzz_regressions/ and fix.\n{run.stderr[-3000:]}"
    )
