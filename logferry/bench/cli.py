"""The `logferry bench` command group; each suite module adds its own command to `bench_app`."""

from __future__ import annotations

import typer

bench_app = typer.Typer(
    help="Benchmarks: logferry beside a reference (Kafka's perf tools, raw confluent-kafka, peers) in one run.",
    no_args_is_help=True,
)
