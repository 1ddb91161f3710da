"""`logferry collect`: run the collector agent from a TOML file and/or quick flags.

    logferry collect --source unixgram:/run/app.sock --source stdin --parser json --key service --topic logs

Flags override the file; each `--source KIND:ADDRESS` adds a source to the file's list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from logferry.errors import ConfigError


def parse_source_flag(value: str) -> dict[str, str]:
    kind, _, address = value.partition(":")
    if not kind:
        raise ConfigError(f"--source {value!r}: expected KIND:ADDRESS, e.g. unix:/run/app.sock or stdin")
    return {"kind": kind, "address": address}


def flag_overrides(
    bootstrap_servers: str | None,
    parser: str | None,
    key: str | None,
    topic: str | None,
    metrics_address: str | None,
    buffer_policy: str | None,
    grace_period: float | None = None,
) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": bootstrap_servers},
        "parser": {"kind": parser} if parser else None,
        "key": {"field": key} if key else None,
        "route": {"topic": topic} if topic else None,
        "metrics": {"address": metrics_address} if metrics_address else None,
        "buffer": {"policy": buffer_policy} if buffer_policy else None,
        "agent": {"grace_period": grace_period} if grace_period is not None else None,
    }


def collect(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Agent config file (TOML).")] = None,
    source: Annotated[
        list[str] | None,
        typer.Option("--source", "-s", help="KIND:ADDRESS, repeatable: unix:/run/app.sock, unixgram:PATH, stdin, ..."),
    ] = None,
    parser: Annotated[
        str | None, typer.Option(help="raw, json, syslog, logfmt or regex (needs a config pattern).")
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="Field used as the Kafka key: service, host, or an attribute.")
    ] = None,
    topic: Annotated[str | None, typer.Option(help="Topic or template, e.g. logs or logs.{service}.")] = None,
    bootstrap_servers: Annotated[
        str | None, typer.Option("--bootstrap-servers", "-b", envvar="LOGFERRY_BOOTSTRAP_SERVERS", help="host:port,...")
    ] = None,
    metrics_address: Annotated[str | None, typer.Option(help="HOST:PORT for /metrics, /healthz, /readyz.")] = None,
    buffer_policy: Annotated[str | None, typer.Option(help="block, drop_newest, drop_oldest or spill.")] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            envvar="LOGFERRY_STATE_DIR",
            help="Checkpoints and spool. Default ~/.local/state/logferry/agent (root: /var/lib/logferry).",
        ),
    ] = None,
    grace_period: Annotated[float | None, typer.Option(help="Seconds to drain into Kafka on SIGTERM.")] = None,
    pin_to_cpu: Annotated[
        int | None, typer.Option(help="Run the source and sink threads on this CPU (Kafka's threads stay free).")
    ] = None,
) -> None:
    """Run the collector agent: local IPC sources → Avro → Kafka, until SIGTERM (or EOF for stdin)."""
    from logferry.collectors.agent import Agent
    from logferry.collectors.config import AgentConfig
    from logferry.config import deep_merge, read_toml, validate

    overrides = flag_overrides(bootstrap_servers, parser, key, topic, metrics_address, buffer_policy, grace_period)
    if state_dir is not None:
        overrides["agent"] = {**(overrides["agent"] or {}), "state_dir": str(state_dir)}
    if pin_to_cpu is not None:
        overrides["agent"] = {**(overrides["agent"] or {}), "pin_to_cpu": pin_to_cpu}
    data = read_toml(config) if config else {}
    data = deep_merge(data, overrides)
    extra_sources = [parse_source_flag(s) for s in source or []]
    if extra_sources:
        data["sources"] = [*data.get("sources", []), *extra_sources]
    settings = validate(AgentConfig, data, str(config) if config else "flags")
    raise typer.Exit(Agent(settings, config, overrides, extra_sources).run())
