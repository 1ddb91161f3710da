"""Security defaults (issue 9): file and socket modes, loopback metrics, no secret in any output,
and SASL/SCRAM against a broker with a SASL_PLAINTEXT listener on loopback.

The canary password is set where a password goes (LOGFERRY_SASL_PASSWORD) and every output of
the run — stdout, stderr at DEBUG level, /metrics, error messages — is searched for it.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_support import record_fault
from test_durability import write_toml

from logferry.broker import LocalCluster, ephemeral_cluster
from logferry.broker.local import free_ports
from logferry.collectors.config import AgentConfig
from logferry.collectors.testing import RunningAgent, read_topic, wait_until
from logferry.config import validate
from logferry.kafka import KafkaSettings
from logferry.processors.config import ProcessorConfig

pytestmark = pytest.mark.kafka
CANARY = "Canary-7f3a9c-Passw0rd"
USER = "logferry-test"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sockets_0660_and_spool_and_checkpoint_files_0600(kafka_settings, make_topic, tmp_path):
    topic = make_topic()
    log = tmp_path / "app.log"
    log.write_text("".join(f"line {i}\n" for i in range(50)))
    state = tmp_path / "state"
    sources = [
        {"kind": "unix", "address": str(tmp_path / "s.sock"), "name": "s"},
        {"kind": "unixgram", "address": str(tmp_path / "g.sock"), "name": "g"},
        {"kind": "file", "address": str(log), "name": "f", "options": {"start_at": "beginning",
                                                                        "checkpoint_interval": 0.1}},
    ]  # fmt: skip
    cfg = {"kafka": {"bootstrap_servers": kafka_settings.bootstrap_servers}, "sources": sources,
           "route": {"topic": topic}, "agent": {"state_dir": str(state)}, "buffer": {"policy": "spill"}}  # fmt: skip
    old = os.umask(0o022)  # a common umask: the agent must not depend on a strict one
    try:
        with RunningAgent(cfg) as agent:
            wait_until(lambda: agent.sink.delivered_total >= 50, 30, "file lines delivered")
            wait_until(lambda: any((state / "checkpoints").glob("*")), 10, "a checkpoint written")
            assert mode(tmp_path / "s.sock") == 0o660
            assert mode(tmp_path / "g.sock") == 0o660
            files = [p for p in state.rglob("*") if p.is_file()]
            assert any("spool" in p.parts for p in files) and any("checkpoints" in p.parts for p in files)
            loose = {str(p.relative_to(state)): oct(mode(p)) for p in files if mode(p) & 0o077}
            assert not loose, f"state files readable by others: {loose}"
    finally:
        os.umask(old)


def test_metrics_listen_on_loopback_unless_configured():
    assert validate(AgentConfig, {}).metrics.address.startswith("127.0.0.1:")
    assert validate(ProcessorConfig, {"processor": {"group": "g", "topics": ["t"]}}).metrics.address.startswith(
        "127.0.0.1:"
    )


def run_and_capture(cmd: list[str], env: dict[str, str], seconds: float, metrics: str | None = None) -> str:
    """Run a long-lived command for `seconds`, scrape its /metrics once, SIGTERM it; all it said."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    scraped = ""
    try:
        if metrics:

            def scrape() -> bool:
                nonlocal scraped
                try:
                    scraped = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=2).read().decode()
                except OSError:
                    return proc.poll() is not None
                return True

            wait_until(scrape, 30, "metrics served")
        try:
            out, _ = proc.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return out + scraped


def sasl_toml(path: Path, bootstrap: str, topic: str, sock: Path | None = None, metrics: str | None = None) -> Path:
    data: dict = {"kafka": {"bootstrap_servers": bootstrap, "security_protocol": "SASL_PLAINTEXT",
                            "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": USER},
                  "route": {"topic": topic}, "metrics": {"enabled": metrics is not None, "address": metrics or ""},
                  "agent": {"grace_period": 2.0}}  # fmt: skip
    if sock is not None:
        data["sources"] = [{"kind": "unix", "address": str(sock), "name": "in"}]
    return write_toml(path, data)


