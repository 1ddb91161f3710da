"""Malformed config and CLI input across commands (issue 9): a clear error naming the problem,
a non-zero exit, no traceback, and nothing half-started — no socket file left behind, no topic
created, no broker node spawned.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from logferry.kafka import KafkaSettings

pytestmark = pytest.mark.kafka

TOPIC = f"never-created-{uuid.uuid4().hex[:8]}"


def logferry(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(Path(__file__).parent), **(env or {})}
    return subprocess.run([sys.executable, "-m", "logferry", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60)  # fmt: skip


def agent_toml(bootstrap: str, extra: str) -> str:
    return (f'[kafka]\nbootstrap_servers = "{bootstrap}"\n[route]\ntopic = "{TOPIC}"\n[metrics]\nenabled = false\n'
            f'[[sources]]\nkind = "unix"\naddress = "a.sock"\n{extra}')  # fmt: skip


# (name, args, config text or None, what the error must mention)
CASES = [
    ("missing config", ["collect", "--config", "missing.toml"], None, "missing.toml"),
    ("toml syntax", ["collect", "--config", "c.toml"], "[[sources]\nkind =", "c.toml"),
    ("unknown key", ["collect", "--config", "c.toml"], "@@\n[buffer]\nmax_entires = 5\n", "max_entires"),
    ("bad value", ["collect", "--config", "c.toml"], "@@\n[buffer]\npolicy = \"sometimes\"\n", "policy"),
    ("unknown kind", ["collect", "--source", "nope:/x", "--topic", TOPIC], None, "nope"),
    ("bad metrics address", ["collect", "--config", "c.toml"], '[[sources]]\nkind = "unix"\naddress = "a.sock"\n'
     f'[route]\ntopic = "{TOPIC}"\n[metrics]\naddress = "localhost"\n', "metrics address"),
    ("second source fails to open", ["collect", "--config", "c.toml"],
     "@@\n[[sources]]\nkind = \"fifo\"\naddress = \"/nonexistent/dir/app.fifo\"\n", "/nonexistent/dir"),
    ("spool too small", ["collect", "--config", "c.toml"], "@@\n[buffer]\npolicy = \"spill\"\n[spool]\nmax_bytes = 5\n",
     "max_bytes"),
    ("handler module", ["process", "--handler", "no_such_module:handle", "--topic", TOPIC, "--group", "g"], None,
     "no_such_module"),
    ("handler attribute", ["process", "--handler", "processor_member:nope", "--topic", TOPIC, "--group", "g"], None,
     "nope"),
    ("process bad ordering", ["process", "--handler", "processor_member:handle", "--topic", TOPIC, "--group", "g",
                              "--ordering", "sideways"], None, "sideways"),
    ("offsets without group", ["offsets", "show"], None, "--group"),
    ("spool check missing dir", ["spool", "check", "no/such/dir"], None, "no/such/dir"),
    ("broker zero nodes", ["broker", "start", "--nodes", "0"], None, "nodes"),
    ("config check bad file", ["config", "check", "c.toml"],
     '[[sources]]\nkind = "unix"\n[kafka]\nsecurity_protocol = "SASL_PLAINTEXT"\n', "sasl_mechanism"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "args", "config", "mention"), CASES, ids=[c[0] for c in CASES])
def test_malformed_input_fails_clearly_and_starts_nothing(kafka_bootstrap, tmp_path, name, args, config, mention):
    if config is not None:
        text = config.replace("@@\n", agent_toml(kafka_bootstrap, ""))
        (tmp_path / "c.toml").write_text(text)
    env = {"LOGFERRY_BROKER_HOME": str(tmp_path / "broker"), "LOGFERRY_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "LOGFERRY_STATE_DIR": str(tmp_path / "state"), "LOGFERRY_TEST_HANDLED": str(tmp_path / "h.log")}  # fmt: skip
    run = logferry(*args, cwd=tmp_path, env=env)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "Traceback" not in out, out
    assert mention.lower() in out.lower(), out
    assert not list(tmp_path.glob("*.sock")), "a socket file was left behind"
    assert not (tmp_path / "broker" / "cluster.json").exists(), "a broker was started"


def test_no_topic_was_created_by_the_failed_commands(kafka_bootstrap):
    topics = KafkaSettings(bootstrap_servers=kafka_bootstrap).admin().list_topics(timeout=10).topics
    assert TOPIC not in topics
