"""`logferry spool check|repair DIR`: inspect and mend a disk spool without an agent running."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from logferry.collectors.spool import read_cursor
from logferry.collectors.spool_repair import SegmentReport, check_spool, repair_spool

spool_app = typer.Typer(help="Inspect and mend the agent's disk spool (the `spill` buffer).", no_args_is_help=True)
out = Console()

DirArg = Annotated[Path, typer.Argument(help="The spool directory (<state-dir>/spool).")]


def _table(title: str, reports: list[SegmentReport]) -> Table:
    table = Table(title=title)
    for col in ("segment", "records", "bytes", "damaged spans", "damaged bytes", "torn tail"):
        table.add_column(col)
    for r in reports:
        table.add_row(r.name, str(r.records), str(r.bytes), str(r.damaged_spans), str(r.damaged_bytes),
                      "yes" if r.torn_tail else "")  # fmt: skip
    return table


def _summary(reports: list[SegmentReport]) -> str:
    records = sum(r.records for r in reports)
    size = sum(r.bytes for r in reports)
    damaged = sum(r.damaged_spans for r in reports)
    return f"{len(reports)} segment(s), {records} record(s), {size} bytes, {damaged} damaged span(s)"


@spool_app.command("check")
def check(directory: DirArg) -> None:
    """Report segments, records, bytes and damaged records. Exit 1 when anything is damaged."""
    reports = check_spool(directory)
    cursor = read_cursor(directory)
    out.print(_table(f"spool {directory} — ack cursor at segment {cursor.segment}, offset {cursor.offset}", reports))
    out.print(_summary(reports))
    if any(r.damaged_spans for r in reports):
        out.print(f"damaged records found: `logferry spool repair {directory}` keeps every intact record")
        raise typer.Exit(1)


@spool_app.command("repair")
def repair(directory: DirArg) -> None:
    """Cut torn tails and damaged spans out of the segments; every intact record is kept."""
    before = repair_spool(directory)
    after = check_spool(directory)
    out.print(f"before: {_summary(before)}")
    out.print(f"after:  {_summary(after)}")
    if any(r.damaged_spans for r in after):
        raise typer.Exit(1)
