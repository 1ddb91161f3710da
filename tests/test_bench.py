"""The bench harness must not rot: each suite's smallest run, end to end, against the session broker.

These are not performance tests: they check that every suite runs its sides, and writes a
JSON report with the expected fields, positive numbers and a PNG chart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from logferry.bench.cli import bench_app
from logferry.bench.common import bench_topics

pytestmark = pytest.mark.kafka


def run_suite(tmp_path: Path, *args: str) -> dict[str, Any]:
    cluster = args[args.index("-b") + 1] if "-b" in args else None
    before = bench_topics(cluster) if cluster else set()
    result = CliRunner().invoke(bench_app, [*args, "--repeat", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    if cluster:  # a user's cluster keeps none of the suite's topics (inputs, dead-letter topics)
        assert bench_topics(cluster) == before
    suite = args[0]
    assert (tmp_path / f"{suite}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / f"{suite}.json").read_text())
    assert report["suite"] == suite
    assert report["machine"]["cores"] >= 1 and report["machine"]["memory_gib"] > 0
    assert report["machine"]["versions"]["librdkafka"]
    for run in report["runs"]:
        assert run["repetitions"] == 1, run
        assert run["entries_per_s"]["min"] > 0 and run["mb_per_s"]["median"] > 0, run
        assert run["entries_per_s"]["min"] <= run["entries_per_s"]["median"] <= run["entries_per_s"]["max"]
    for ratio in report["ratios"]:
        assert ratio["value"] > 0, ratio
    return report


def names(report: dict[str, Any]) -> list[str]:
    return [r["name"] for r in report["runs"]]


def test_ipc_every_source_beside_its_bare_channel(tmp_path: Path) -> None:
    from logferry.bench.ipc import KINDS

    report = run_suite(tmp_path, "ipc", "--entries", "300", "--sizes", "100")
    for kind in KINDS:
        assert f"bare {kind}" in names(report) and f"logferry {kind} source" in names(report)
        assert any(r["name"] == f"{kind} 100 B: logferry / bare" and r["target"] == 0.5 for r in report["ratios"])
    for run in report["runs"]:
        assert run["samples"][0]["entries"] == 300 and run["cpu_s_per_million"] > 0


def test_ingest_agent_beside_producer_performance_and_peers(tmp_path: Path, kafka_bootstrap: str) -> None:
    report = run_suite(tmp_path, "ingest", "-b", kafka_bootstrap, "--entries", "2000", "--no-install")
    measured = names(report)
    assert "logferry agent (unix socket)" in measured and "Kafka ProducerPerformance" in measured
    assert report["params"]["producer"]["acks"] == "all" and report["params"]["producer"]["enable.idempotence"]
    # Peers that are not installed are reported as skipped, with the reason; never silently left out.
    for peer, label in (("rsyslog", "rsyslog imptcp → omkafka"), ("kcat", "kcat -P -l file")):
        assert label in measured or any(s.startswith(f"{peer}: skipped — ") for s in report["skipped"])
    agent = next(r for r in report["runs"] if r["name"].startswith("logferry"))
    assert agent["cpu_s_per_million"] > 0 and agent["peak_rss_mb"] > 0
    assert any(r["name"] == "logferry / Kafka ProducerPerformance" for r in report["ratios"])
    assert "logferry agent (unix socket), pin_to_cpu" in measured
    assert any(r["name"] == "logferry pin_to_cpu / Kafka ProducerPerformance" for r in report["ratios"])
    two = "2 logferry agents, one per CPU (pin_to_cpu)"
    if len(os.sched_getaffinity(0)) > 1:  # both agents' lines counted into the one topic (it raises otherwise)
        assert next(r for r in report["runs"] if r["name"] == two)["samples"][0]["entries"] == 2000
    else:
        assert any(s.startswith("logferry-x2: skipped — ") for s in report["skipped"])
    # The Python ceiling ran in its own process and delivered every line (it raises otherwise).
    loop = next(r for r in report["runs"] if r["name"].startswith("confluent-kafka produce() loop"))
    assert loop["samples"][0]["entries"] == 2000 and loop["cpu_s_per_million"] > 0


def test_latency_percentiles_at_each_rate(tmp_path: Path, kafka_bootstrap: str) -> None:
    report = run_suite(tmp_path, "latency", "-b", kafka_bootstrap, "--rates", "200,1000", "--seconds", "0.5")
    # The Processor and the raw poll loop both saw every entry written at each rate.
    for side in ("logferry", "raw"):
        for rate, entries in (("200", 100), ("1000", 500)):
            pct = report["latency_ms"][side][rate]
            assert pct["entries"] == entries
            assert 0 < pct["p50"] <= pct["p99"] <= pct["p99.9"] <= pct["max"]
    assert report["latency_ms"]["logferry"]["1000"]["write_to_agent_received"]["p50"] >= 0


def test_process_runtime_beside_raw_loop_consumer_performance_and_sequential(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    args = ["--entries", "1000", "--io-entries", "300", "--sequential-entries", "20", "--concurrency", "32"]
    report = run_suite(tmp_path, "process", "-b", kafka_bootstrap, *args)
    measured = names(report)
    for name in ("raw consume(500) + decode + no-op", "raw consume(500) + fastavro decode + no-op",
                 "logferry Processor key-ordered, 64 threads", "logferry Processor key-ordered, inline",
                 "logferry Processor key-ordered, 64 threads, pin_to_cpu",
                 "sequential consumer"):  # fmt: skip
        assert name in measured
    assert any(n.startswith("Kafka ConsumerPerformance") for n in measured)
    ratios = {r["name"]: r for r in report["ratios"]}
    assert ratios["no-op: Processor inline / raw consume+decode"]["target"] == 0.8
    assert ratios["no-op: Processor 64 threads / raw consume+decode"]["target"] == 0.8
    assert ratios["no-op: Processor 64 threads pinned / raw consume+decode"]["target"] == 0.8
    assert ratios["5 ms: Processor threads / sequential"]["target"] == 50


def test_replay_seeks_a_running_group_beside_the_raw_loop(tmp_path: Path, kafka_bootstrap: str) -> None:
    report = run_suite(tmp_path, "replay", "-b", kafka_bootstrap, "--entries", "2000")
    assert sorted(names(report)) == ["logferry replay → running Processor (key-ordered, 64 threads)",
                                     "raw: offsets_for_times + assign + consume(500) + decode"]  # fmt: skip
    for run in report["runs"]:  # both sides re-processed every record written since the replay time
        assert run["samples"][0]["entries"] == 2000
    assert report["seek_s"]["runtime"]["median"] > 0 and report["seek_s"]["raw"]["median"] > 0
