"""Generate the Grafana dashboard of the whole logferry pipeline from code.

    python dashboards/generate.py           # (re)writes dashboards/logferry-pipeline.json
    python dashboards/generate.py --check   # exit 1 when the committed JSON is not this output

Plain dicts in Grafana's dashboard JSON model (schemaVersion 39), file-provisioned. Every
panel and target uses the `${datasource}` variable; hosts are Prometheus's `instance` label.
The metric names are the contract in logferry/metrics.py; tests/test_dashboards.py lints the
queries against it and tests/test_dashboards_live.py runs every one on a real Prometheus.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("logferry-pipeline.json")
DASHBOARD_UID = "logferry-pipeline"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"

# Label filters the template variables drive.
HOST = 'instance=~"$host"'
PROC = 'instance=~"$host", group=~"$group", topic=~"$topic"'
# Unlabelled gauges (buffer, spool, Kafka connection) exist in every logferry process, as 0 in
# processors: agent panels keep only the processes whose build info says role="agent".
AGENT_ONLY = 'and on (instance, job) logferry_build_info{role="agent"}'


def agent_gauge(metric: str, agg: str = "sum") -> str:
    return f"{agg} by (instance) ({metric}{{{HOST}}} {AGENT_ONLY})"


Panel = dict[str, Any]


def target(expr: str, legend: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True, "editorMode": "code"}


def timeseries(title: str, description: str, unit: str, *targets: dict[str, Any], stack: bool = False) -> Panel:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": list(targets),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 15 if stack else 5,
                    "showPoints": "never",
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                },
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, description: str, unit: str, *targets: dict[str, Any], red_at: float | None = None) -> Panel:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if red_at is not None:
        steps.append({"color": "red", "value": red_at})
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": list(targets),
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "area",
            "textMode": "auto",
            "orientation": "auto",
        },
    }


def quantiles(metric: str, selector: str, by: str, legend: str) -> list[dict[str, Any]]:
    return [
        target(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}{RATE})))",
            f"p{int(q * 100)} {legend}",
        )
        for q in (0.5, 0.99)
    ]


def agent_panels() -> list[Panel]:
    return [
        timeseries(
            "Entries received per host and source",
            "Entries read from each IPC source per second, per agent (instance) and configured source name.",
            "cps",
            target(
                f"sum by (instance, source) (rate(logferry_source_entries_received_total{{{HOST}}}{RATE}))",
                "{{instance}} {{source}}",
            ),
            stack=True,
        ),
        timeseries(
            "Bytes received and delivered",
            "Bytes read from sources per second, and Avro record bytes Kafka acknowledged per topic.",
            "Bps",
            target(
                f"sum by (instance, source) (rate(logferry_source_bytes_received_total{{{HOST}}}{RATE}))",
                "in {{instance}} {{source}}",
            ),
            target(
                f'sum by (instance, topic) (rate(logferry_bytes_delivered_total{{{HOST}, topic=~"$topic"}}{RATE}))',
                "out {{instance}} {{topic}}",
            ),
        ),
        timeseries(
            "Entries dropped by reason",
            "Entries an agent dropped on purpose, by policy reason (filtered, buffer_full, oversize, ...). "
            "Anything but `filtered` means data loss an operator accepted by configuration.",
            "cps",
            target(
                f"sum by (instance, reason) (rate(logferry_entries_dropped_total{{{HOST}}}{RATE}))",
                "{{instance}} {{reason}}",
            ),
            stack=True,
        ),
        timeseries(
            "Buffer and spool depth",
            "Entries waiting in the in-memory buffer (against its limit) and in the on-disk spool. "
            "A growing spool means Kafka accepts less than the sources produce.",
            "short",
            target(agent_gauge("logferry_buffer_entries"), "buffer {{instance}}"),
            target(agent_gauge("logferry_buffer_limit_entries"), "buffer limit {{instance}}"),
            target(agent_gauge("logferry_spool_entries"), "spool {{instance}}"),
        ),
        timeseries(
            "Buffer and spool size",
            "Bytes held in the in-memory buffer and in the on-disk spool segments.",
            "bytes",
            target(agent_gauge("logferry_buffer_bytes"), "buffer {{instance}}"),
            target(agent_gauge("logferry_spool_bytes"), "spool {{instance}}"),
        ),
    ]


def kafka_panels() -> list[Panel]:
    return [
        timeseries(
            "Entries delivered per topic",
            "Entries Kafka acknowledged (acks=all) per second, per agent and topic.",
            "cps",
            target(
                f'sum by (instance, topic) (rate(logferry_entries_delivered_total{{{HOST}, topic=~"$topic"}}{RATE}))',
                "{{instance}} {{topic}}",
            ),
            stack=True,
        ),
        timeseries(
            "Delivery latency",
            "Time from receipt at a source to Kafka's acknowledgement, p50 and p99 per agent.",
            "s",
            *quantiles("logferry_delivery_latency_seconds", HOST, "instance", "{{instance}}"),
        ),
        stat(
            "Kafka connected",
            "Whether each agent's producer has a usable broker connection (1 = yes).",
            "bool_yes_no",
            target(agent_gauge("logferry_kafka_connected", "min"), "{{instance}}"),
        ),
        timeseries(
            "Time since last delivery",
            "Seconds since Kafka last acknowledged an entry from each agent. It rises steadily when "
            "output stalls; on an idle agent with an empty buffer it rises too, which is harmless.",
            "s",
            target(f"time() - {agent_gauge('logferry_last_delivery_timestamp_seconds', 'max')}", "{{instance}}"),
        ),
    ]


def processor_panels() -> list[Panel]:
    return [
        timeseries(
            "Processing rate per group and topic",
            "Records fetched from Kafka and records the handler finished, per second.",
            "cps",
            target(
                f"sum by (group, topic) (rate(logferry_processor_consumed_total{{{PROC}}}{RATE}))",
                "consumed {{group}} {{topic}}",
            ),
            target(
                f"sum by (group, topic) (rate(logferry_processor_processed_total{{{PROC}}}{RATE}))",
                "processed {{group}} {{topic}}",
            ),
        ),
        timeseries(
            "Handler latency",
            "Time inside the handler per record, p50 and p99 per group.",
            "s",
            *quantiles(
                "logferry_processor_handler_duration_seconds",
                'instance=~"$host", group=~"$group"',
                "group",
                "{{group}}",
            ),
        ),
        timeseries(
            "Failures, retries and dead letters",
            "Handler calls that raised, retries scheduled, and records sent to the dead-letter topic "
            "(by reason) per second. Dead letters need a person to look at them.",
            "cps",
            target(
                f"sum by (group, topic) (rate(logferry_processor_failed_total{{{PROC}}}{RATE}))",
                "failed {{group}} {{topic}}",
            ),
            target(
                f"sum by (group, topic) (rate(logferry_processor_retries_total{{{PROC}}}{RATE}))",
                "retried {{group}} {{topic}}",
            ),
            target(
                f"sum by (group, topic, reason) (rate(logferry_processor_dead_lettered_total{{{PROC}}}{RATE}))",
                "dead-lettered {{group}} {{topic}} {{reason}}",
            ),
        ),
        timeseries(
            "Records in flight",
            "Records fetched but not yet finished, per processor process and group, and those of them "
            "waiting for a dead-letter or retry-topic send Kafka refuses (their partitions pause).",
            "short",
            target(
                'sum by (instance, group) (logferry_processor_in_flight{instance=~"$host", group=~"$group"})',
                "{{instance}} {{group}}",
            ),
            target(
                'sum by (instance, group) (logferry_processor_dead_letter_stalled{instance=~"$host", group=~"$group"})',
                "stalled on a dead-letter send {{instance}} {{group}}",
            ),
        ),
    ]


def lag_panels() -> list[Panel]:
    lag = 'max by (group, topic, partition) (logferry_processor_lag{group=~"$group", topic=~"$topic"})'
    return [
        timeseries(
            "Consumer lag per group and partition",
            "Log end offset minus committed offset, per partition, as reported by the member that owns it. "
            "During a burst it rises and should drain afterwards (peak shaving keeps the backlog in Kafka).",
            "short",
            target(lag, "{{group}} {{topic}}/{{partition}}"),
        ),
        stat(
            "Total lag per group",
            "Sum of the per-partition lag of each group and topic.",
            "short",
            target(f"sum by (group, topic) ({lag})", "{{group}} {{topic}}"),
        ),
        timeseries(
            "Paused partitions",
            "Partitions a processor paused because its in-flight work passed the high watermark.",
            "short",
            target(
                'sum by (instance, group) (logferry_processor_paused_partitions{instance=~"$host", group=~"$group"})',
                "{{instance}} {{group}}",
            ),
        ),
        timeseries(
            "Rebalances",
            "Partition assignment changes (assigned, revoked, lost) per interval, by group and kind.",
            "short",
            target(
                'sum by (group, kind) (increase(logferry_processor_rebalances_total{instance=~"$host", '
                f'group=~"$group"}}{RATE}))',
                "{{group}} {{kind}}",
            ),
        ),
    ]


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "refresh": 2,  # on time range change: hosts and groups come and go
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
    }


def variables() -> list[dict[str, Any]]:
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "options": [],
            "refresh": 1,
            "regex": "",
            "hide": 0,
        },
        # Every logferry process exports logferry_build_info, so it lists agents and processors alike.
        query_variable("host", "Host", "label_values(logferry_build_info, instance)"),
        query_variable("group", "Group", "label_values(logferry_processor_consumed_total, group)"),
        query_variable(
            "topic",
            "Topic",
            'label_values({__name__=~"logferry_entries_delivered_total|logferry_processor_consumed_total"}, topic)',
        ),
    ]


def layout(sections: list[tuple[str, list[Panel]]]) -> list[Panel]:
    """Rows of two 12-wide panels under a full-width row header per section; ids in order."""
    panels: list[Panel] = []
    y = 0
    for title, section in sections:
        panels.append({"type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        y += 1
        for i, p in enumerate(section):
            p["gridPos"] = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": y + 8 * (i // 2)}
            for ref, t in enumerate(p["targets"]):
                t["refId"] = chr(ord("A") + ref)
            panels.append(p)
        y += 8 * ((len(section) + 1) // 2)
    for pid, p in enumerate(panels, start=1):
        p["id"] = pid
    return panels


def dashboard() -> dict[str, Any]:
    return {
        "uid": DASHBOARD_UID,
        "title": "logferry pipeline",
        "description": "Collector agents → Kafka → processor groups: throughput, drops, buffers, delivery, lag.",
        "tags": ["logferry", "kafka", "logs"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": variables()},
        "panels": layout(
            [
                ("Collector agents", agent_panels()),
                ("Kafka delivery", kafka_panels()),
                ("Processors", processor_panels()),
                ("Consumer lag and shaping", lag_panels()),
            ]
        ),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="Compare with the committed file instead of writing.")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python dashboards/generate.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
