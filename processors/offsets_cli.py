"""`logferry offsets show|reset`: consumer-group offsets, compatible with Kafka's kafka-consumer-groups."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from logferry.config import read_toml, validate
from logferry.kafka import KafkaSettings, wait_reachable
from logferry.processors.offsets import (
    TP,
    GroupOffsets,
    GroupOffsetsAdmin,
    OffsetsError,
    ResetPlan,
    ResetTarget,
    active_message,
    iso_ms,
    parse_datetime,
    parse_duration,
    parse_topic_spec,
    read_offsets_csv,
    write_offsets_csv,
)

offsets_app = typer.Typer(
    help="Show and reset consumer-group offsets (reads and writes what Kafka's kafka-consumer-groups does).",
    no_args_is_help=True,
)
out = Console()

GroupOpt = Annotated[str, typer.Option("--group", "-g", help="Consumer group id.")]
TopicsOpt = Annotated[
    list[str] | None,
    typer.Option("--topic", "-t", help="TOPIC or TOPIC:P,P (repeatable), e.g. logs or logs:0,2."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap-servers", "-b", envvar="LOGFERRY_BOOTSTRAP_SERVERS", help="Kafka cluster host:port,..."),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Take Kafka settings from the kafka table of this TOML file.")
]


def connect(bootstrap: str | None, config: Path | None) -> GroupOffsetsAdmin:
    kafka = read_toml(config).get("kafka", {}) if config else {}
    if bootstrap:
        kafka = {**kafka, "bootstrap_servers": bootstrap}
    settings = validate(KafkaSettings, kafka, str(config) if config else "kafka settings")
    wait_reachable(settings, timeout=10.0)
    return GroupOffsetsAdmin(settings)


def _offset(value: int | None) -> str:
    return "-" if value is None else str(value)


@offsets_app.command("show")
def show(
    group: GroupOpt,
    topic: TopicsOpt = None,
    as_json: JsonOpt = False,
    bootstrap_servers: BootstrapOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Per partition: committed offset, log end, lag, time of the committed entry; and the group's members."""
    specs = [parse_topic_spec(t) for t in topic or []]
    view = connect(bootstrap_servers, config).show(group, specs)
    if as_json:
        out.print_json(json.dumps(view.to_json()))
    else:
        _print_group(view)


def _print_group(view: GroupOffsets) -> None:
    table = Table(title=f"group {view.group} — {view.state} — {len(view.members)} member(s)")
    for col in ("topic", "partition", "committed", "log end", "lag", "committed entry at", "member"):
        # fold, never cut: a truncated topic name or time is worse than a taller table
        table.add_column(col, justify="right" if col in ("partition", "committed", "log end", "lag") else "left",
                         overflow="fold")  # fmt: skip
    for p in view.partitions:
        table.add_row(
            p.topic, str(p.partition), _offset(p.committed), str(p.log_end), _offset(p.lag),
            iso_ms(p.committed_timestamp_ms) or "-", p.member or "-",
        )  # fmt: skip
    out.print(table)
    for m in view.members:
        assigned = ", ".join(f"{t}:{p}" for t, p in m.assignment) or "nothing"
        out.print(f"member {escape(m.client_id)} ({escape(m.member_id)}) on {escape(m.host)}: {escape(assigned)}")


