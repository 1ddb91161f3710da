"""The dashboard and alert rules, checked without a broker: generator, lint rules, promtool.

tests/test_dashboards_live.py runs every query on a real Prometheus scraping real processes.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "dashboards"


def load_script(name: str) -> ModuleType:
    """dashboards/ holds scripts, not a package: load one by path."""
    spec = importlib.util.spec_from_file_location(f"logferry_dashboards_{name}", DASHBOARDS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lint = load_script("lint")
generate = load_script("generate")
TYPES = lint.metric_types()


def test_committed_dashboard_is_the_generators_output():
    assert lint.DASHBOARD.read_text() == generate.render(), "run: .venv/bin/python dashboards/generate.py"


def test_generator_check_mode_flags_a_stale_file(tmp_path):
    stale = tmp_path / "dash.json"
    stale.write_text(generate.render().replace("logferry pipeline", "old title"))
    assert generate.main(["--check", "--output", str(stale)]) == 1
    assert generate.main(["--output", str(stale)]) == 0
    assert generate.main(["--check", "--output", str(stale)]) == 0


def test_dashboard_follows_the_rules():
    assert lint.lint_dashboard(lint.load_dashboard(), TYPES) == []


def test_alert_rules_follow_the_rules():
    assert lint.lint_alerts(lint.load_alerts(), TYPES) == []


def test_dashboard_covers_the_pipeline():
    """Each part of the pipeline an operator watches has a panel built on its metric."""
    queries = " ".join(q.expr for q in lint.panel_queries(lint.load_dashboard()))
    for metric in (
        "logferry_source_entries_received_total",
        "logferry_source_bytes_received_total",
        "logferry_entries_dropped_total",
        "logferry_buffer_entries",
        "logferry_spool_entries",
        "logferry_spool_bytes",
        "logferry_delivery_latency_seconds_bucket",
        "logferry_kafka_connected",
        "time() - max by (instance) (logferry_last_delivery_timestamp_seconds",
        "logferry_processor_processed_total",
        "logferry_processor_handler_duration_seconds_bucket",
        "logferry_processor_retries_total",
        "logferry_processor_dead_lettered_total",
        "logferry_processor_lag",
        "logferry_processor_paused_partitions",
        "logferry_processor_rebalances_total",
    ):
        assert metric in queries, f"no panel shows {metric}"
    variables = {v["name"]: v["definition"] for v in lint.query_variables(lint.load_dashboard())}
    assert set(variables) == {"host", "group", "topic"}
    assert lint.label_values_match(variables["host"])[1] == "instance"


def test_alert_rules_cover_the_failure_modes():
    names = {r["alert"] for r in lint.load_alerts()}
    assert {
        "LogferryAgentStalled",
        "LogferryEntriesDropped",
        "LogferrySpoolGrowing",
        "LogferryConsumerLagGrowing",
        "LogferryDeadLetters",
        "LogferryProcessorDown",
    } <= names


# ---- the lint catches what it claims to catch ------------------------------------------------
def first_target(dashboard: dict) -> dict:
    return lint.data_panels(dashboard)[0]["targets"][0]


@pytest.mark.parametrize(
    ("mutate", "complaint"),
    [
        (lambda d: lint.data_panels(d)[0]["fieldConfig"]["defaults"].pop("unit"), "no unit"),
        (lambda d: lint.data_panels(d)[1].update(description=" "), "no description"),
        (lambda d: lint.data_panels(d)[2].update(datasource={"type": "prometheus", "uid": "P1"}), "datasource"),
        (lambda d: first_target(d).update(datasource={"uid": "P1"}), "datasource"),
        (lambda d: d["templating"]["list"].pop(0), "`datasource` variable"),
        (
            lambda d: first_target(d).update(expr="sum(rate(logferry_buffer_entries[$__rate_interval]))"),
            "rate() over logferry_buffer_entries (gauge)",
        ),
        (
            lambda d: first_target(d).update(expr="sum(rate(logferry_entries_delivered_total[5m]))"),
            "use [$__rate_interval]",
        ),
        (
            lambda d: first_target(d).update(expr="sum(logferry_entries_delivered_total)"),
            "used without rate()",
        ),
        (
            lambda d: first_target(d).update(expr="sum(logferry_entries_delivred_total)"),
            "not exported",
        ),
        (
            lambda d: first_target(d).update(
                expr="histogram_quantile(0.9, sum by (instance) "
                "(rate(logferry_delivery_latency_seconds_bucket[$__rate_interval])))"
            ),
            "by (le",
        ),
        (
            lambda d: first_target(d).update(expr='sum(logferry_buffer_entries{instance=~"$hots"})'),
            "$hots is not a dashboard variable",
        ),
        (
            lambda d: first_target(d).update(expr="deriv(logferry_entries_delivered_total[$__rate_interval])"),
            "only gauges",
        ),
    ],
)
def test_lint_flags_a_broken_dashboard(mutate, complaint):
    dashboard = copy.deepcopy(lint.load_dashboard())
    mutate(dashboard)
    problems = lint.lint_dashboard(dashboard, TYPES)
    assert any(complaint in p for p in problems), problems


def test_signal_strips_thresholds_but_not_label_matchers():
    expr = '(time() - max(x{reason!="filtered"}) > 120) and on (i) (max(y) >= 1.5e3) or up == 0'
    assert lint.signal(expr) == '(time() - max(x{reason!="filtered"})) and on (i) (max(y)) or up'


# ---- promtool -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `bash .ci/system-deps` installs Debian's prometheus package")
    return path


def test_promtool_accepts_the_alert_rules(promtool):
    result = subprocess.run([promtool, "check", "rules", str(lint.ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(lint.load_alerts())} rules found" in result.stdout


# A real logferry process: every metric of the contract gets a sample, then /metrics is served.
EXPORTER = textwrap.dedent(
    """
    import sys
    from prometheus_client import Counter, Gauge, Histogram, Info
    import logferry.metrics as m

    for metric in vars(m).values():
        if not isinstance(metric, Counter | Gauge | Histogram | Info):
            continue
        child = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames else metric
        if isinstance(metric, Info):
            child.info({"version": "test", "role": "exporter"})
        elif isinstance(metric, Histogram):
            child.observe(0.2)
        elif isinstance(metric, Counter):
            child.inc()
        else:
            child.set(1)
    server = m.MetricsServer("127.0.0.1:0").start()
    print(server.address, flush=True)
    sys.stdin.read()
    """
)


def test_promtool_accepts_our_metrics_exposition(promtool):
    proc = subprocess.Popen(
        [sys.executable, "-c", EXPORTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address, "the exporter did not start"
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
            body = r.read()
    finally:
        proc.communicate("", timeout=10)
    exported = {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if line[:1] != "#"}
    assert set(TYPES) - exported == set(), "some metrics of the contract were not exported"
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_lint_allows_a_bare_counter_only_in_the_new_series_idiom():
    counter = "logferry_processor_failed_total"
    ok = {"alert": "A", "expr": f"sum({counter}{{a='b'}} unless {counter} offset 5m) > 0",
          "labels": {"severity": "warning"}, "annotations": {"summary": "s", "description": "d"}}  # fmt: skip
    assert lint.lint_alerts([ok], TYPES) == []
    mixed = {**ok, "expr": "sum(logferry_processor_failed_total unless logferry_processor_consumed_total offset 5m)"}
    assert any("used without rate()" in p for p in lint.lint_alerts([mixed], TYPES))
