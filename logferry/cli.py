"""The `logferry` command. Subcommands live beside what they drive; this module wires them up.

Any LogferryError becomes one line on stderr and exit status 2; nothing is half-started.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from logferry import __version__
from logferry.bench.cli import bench_app
from logferry.broker import DEFAULT_KAFKA_VERSION, LocalCluster
from logferry.broker.local import pid_alive
from logferry.collectors.cli import collect
from logferry.collectors.spool_cli import spool_app
from logferry.errors import LogferryError
from logferry.log import setup_logging
from logferry.processors.cli import process
from logferry.processors.offsets_cli import offsets_app
from logferry.processors.replay_cli import replay

app = typer.Typer(
    name="logferry",
    help="Move log entries from local IPC into Kafka, and process them as consumer groups.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
broker_app = typer.Typer(help="A real Apache Kafka (KRaft) on loopback, for development, demos and tests.")
config_app = typer.Typer(help="Validate config files.")
schema_app = typer.Typer(help="The LogEntry Avro schema.")
app.add_typer(broker_app, name="broker")
app.add_typer(config_app, name="config")
app.add_typer(schema_app, name="schema")
app.add_typer(bench_app, name="bench")
app.command("collect")(collect)
app.add_typer(spool_app, name="spool")
app.add_typer(offsets_app, name="offsets")
app.command("process")(process)
app.command("replay")(replay)

out = Console()
err = Console(stderr=True)

BootstrapOpt = Annotated[
    str | None,
    typer.Option(
        "--bootstrap-servers", "-b", envvar="LOGFERRY_BOOTSTRAP_SERVERS",
        help="Use this Kafka cluster (host:port,...) instead of the local broker.",
    ),
]  # fmt: skip
HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", envvar="LOGFERRY_BROKER_HOME", help="State dir of the local broker."),
]


def _print_version(value: bool) -> None:
    if value:
        out.print(f"logferry {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    log_level: Annotated[str, typer.Option("--log-level", envvar="LOGFERRY_LOG_LEVEL")] = "INFO",
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    setup_logging(log_level)


# ---- broker -------------------------------------------------------------------------------
@broker_app.command("start")
def broker_start(
    kafka_version: Annotated[str, typer.Option("--kafka-version", help="4.x.y or 3.9.y")] = DEFAULT_KAFKA_VERSION,
    nodes: Annotated[int, typer.Option(help="Number of KRaft nodes (3 for replication tests).")] = 1,
    port: Annotated[int, typer.Option(help="Port of node 1; node i uses port+2(i-1). 0 picks free ports.")] = 9092,
    heap: Annotated[str, typer.Option(help="JVM max heap per node.")] = "512m",
    fresh: Annotated[bool, typer.Option(help="Wipe topics and data from earlier runs.")] = False,
    runtime: Annotated[str, typer.Option(help="jars (Maven Central + local Java) or docker.")] = "jars",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 90.0,
    home: HomeOpt = None,
) -> None:
    """Start Kafka and wait until it answers a metadata request."""
    t0 = time.monotonic()
    if runtime == "docker":
        from logferry.broker.docker import start_container

        cid, bootstrap = start_container(kafka_version)
        out.print(f"Kafka {kafka_version} in container {cid[:12]} at [bold]{bootstrap}[/bold]")
        return
    if runtime != "jars":
        raise LogferryError(f"--runtime {runtime!r}: expected 'jars' or 'docker'")
    cluster = LocalCluster(home)
    with err.status(f"starting Kafka {kafka_version} ({nodes} node(s))…"):
        st = cluster.start(version=kafka_version, nodes=nodes, port=port, heap=heap, fresh=fresh, timeout=timeout)
    out.print(
        f"Kafka {st.version} ready in {time.monotonic() - t0:.1f}s at [bold]{st.bootstrap_servers}[/bold] "
        f"(data in {st.home})"
    )


@broker_app.command("stop")
def broker_stop(
    timeout: Annotated[float, typer.Option(help="Seconds of graceful shutdown before SIGKILL.")] = 30.0,
    home: HomeOpt = None,
) -> None:
    """Stop every node: SIGTERM (controlled shutdown), then SIGKILL after --timeout."""
    stopped = LocalCluster(home).stop(timeout=timeout)
    out.print(f"stopped pid(s) {', '.join(map(str, stopped))}" if stopped else "no local broker was running")


@broker_app.command("status")
def broker_status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    home: HomeOpt = None,
) -> None:
    """Show pid, ports, version and data dir of each node. Exit 3 when nothing runs."""
    cluster = LocalCluster(home)
    st = cluster.state()
    running = cluster.running_nodes()
    if as_json:
        payload = {
            "running": bool(running),
            "home": str(cluster.home),
            "version": st.version if st else None,
            "bootstrap_servers": st.bootstrap_servers if st else None,
            "nodes": [
                {"node_id": n.node_id, "pid": n.pid, "port": n.port, "controller_port": n.controller_port,
                 "running": pid_alive(n.pid)}
                for n in (st.nodes if st else [])
            ],
        }  # fmt: skip
        out.print_json(json.dumps(payload))
    elif st is None:
        out.print(f"no local broker has been started from {cluster.home}")
    else:
        table = Table(title=f"Kafka {st.version} — {st.bootstrap_servers} — data in {st.home}")
        for col in ("node", "pid", "port", "controller port", "state"):
            table.add_column(col)
        for n in st.nodes:
            alive = pid_alive(n.pid)
            table.add_row(
                str(n.node_id), str(n.pid or "-"), str(n.port), str(n.controller_port),
                "[green]running[/green]" if alive else "[red]stopped[/red]",
            )  # fmt: skip
        out.print(table)
    if not running:
        raise typer.Exit(3)


@broker_app.command("logs")
def broker_logs(
    node: Annotated[int, typer.Option(help="Node id.")] = 1,
    lines: Annotated[int, typer.Option("--lines", "-n")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
    home: HomeOpt = None,
) -> None:
    """Print the end of a node's server.log."""
    cluster = LocalCluster(home)
    out.print(cluster.tail(node, lines), markup=False, highlight=False)
    if follow:
        path = cluster.log_file(node)
        with path.open() as f:
            f.seek(0, os.SEEK_END)
            while True:
                line = f.readline()
                if line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                else:
                    time.sleep(0.3)


