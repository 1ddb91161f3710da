"""The `logferry bench` command group; each suite module adds its own command to `bench_app`."""

from __future__ import annotations

import typer

bench_app = typer.Typer(
    help="Benchmarks: logferry beside a reference (Kafka's perf tools, raw confluent-kafka, peers) in one run.",
    no_args_is_help=True,
)

from logferry.bench.ingest import ingest  # noqa: E402 - suites import nothing from here
from logferry.bench.ipc import ipc  # noqa: E402
from logferry.bench.latency import latency  # noqa: E402
from logferry.bench.process import process  # noqa: E402
from logferry.bench.replay import replay  # noqa: E402

bench_app.command("ipc")(ipc)
bench_app.command("ingest")(ingest)
bench_app.command("process")(process)
bench_app.command("latency")(latency)
bench_app.command("replay")(replay)
