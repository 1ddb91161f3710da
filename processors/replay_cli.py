"""`logferry replay --group G --to-datetime ISO | --by-duration PT30M | --to-earliest`: replay a running group.

Publishes a command on the control topic (processors/control.py); every running member seeks
the partitions it owns and carries on, and acknowledges. Prints old → new per partition and
exits 1 when a member did not answer within --wait (re-run to cover it: a new command id).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from logferry.processors.control import CONTROL_TOPIC, ReplayCommand, ack_rows, publish_and_wait
from logferry.processors.offsets import OffsetsError, parse_datetime, parse_duration
from logferry.processors.offsets_cli import BootstrapOpt, ConfigOpt, GroupOpt, JsonOpt, connect

out = Console()


def command_for(
    group: str, to_datetime: str | None, by_duration: str | None, to_earliest: bool, topics: list[str] | None
) -> ReplayCommand:
    """The command the flags ask for; exactly one target, parsed with the offsets tool's rules."""
    chosen = [n for n, v in (("--to-datetime", to_datetime), ("--by-duration", by_duration),
                             ("--to-earliest", to_earliest or None)) if v is not None]  # fmt: skip
    if len(chosen) != 1:
        raise OffsetsError(f"give exactly one of --to-datetime, --by-duration, --to-earliest (got {len(chosen)})")
    if to_earliest:
        return ReplayCommand(group, "earliest", topics=topics or None)
    if to_datetime is not None:
        return ReplayCommand(group, "datetime", parse_datetime(to_datetime), topics=topics or None)
    assert by_duration is not None
    since = datetime.now(UTC) - parse_duration(by_duration)
    return ReplayCommand(group, "datetime", int(since.timestamp() * 1000), topics=topics or None)


def replay(
    group: GroupOpt,
    to_datetime: Annotated[str | None, typer.Option(help="First entry at or after this ISO-8601 time.")] = None,
    by_duration: Annotated[str | None, typer.Option(help="This ISO-8601 duration ago (PT30M, P1D).")] = None,
    to_earliest: Annotated[bool, typer.Option("--to-earliest", help="The earliest retained entry.")] = False,
    topic: Annotated[
        list[str] | None, typer.Option("--topic", "-t", help="Only these topics (default: all the group's).")
    ] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for every member's acknowledgement.")] = 15.0,
    control_topic: Annotated[str, typer.Option(help="The processors' control topic.")] = CONTROL_TOPIC,
    as_json: JsonOpt = False,
    bootstrap_servers: BootstrapOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Replay a RUNNING group from a time without stopping it: every member seeks its partitions and carries on."""
    cmd = command_for(group, to_datetime, by_duration, to_earliest, topic)
    admin = connect(bootstrap_servers, config)
    state, members, inactive = admin.describe(group)
    if inactive:
        known = admin.committed(group)
        if not known:
            raise OffsetsError(f"group {group} is unknown on {admin.settings.bootstrap_servers}: no members, "
                               "no committed offsets (check the name with `logferry offsets show`)")  # fmt: skip
        raise OffsetsError(
            f"group {group} has no running members (state {state}): nobody would act on a live replay; move its "
            "offsets with `logferry offsets reset --group ... --to-datetime ... --execute` instead"
        )
    acks = publish_and_wait(admin.settings, cmd, {m.member_id for m in members}, wait, control_topic)
    silent = sorted(m.member_id for m in members if m.member_id not in acks)
    rows = ack_rows(acks)
    if as_json:
        print(json.dumps({"id": cmd.id, "group": group, "target": cmd.describe(), "partitions": rows,
                          "silent_members": silent}, indent=2))  # fmt: skip
    else:
        table = Table(title=f"replay {cmd.id} of group {group} to {cmd.describe()}")
        for col in ("member", "topic", "partition", "old", "new", "note"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["member"][-24:], r["topic"], str(r["partition"]), str(r["old"] if r["old"] is not None
                          else "-"), str(r["new"] if r["new"] is not None else "-"), r["note"])  # fmt: skip
        out.print(table)
        for m in silent:
            out.print(f"[yellow]member {m} did not acknowledge within {wait:.0f}s; re-run to cover its partitions[/]")
    if silent:
        raise typer.Exit(1)