# ---- config / schema ----------------------------------------------------------------------
@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="A TOML config file.")],
    kind: Annotated[str | None, typer.Option(help="agent or processor; guessed from the file if omitted.")] = None,
) -> None:
    """Validate a config file; every problem is listed with the key it concerns."""
    from logferry.config import check_file

    model = check_file(file, kind)
    out.print(f"{file}: valid {type(model).__name__}")


@schema_app.command("show")
def schema_show(
    fingerprint: Annotated[bool, typer.Option(help="Print only the CRC-64-AVRO fingerprint.")] = False,
) -> None:
    """Print the LogEntry Avro schema (the contract) or its fingerprint."""
    from logferry.schemas import default_codec, schema_json

    if fingerprint:
        out.print(default_codec().fingerprint)
    else:
        out.print_json(json.dumps(schema_json()))


# ---- live view ----------------------------------------------------------------------------
@app.command("top")
def top(
    urls: Annotated[
        list[str] | None, typer.Argument(help="Metrics endpoints (HOST:PORT or URL); default agent and processor.")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame (rates over one interval) and exit.")] = False,
) -> None:
    """Live view of running agents and processors: rates, drops, spool, lag per partition."""
    from rich.live import Live

    from logferry.top import render, scrape

    targets = urls or ["127.0.0.1:9464", "127.0.0.1:9465"]
    prev = [scrape(u) for u in targets]
    if once:
        time.sleep(interval)  # a rate needs two scrapes an interval apart
        out.print(render(prev, [scrape(u) for u in targets]))
        return
    with Live(render(prev, prev), console=out, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            cur = [scrape(u) for u in targets]
            live.update(render(prev, cur))
            prev = cur


# ---- the main job -------------------------------------------------------------------------
@app.command("demo")
def demo(
    bootstrap_servers: BootstrapOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="A smaller, shorter run (about 30 s).")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the plot, summary and logs go.")] = Path("demo-results"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Run the whole pipeline on the local broker (or --bootstrap-servers) and report what happened."""
    from logferry.demo import run_demo

    raise typer.Exit(run_demo(bootstrap_servers, out, quick=quick, out=out_dir, as_json=as_json))


def main() -> None:
    try:
        app()
    except LogferryError as e:
        err.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