def test_canary_password_appears_in_no_output(kafka_bootstrap, tmp_path):
    """A SASL client against a PLAINTEXT-only broker: handshakes fail; logs, metrics and errors stay clean."""
    env = {**os.environ, "LOGFERRY_SASL_PASSWORD": CANARY, "LOGFERRY_LOG_LEVEL": "DEBUG", "COLUMNS": "200"}
    metrics = f"127.0.0.1:{free_ports(1)[0]}"
    cfg = sasl_toml(tmp_path / "agent.toml", kafka_bootstrap, "canary", tmp_path / "in.sock", metrics)
    lf = [sys.executable, "-m", "logferry"]
    outputs = {
        "collect": run_and_capture([*lf, "collect", "--config", str(cfg)], env, 4, metrics),
        "config check": run_and_capture([*lf, "config", "check", str(cfg)], env, 30),
        "offsets show": run_and_capture([*lf, "offsets", "show", "--group", "g", "--config", str(cfg)], env, 20),
    }
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("[kafka]", f'[kafka]\nsasl_password = "{CANARY}"'))
    outputs["password in config"] = run_and_capture([*lf, "collect", "--config", str(bad)], env, 30)
    assert "collecting from" in outputs["collect"], outputs["collect"][-2000:]
    assert "logferry_kafka_connected" in outputs["collect"]
    leaked = [name for name, text in outputs.items() if CANARY in text]
    assert not leaked, f"the password appears in: {leaked}"


@pytest.fixture(scope="module")
def sasl_cluster() -> Iterator[LocalCluster]:
    with ephemeral_cluster(sasl_users={USER: CANARY}, heap="384m") as cluster:
        yield cluster


@pytest.mark.slow
def test_scram_delivers_and_a_wrong_password_fails_clearly(sasl_cluster, tmp_path):
    st = sasl_cluster.state()
    assert st is not None
    lf = [sys.executable, "-m", "logferry", "collect", "--source", "stdin"]
    cfg = sasl_toml(tmp_path / "agent.toml", st.sasl_bootstrap_servers, "sasl")
    lines = [f"over scram {i}" for i in range(200)]
    env = {**os.environ, "LOGFERRY_SASL_PASSWORD": CANARY}
    text = "".join(ln + "\n" for ln in lines)
    ok = subprocess.run([*lf, "--config", str(cfg)], input=text, text=True, capture_output=True, timeout=60, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    reader = KafkaSettings(
        bootstrap_servers=st.sasl_bootstrap_servers, security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256", sasl_username=USER, sasl_password_env="SCRAM_TEST_PW",
    )  # fmt: skip
    os.environ["SCRAM_TEST_PW"] = CANARY
    try:
        got = [d.entry["message"] for d in read_topic(reader, "sasl", len(lines), timeout=30, settle=0.5)]
    finally:
        del os.environ["SCRAM_TEST_PW"]
    assert sorted(got) == sorted(lines)
    record_fault(
        "SASL/SCRAM delivery", len(lines), len(got), None, len(set(lines) - set(got)), len(got) - len(set(got))
    )
    # The same agent with a wrong password: says so (authentication), never prints it, stops on SIGTERM.
    wrong = "Wrong-" + CANARY[::-1]
    sock = tmp_path / "in.sock"
    cfg2 = sasl_toml(tmp_path / "wrong.toml", st.sasl_bootstrap_servers, "sasl-wrong", sock)
    out = run_and_capture([sys.executable, "-m", "logferry", "collect", "--config", str(cfg2)],
                          {**os.environ, "LOGFERRY_SASL_PASSWORD": wrong}, 8)  # fmt: skip
    assert "authentication" in out.lower(), out[-2000:]
    assert wrong not in out and CANARY not in out
    assert not sock.exists(), "socket file left behind"
