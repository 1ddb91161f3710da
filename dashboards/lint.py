"""The rules the dashboard and alert rules follow, as code.

    python dashboards/lint.py    # lists every problem in logferry-pipeline.json and alerts.yml

- every panel and target uses the `${datasource}` variable, no hard-coded data source;
- every panel has a unit and a description;
- every metric named exists in logferry/metrics.py (the contract);
- `rate()`/`irate()`/`increase()` only over counters (`_total`) or histogram series
  (`_bucket`/`_count`/`_sum`), `deriv()`/`delta()` only over gauges, counters never bare;
  (but `c unless c offset 5m`, the series of c born in the last 5 minutes, in alert rules);
- dashboard ranges are `$__rate_interval`, so a panel never rates over fewer than 2 scrapes.

Also what the live test needs: every query with Grafana's variables substituted, and an
alert expression's signal (the expression without its threshold comparisons).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
DASHBOARD = HERE / "logferry-pipeline.json"
ALERTS = HERE / "alerts.yml"
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}

COUNTER_RANGE_FUNCS = ("rate", "irate", "increase")
GAUGE_RANGE_FUNCS = ("deriv", "delta", "idelta", "predict_linear")
METRIC = re.compile(r"\blogferry_[a-z0-9_]+\b")
RANGE_ARG = re.compile(r"^\s*(?P<metric>[a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*\[(?P<range>[^\]]+)\]\s*(,.*)?$", re.S)
# `c unless c offset 5m`: the series of counter c born in the last 5m, whose first increase
# rate() cannot see. The one place a counter may stand without rate()/increase().
NEW_SERIES = re.compile(r"(?P<c>logferry_\w+_total)(\{[^}]*\})?\s+unless\s+(?P=c)(\{[^}]*\})?\s+offset\s+\w+")
# `> 120`, `== 0`, ...: a comparison with a number, never a label matcher like `!="x"`.
THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*-?[0-9][0-9.e+]*")


@dataclass(frozen=True)
class Query:
    where: str  # "panel 'Title' target A", "alert LogferryX", "variable host"
    expr: str


def metric_types() -> dict[str, str]:
    """Sample name → counter/histogram/gauge/info for every metric logferry exports."""
    from prometheus_client import REGISTRY

    import logferry.metrics  # noqa: F401  (registers the contract)

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",), "info": ("_info",)}
    types: dict[str, str] = {}
    for family in REGISTRY.collect():
        for suffix in suffixes.get(family.type, ()):
            types[family.name + suffix] = family.type
    return types


def calls(expr: str, funcs: tuple[str, ...]) -> Iterator[tuple[str, str, int, int]]:
    """(function, argument text, start, end) of each call of `funcs`, quotes and nesting respected."""
    for m in re.finditer(rf"\b({'|'.join(funcs)})\s*\(", expr):
        depth, i, quote = 1, m.end(), ""
        while depth and i < len(expr):
            ch = expr[i]
            if quote:
                quote = "" if ch == quote and expr[i - 1] != "\\" else quote
            elif ch in "\"'`":
                quote = ch
            else:
                depth += {"(": 1, ")": -1}.get(ch, 0)
            i += 1
        yield m.group(1), expr[m.end() : i - 1], m.start(), i


def lint_expr(expr: str, types: dict[str, str], rate_interval: bool) -> list[str]:
    problems: list[str] = []
    for name in sorted(set(METRIC.findall(expr)) - types.keys()):
        problems.append(f"{name} is not exported by logferry/metrics.py")
    bare = expr
    for func, arg, start, end in sorted(calls(expr, COUNTER_RANGE_FUNCS + GAUGE_RANGE_FUNCS), key=lambda c: -c[2]):
        m = RANGE_ARG.match(arg)
        if not m:
            problems.append(f"{func}() takes a plain range selector, got {arg!r}")
            continue
        kind = types.get(m["metric"], "unknown")
        if func in COUNTER_RANGE_FUNCS and kind not in ("counter", "histogram"):
            problems.append(f"{func}() over {m['metric']} ({kind}): only counters and histogram series")
        if func in GAUGE_RANGE_FUNCS and kind != "gauge":
            problems.append(f"{func}() over {m['metric']} ({kind}): only gauges")
        if rate_interval and func in COUNTER_RANGE_FUNCS and m["range"].strip() != "$__rate_interval":
            problems.append(f"{func}() over [{m['range']}]: use [$__rate_interval]")
        bare = bare[:start] + bare[end:]
    for name in sorted(set(METRIC.findall(NEW_SERIES.sub("", bare)))):
        if types.get(name) in ("counter", "histogram"):
            problems.append(f"{name} is a {types[name]} series used without rate()/increase()")
    for _, arg, _, _ in calls(expr, ("histogram_quantile",)):
        if "_bucket" not in arg or not re.search(r"\bby\s*\([^)]*\ble\b", arg):
            problems.append("histogram_quantile() needs rate(..._bucket[...]) summed `by (le, ...)`")
    return problems


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_alerts(path: Path = ALERTS) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def query_variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in dashboard["templating"]["list"] if v["type"] == "query"]


def panel_queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(f"panel {p['title']!r} target {t.get('refId', i)}", t["expr"])
        for p in data_panels(dashboard)
        for i, t in enumerate(p["targets"])
    ]


def lint_dashboard(dashboard: dict[str, Any], types: dict[str, str]) -> list[str]:
    problems: list[str] = []
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables.get("datasource", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("templating: needs a `datasource` variable of type datasource, query prometheus")
    for v in query_variables(dashboard):
        if v.get("datasource") != DATASOURCE_REF:
            problems.append(f"variable {v['name']}: datasource must be {DATASOURCE_REF}")
    for p in data_panels(dashboard):
        where = f"panel {p.get('title')!r}"
        if p.get("datasource") != DATASOURCE_REF:
            problems.append(f"{where}: datasource must be {DATASOURCE_REF}, got {p.get('datasource')}")
        if not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{where}: no unit (fieldConfig.defaults.unit)")
        if not str(p.get("description", "")).strip():
            problems.append(f"{where}: no description")
        if not p.get("targets"):
            problems.append(f"{where}: no targets")
        for t in p.get("targets", []):
            if t.get("datasource") != DATASOURCE_REF:
                problems.append(f"{where} target {t.get('refId')}: datasource must be {DATASOURCE_REF}")
    for q in panel_queries(dashboard):
        problems += [f"{q.where}: {msg}" for msg in lint_expr(q.expr, types, rate_interval=True)]
    # Variable queries only select series (label_values), so any metric type will do there.
    variable_queries = [Query(f"variable {v['name']}", v["definition"]) for v in query_variables(dashboard)]
    for q in variable_queries:
        problems += [
            f"{q.where}: {m} is not exported by logferry/metrics.py" for m in METRIC.findall(q.expr) if m not in types
        ]
    for q in panel_queries(dashboard) + variable_queries:
        undefined = set(VARIABLE.findall(q.expr.replace("$__rate_interval", ""))) - variables.keys()
        problems += [f"{q.where}: ${name} is not a dashboard variable" for name in sorted(undefined)]
    for ref in datasource_refs(dashboard):
        if ref != DATASOURCE_REF:
            problems.append(f"a hard-coded data source {ref}: use {DATASOURCE_REF}")
    return problems


def datasource_refs(node: Any) -> Iterator[Any]:
    """Every `datasource` value anywhere in the dashboard (panels, targets, variables, annotations)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_refs(item)