@offsets_app.command("reset")
def reset(
    group: GroupOpt,
    topic: TopicsOpt = None,
    all_topics: Annotated[bool, typer.Option("--all-topics", help="Every topic the group has offsets for.")] = False,
    to_datetime: Annotated[
        str | None, typer.Option(help="ISO-8601 time; first entry at or after it (no zone = local time, as Kafka).")
    ] = None,
    by_duration: Annotated[str | None, typer.Option(help="ISO-8601 duration back from now, e.g. PT1H.")] = None,
    to_earliest: Annotated[bool, typer.Option("--to-earliest", help="The log start.")] = False,
    to_latest: Annotated[bool, typer.Option("--to-latest", help="The log end.")] = False,
    to_offset: Annotated[int | None, typer.Option(help="This offset, clamped between log start and log end.")] = None,
    shift_by: Annotated[int | None, typer.Option(help="Committed offset ± N, clamped.")] = None,
    from_file: Annotated[Path | None, typer.Option(help="CSV topic,partition,offset (as written by --export).")] = None,
    execute: Annotated[bool, typer.Option("--execute", help="Apply; without it nothing changes (dry run).")] = False,
    export: Annotated[
        Path | None, typer.Option(help="Write the CURRENT offsets of these partitions as CSV first (undo file).")
    ] = None,
    as_json: JsonOpt = False,
    bootstrap_servers: BootstrapOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Plan a reset and print old → new per partition; --execute applies it (only while the group is inactive)."""
    chosen = {
        "--to-datetime": to_datetime is not None, "--by-duration": by_duration is not None,
        "--to-earliest": to_earliest, "--to-latest": to_latest, "--to-offset": to_offset is not None,
        "--shift-by": shift_by is not None, "--from-file": from_file is not None,
    }  # fmt: skip
    given = [name for name, on in chosen.items() if on]
    if len(given) != 1:
        got = f" (got {', '.join(given)})" if given else ""
        raise OffsetsError(f"give exactly one of {', '.join(chosen)}{got}")
    if all_topics and topic:
        raise OffsetsError("give --topic or --all-topics, not both")
    specs = [parse_topic_spec(t) for t in topic or []]
    target = _target(group, to_datetime, by_duration, to_earliest, to_latest, to_offset, shift_by, from_file)
    admin = connect(bootstrap_servers, config)
    plan = admin.plan(group, target, specs, all_topics)
    if export is not None:
        current: dict[TP, int] = {(r.topic, r.partition): r.old for r in plan.resets if r.old is not None}
        write_offsets_csv(export, current)
    if execute:
        admin.execute(plan)
    if as_json:
        out.print_json(json.dumps(_plan_json(plan, execute)))
        return
    _print_plan(plan, execute)
    if export is not None:
        out.print(f"current offsets of {len(current)} partition(s) written to {escape(str(export))}")


def _target(
    group: str,
    to_datetime: str | None,
    by_duration: str | None,
    to_earliest: bool,
    to_latest: bool,
    to_offset: int | None,
    shift_by: int | None,
    from_file: Path | None,
) -> ResetTarget:
    if to_datetime is not None:
        return ResetTarget("to_datetime", parse_datetime(to_datetime))
    if by_duration is not None:
        return ResetTarget("by_duration", parse_duration(by_duration))
    if to_earliest:
        return ResetTarget("to_earliest")
    if to_latest:
        return ResetTarget("to_latest")
    if to_offset is not None:
        return ResetTarget("to_offset", to_offset)
    if shift_by is not None:
        return ResetTarget("shift_by", shift_by)
    assert from_file is not None
    return ResetTarget("from_file", read_offsets_csv(from_file, group))


def _plan_json(plan: ResetPlan, executed: bool) -> dict[str, object]:
    return {
        "group": plan.group,
        "state": plan.state,
        "executed": executed,
        "partitions": [
            {"topic": r.topic, "partition": r.partition, "old_offset": r.old, "new_offset": r.new, "note": r.note}
            for r in plan.resets
        ],
    }


def _print_plan(plan: ResetPlan, executed: bool) -> None:
    table = Table(title=f"group {plan.group} — {'reset applied' if executed else 'dry run, nothing changed'}")
    for col in ("topic", "partition", "old", "", "new", "note"):
        table.add_column(col, justify="right" if col in ("partition", "old", "new") else "left", overflow="fold")
    for r in plan.resets:
        table.add_row(r.topic, str(r.partition), _offset(r.old), "→", str(r.new), escape(r.note or ""))
    out.print(table)
    for r in plan.resets:
        if r.note:  # also as lines: a table cell may be cut on a narrow terminal
            out.print(f"note: {escape(r.topic)}:{r.partition}: {escape(r.note)}")
    if not executed:
        out.print("dry run: add --execute to apply")
        if plan.active_members:
            warning = active_message(plan.group, plan.state, plan.active_members)
            out.print(f"[yellow]warning:[/yellow] {escape(warning)}")
