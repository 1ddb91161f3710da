"""`logferry process`: run a handler (or a built-in) as a member of a consumer group."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from logferry.config import deep_merge, read_toml, validate
from logferry.errors import ConfigError
from logferry.metrics import BUILD_INFO, MetricsServer
from logferry.processors.app import Processor
from logferry.processors.builtins import make_builtin
from logferry.processors.config import ProcessorConfig
from logferry.processors.replay import apply_replay_options

log = logging.getLogger("logferry.processors.cli")


def load_handler(spec: str) -> Any:
    """'pkg.module:function' -> the function (the current directory is importable, like `python -m`)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"--handler {spec!r}: expected pkg.module:function")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"--handler {spec!r}: cannot import {e.name}") from None
    except AttributeError:
        raise ConfigError(f"--handler {spec!r}: module {module} has no {name!r}") from None
    if not callable(fn):
        raise ConfigError(f"--handler {spec!r}: {name} is not callable")
    return fn


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    """Flags left unset must not override the config file (or the model's defaults)."""
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def process(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="A processor TOML file.")] = None,
    handler: Annotated[str | None, typer.Option(help="pkg.module:function taking (entry, ctx).")] = None,
    builtin: Annotated[str | None, typer.Option(help="stats, archive or forward instead of a handler.")] = None,
    topic: Annotated[list[str] | None, typer.Option("--topic", "-t", help="Topic to consume (repeatable).")] = None,
    low_topic: Annotated[
        list[str] | None, typer.Option("--low-priority-topic", help="Served only when --topic has no work.")
    ] = None,
    group: Annotated[str | None, typer.Option("--group", "-g", help="Consumer group id.")] = None,
    ordering: Annotated[str | None, typer.Option(help="key (default), partition or unordered.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Parallel handler calls (threads or tasks).")] = None,
    inline: Annotated[
        bool | None, typer.Option("--inline", help="Run the handler on the poll thread (fast CPU-bound handlers).")
    ] = None,
    pin_to_cpu: Annotated[
        int | None, typer.Option(help="Run the poll loop and workers on this CPU (GIL-bound, fast handlers).")
    ] = None,
    max_in_flight: Annotated[int | None, typer.Option(help="Pause fetching above this many records.")] = None,
    rate_limit: Annotated[float | None, typer.Option(help="At most this many entries/s for this process.")] = None,
    retries: Annotated[int | None, typer.Option(help="In-place retries before giving up on a record.")] = None,
    retry_delay: Annotated[
        list[float] | None, typer.Option("--retry-delay", help="Seconds; adds a <topic>.retry.<delay> stage.")
    ] = None,
    dead_letter_topic: Annotated[str | None, typer.Option(help="Default: <group>.dlq")] = None,
    level: Annotated[list[str] | None, typer.Option("--level", help="Only entries of these levels.")] = None,
    archive_dir: Annotated[Path | None, typer.Option(help="Directory for --builtin archive.")] = None,
    forward_topic: Annotated[str | None, typer.Option(help="Target topic for --builtin forward.")] = None,
    metrics_address: Annotated[str | None, typer.Option(help="HOST:PORT for /metrics, /healthz, /readyz.")] = None,
    bootstrap_servers: Annotated[
        str | None, typer.Option("--bootstrap-servers", "-b", envvar="LOGFERRY_BOOTSTRAP_SERVERS")
    ] = None,
    replay_from: Annotated[
        str | None, typer.Option(help="Start each partition at the first entry at or after this ISO-8601 time, once.")
    ] = None,
    replay_by: Annotated[
        str | None, typer.Option(help="Like --replay-from, this ISO-8601 duration ago (PT30M).")
    ] = None,
    as_group: Annotated[
        str | None, typer.Option(help="Run as this other group (rebuild a store beside the live group).")
    ] = None,
    exactly_once: Annotated[
        bool | None, typer.Option("--exactly-once", help="Handler results and offsets in one transaction.")
    ] = None,
    output_topic: Annotated[str | None, typer.Option(help="Where --exactly-once writes handler results.")] = None,
    member_id: Annotated[
        str | None, typer.Option(help="Stable id of this member across restarts (default: host name).")
    ] = None,
) -> None:
    """Run a processor: a consumer-group member that hands each entry to a handler, in key order."""
    section: dict[str, Any] = {
        "group": group, "topics": topic or None, "low_priority_topics": low_topic or None, "handler": handler,
        "builtin": builtin, "ordering": ordering, "concurrency": concurrency, "inline": inline,
        "pin_to_cpu": pin_to_cpu, "max_in_flight": max_in_flight,
        "rate_limit": rate_limit, "retries": retries, "retry_delays": retry_delay or None,
        "dead_letter_topic": dead_letter_topic, "filter": {"levels": level} if level else None,
        "exactly_once": exactly_once, "output_topic": output_topic, "member_id": member_id,
    }  # fmt: skip
    over: dict[str, Any] = {
        "processor": section,
        "kafka": {"bootstrap_servers": bootstrap_servers},
        "metrics": {"address": metrics_address},
        "archive": {"directory": str(archive_dir)} if archive_dir else None,
        "forward": {"topic": forward_topic} if forward_topic else None,
    }
    data = deep_merge(read_toml(config) if config else {}, _without_none(over))
    cfg = validate(ProcessorConfig, data, str(config) if config else "command line")
    p = apply_replay_options(cfg.kafka, cfg.processor, replay_from, replay_by, as_group)
    if bool(p.handler) == bool(p.builtin):
        raise ConfigError("give exactly one of --handler pkg.module:function or --builtin stats|archive|forward")
    fn = load_handler(p.handler) if p.handler else make_builtin(p.builtin or "", p.group, cfg.kafka,
                                                                cfg.archive, cfg.forward)  # fmt: skip
    app = Processor(kafka=cfg.kafka, **p.model_dump(exclude={"handler", "builtin"}))
    app.handler(fn)
    server = None
    if cfg.metrics.enabled:
        BUILD_INFO.info({"role": "processor", "group": p.group})
        server = MetricsServer(cfg.metrics.address)
        server.health.ready = lambda: app._runtime is not None and app.runtime.assigned_event.is_set()
        server.start()
    try:
        app.run()
    finally:
        close = getattr(fn, "close", None)
        if callable(close):
            close()
        if server is not None:
            server.stop()
