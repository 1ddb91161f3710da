"""Every dashboard query and alert expression, run on Debian's Prometheus scraping a real pipeline.

One scenario per module: a real `logferry collect` agent fed by docker/loadgen.py plus a few
crafted entries (an oversize one and filtered ones: drops; poison ones: retries and dead
letters), a 2-member `logferry process` group that is rate-limited below the input (lag,
paused partitions), whose second member then stops (a rebalance, `up == 0`). Prometheus
scrapes all three every second and evaluates dashboards/alerts.yml; the tests poll its
HTTP API with deadlines until each query answers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
import yaml
from confluent_kafka.admin import NewTopic

from logferry.kafka import KafkaSettings

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[1]
LOGFERRY = str(Path(sys.executable).with_name("logferry"))
RATE_INTERVAL = "5s"  # what Grafana's $__rate_interval is at a 1s scrape interval (4 scrapes, rounded up)
DEADLINE = float(os.environ.get("DASH_DEADLINE", "90"))
T = TypeVar("T")


def load_lint() -> ModuleType:
    spec = importlib.util.spec_from_file_location("logferry_dashboards_lint", ROOT / "dashboards" / "lint.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lint = load_lint()

HANDLER = '''
import time

def handle(entry, ctx):
    """Fails on poison entries (retries, then the dead-letter topic); a little work otherwise."""
    if "poison" in (entry.get("message") or ""):
        raise ValueError("poison entry")
    time.sleep(0.005)
'''


# ---- small machinery ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def eventually(
    probe: Callable[[], T], done: Callable[[T], bool], what: str, timeout: float = DEADLINE, scene: Scene | None = None
) -> T:
    """Poll `probe` until `done(result)`; fail with the last result (and the processes' logs) after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if done(result):
            return result
        if time.monotonic() > deadline:
            logs = f"\n{scene.diagnostics()}" if scene else ""
            pytest.fail(f"after {timeout:.0f}s still waiting for {what}: {result}{logs}")
        time.sleep(0.25)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass
class Prometheus:
    base: str

    def api(self, path: str, **params: Any) -> Any:
        status, body = http_get(f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}", timeout=10)
        payload = json.loads(body) if body else {}
        assert status == 200 and payload.get("status") == "success", f"{path} {params}: {status} {body[:500]!r}"
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]


def answered(result: list[dict[str, Any]]) -> bool:
    """Non-empty, and not only NaN (a quantile of nothing, a rate of a series with one sample)."""
    return any(not math.isnan(float(r["value"][1])) for r in result)


@dataclass
class Scene:
    prometheus: Prometheus
    agent: str
    processors: list[str]  # the member that stays first, the one that left second
    topic: str
    group: str
    procs: dict[str, Proc] = field(default_factory=dict)

    def diagnostics(self) -> str:
        return "\n".join(f"--- {p.name} (alive={p.alive()}):\n{p.tail()}" for p in self.procs.values())


# ---- the scenario ----------------------------------------------------------------------------
@contextlib.contextmanager
def spawn(name: str, args: list[str], workdir: Path, procs: dict[str, Proc], **env: str) -> Iterator[Proc]:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env={**os.environ, **env}, start_new_session=True
        )
    proc = procs[name] = Proc(name, popen, log)
    try:
        yield proc
    finally:
        proc.stop()