def lint_alerts(rules: list[dict[str, Any]], types: dict[str, str]) -> list[str]:
    problems: list[str] = []
    for r in rules:
        where = f"alert {r['alert']}"
        problems += [f"{where}: {msg}" for msg in lint_expr(r["expr"], types, rate_interval=False)]
        if r.get("labels", {}).get("severity") not in ("warning", "critical"):
            problems.append(f"{where}: labels.severity must be warning or critical")
        for key in ("summary", "description"):
            if not r.get("annotations", {}).get(key):
                problems.append(f"{where}: annotations.{key} missing")
    return problems


# ---- what the live test sends to Prometheus ---------------------------------------------------
VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def substitute(expr: str, interval: str = "15s") -> str:
    """Grafana's part: $__rate_interval → a duration, every template variable → `.*` (All)."""
    return VARIABLE.sub(".*", expr.replace("$__rate_interval", interval))


def signal(expr: str) -> str:
    """An alert expression without its threshold comparisons: non-empty once the series exist."""
    return THRESHOLD.sub("", " ".join(expr.split()))


def label_values_match(query: str) -> tuple[str, str]:
    """`label_values(SELECTOR, label)` → (selector, label), as Grafana asks /api/v1/label/../values."""
    m = re.fullmatch(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)", query.strip())
    if not m:
        raise ValueError(f"not a label_values() query: {query!r}")
    return substitute(m["selector"]), m["label"]


def main() -> int:
    types = metric_types()
    problems = lint_dashboard(load_dashboard(), types) + lint_alerts(load_alerts(), types)
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s)" if problems else "dashboard and alert rules: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