def wait_ready(proc: Proc, address: str, path: str = "/readyz") -> None:
    eventually(
        lambda: (proc.alive(), http_get(f"http://{address}{path}")[0]),
        lambda r: r == (True, 200) or not r[0],
        f"{proc.name} on {address}{path}",
    )
    assert proc.alive(), f"{proc.name} exited:\n{proc.tail()}"


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    result = subprocess.run([LOGFERRY, "config", "check", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return path


def send_lines(path: Path, lines: list[dict[str, Any] | str]) -> None:
    payload = b"".join((json.dumps(x) if isinstance(x, dict) else x).encode() + b"\n" for x in lines)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.sendall(payload)


def prometheus_args(workdir: Path, jobs: dict[str, list[str]]) -> tuple[list[str], str]:
    """Debian's Prometheus on a free loopback port: 1s scrapes and rule evaluation, dashboards/alerts.yml."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `bash .ci/system-deps` installs Debian's prometheus package"
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(lint.ALERTS)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": t}]} for job, t in jobs.items()],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    args = [
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address={address}",
        "--log.level=warn",
    ]
    return args, address


@pytest.fixture(scope="module")
def scene(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    work = tmp_path_factory.mktemp("live")
    run_id = uuid.uuid4().hex[:8]
    topic, dlq, group = f"dash-logs-{run_id}", f"dash-dlq-{run_id}", f"dash-group-{run_id}"
    admin = KafkaSettings(bootstrap_servers=kafka_bootstrap).admin()
    for fut in admin.create_topics([NewTopic(topic, 4, 1), NewTopic(dlq, 1, 1)]).values():
        fut.result(30)
    (work / "dash_handler.py").write_text(HANDLER)
    sock = work / "app.sock"
    agent_addr, proc_addrs = f"127.0.0.1:{free_port()}", [f"127.0.0.1:{free_port()}" for _ in range(2)]
    agent_cfg = write_toml(
        work / "agent.toml",
        f"""
[kafka]
bootstrap_servers = "{kafka_bootstrap}"
[metrics]
address = "{agent_addr}"
[[sources]]
kind = "unix"
name = "app"
address = "{sock}"
[parser]
kind = "json"
[filter]
drop_regex = "^drop me"
[route]
topic = "{topic}"
[key]
field = "service"
[sink]
max_message_bytes = 4096
oversize = "drop"
linger_ms = 5
""",
    )
    procs: dict[str, Proc] = {}
    prom_args, prom_addr = prometheus_args(work, {"logferry-agent": [agent_addr], "logferry-processor": proc_addrs})
    with contextlib.ExitStack() as stack:
        # Callbacks run last-in first-out: the topics go after every process has stopped.
        stack.callback(lambda: [f.result(30) for f in admin.delete_topics([topic, dlq]).values()])
        agent = stack.enter_context(spawn("agent", [LOGFERRY, "collect", "--config", str(agent_cfg)], work, procs))
        wait_ready(agent, agent_addr)
        members = []
        for i, addr in enumerate(proc_addrs):
            cfg = write_toml(
                work / f"processor-{i}.toml",
                f"""
[kafka]
bootstrap_servers = "{kafka_bootstrap}"
[metrics]
address = "{addr}"
[processor]
group = "{group}"
topics = ["{topic}"]
handler = "dash_handler:handle"
concurrency = 4
max_in_flight = 20
rate_limit = 40.0
retries = 1
backoff_initial = 0.01
dead_letter_topic = "{dlq}"
commit_interval = 0.5
""",
            )
            members.append(
                stack.enter_context(
                    spawn(
                        f"processor-{i}", [LOGFERRY, "process", "--config", str(cfg)], work, procs, PYTHONPATH=str(work)
                    )
                )
            )
        prometheus = stack.enter_context(spawn("prometheus", prom_args, work, procs))
        s = Scene(Prometheus(f"http://{prom_addr}"), agent_addr, proc_addrs, topic, group, procs)
        try:
            eventually(lambda: http_get(f"http://{prom_addr}/-/ready")[0], lambda c: c == 200 or not prometheus.alive(),
                       "Prometheus to be ready")  # fmt: skip
            assert prometheus.alive(), prometheus.tail()
            for member, addr in zip(members, proc_addrs, strict=True):
                wait_ready(member, addr)
            # Counters must have a scraped sample before they move, or increase() sees no change.
            eventually(lambda: s.prometheus.query("up == 1"), lambda r: len(r) == 3, "all three to be scraped")
            # Crafted entries first, so the poison ones are at the head of their partition.
            send_lines(
                sock,
                [{"service": "poison", "level": "error", "message": f"poison {i}"} for i in range(3)]
                + [{"service": "svc-x", "level": "info", "message": f"drop me {i}"} for i in range(2)]
                + [{"service": "svc-x", "level": "info", "message": "x" * 8000}],
            )
            loadgen_args = [sys.executable, str(ROOT / "docker" / "loadgen.py"), "--socket", str(sock)]
            loadgen_args += ["--rate", "150", "--burst-every", "0", "--services", "10"]
            loadgen = stack.enter_context(spawn("loadgen", loadgen_args, work, procs))
            # One member leaves the group: a rebalance for the other, and `up == 0` for its target.
            # The one that stays is the one that dead-lettered (its failure series must live on).
            dead = eventually(
                lambda: s.prometheus.query("logferry_processor_dead_lettered_total"),
                lambda r: sum(float(x["value"][1]) for x in r) >= 3,
                "the 3 poison entries in the dead-letter topic",
                scene=s,
            )
            stays = {x["metric"]["instance"] for x in dead}
            leaving = next((i for i, a in enumerate(proc_addrs) if a not in stays), 1)
            members[leaving].stop()
            s.processors = [proc_addrs[1 - leaving], proc_addrs[leaving]]
            assert loadgen.alive(), loadgen.tail()
            yield s
        except BaseException:
            print(s.diagnostics())
            raise


# ---- the tests -------------------------------------------------------------------------------
def test_every_panel_query_returns_data(scene: Scene):
    queries = lint.panel_queries(lint.load_dashboard())
    pending = {q.where: lint.substitute(q.expr, RATE_INTERVAL) for q in queries}

    def probe() -> dict[str, str]:
        for where, expr in list(pending.items()):
            if answered(scene.prometheus.query(expr)):
                del pending[where]
        return pending

    eventually(probe, lambda p: not p, "panel queries with data", scene=scene)
    assert len(queries) >= 20


def test_variables_list_the_running_processes(scene: Scene):
    """Each template variable's query (as Grafana sends it) offers what runs in the scenario."""
    expected = {"host": {scene.agent, scene.processors[0]}, "group": {scene.group}, "topic": {scene.topic}}
    for variable in lint.query_variables(lint.load_dashboard()):
        selector, label = lint.label_values_match(variable["definition"])

        def probe(selector: str = selector, label: str = label) -> set[str]:
            return set(scene.prometheus.api(f"/api/v1/label/{label}/values", **{"match[]": selector}))

        want = expected[variable["name"]]
        eventually(probe, lambda values, want=want: want <= values, f"variable {variable['name']} to offer {want}")


# Alerts whose condition the scenario makes true; the others must at least have their signal.
HOLDING = {"LogferryEntriesDropped", "LogferryDeadLetters", "LogferryProcessorDown"}


def test_every_alert_expression_returns_data(scene: Scene):
    rules = lint.load_alerts()
    assert {r["alert"] for r in rules} >= HOLDING
    pending = {}
    for rule in rules:
        pending[f"{rule['alert']} signal"] = lint.signal(rule["expr"])
        if rule["alert"] in HOLDING:
            pending[f"{rule['alert']} condition"] = " ".join(rule["expr"].split())

    def probe() -> dict[str, str]:
        for where, expr in list(pending.items()):
            if answered(scene.prometheus.query(expr)):
                del pending[where]
        return pending

    eventually(probe, lambda p: not p, "alert expressions with data", scene=scene)


def test_rules_evaluate_and_the_scenarios_alerts_fire(scene: Scene):
    def probe() -> tuple[list[str], set[str]]:
        groups = scene.prometheus.api("/api/v1/rules")["groups"]
        unhealthy = [f"{r['name']}: {r.get('lastError')}" for g in groups for r in g["rules"] if r["health"] != "ok"]
        active = {a["labels"]["alertname"] for a in scene.prometheus.api("/api/v1/alerts")["alerts"]}
        return unhealthy, active

    _, active = eventually(
        probe, lambda r: not r[0] and r[1] >= HOLDING, f"healthy rules and alerts {HOLDING}", scene=scene
    )
    assert "LogferryAgentStalled" not in active and "LogferryKafkaDisconnected" not in active
    dropped = scene.prometheus.query('logferry_entries_dropped_total{reason="oversize"}')
    assert [float(r["value"][1]) for r in dropped] == [1.0]


def test_promtool_accepts_the_real_processes_metrics(scene: Scene):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `bash .ci/system-deps` installs Debian's prometheus package"
    for address in (scene.agent, scene.processors[0]):
        status, body = http_get(f"http://{address}/metrics")
        assert status == 200, address
        result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
        assert result.returncode == 0, f"{address}: {(result.stdout + result.stderr).decode()}"


def test_the_scenario_shows_what_the_panels_are_for(scene: Scene):
    """Not just series: the scenario really lags, pauses, rebalances, drops and dead-letters."""
    shown = {
        "lag": "max_over_time(logferry_processor_lag[5m]) > 0",
        "paused partitions": "max_over_time(logferry_processor_paused_partitions[5m]) > 0",
        "rebalances": 'increase(logferry_processor_rebalances_total{kind="assign"}[5m]) > 0',
        "an oversize drop": 'logferry_entries_dropped_total{reason="oversize"} == 1',
        "filtered entries": 'logferry_entries_dropped_total{reason="filtered"} == 2',
        "deliveries": "logferry_entries_delivered_total > 0",
        "processing": "rate(logferry_processor_processed_total[5m]) > 0",
    }

    def probe() -> list[str]:
        return [what for what, expr in shown.items() if not scene.prometheus.query(expr)]

    eventually(probe, lambda missing: not missing, "the scenario's effects", scene=scene)
