"""`logferry bench replay`: live replay of a running group vs a raw confluent-kafka loop, one run.

The topic is filled once (the `bench process` filler: 6 partitions, 1000 keys, Avro LogEntry),
stamped from a time T taken just before. Then, each side in its own subprocess:

- runtime: a running `Processor` (key-ordered, no-op handler) whose group sits at the log end
  gets a `logferry replay --to-datetime T` command on the control topic; the clock runs from
  publishing the command, through the members' seek (the acknowledgement), to the last
  replayed record handled.
- raw: a bare consumer resolves T with offsets_for_times, assigns, and reads the same range
  with consume(500) + decode + the same no-op.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
import uuid
from typing import Annotated, Any

import typer
from confluent_kafka import Consumer, TopicPartition
from rich.console import Console
from rich.table import Table

from logferry.bench.process import PARTITIONS, _cpu_seconds, _peak_rss_mb, fill

out = Console(width=150)


def _raw(bootstrap: str, topic: str, n: int, since_ms: int) -> dict[str, Any]:
    from logferry.schemas import default_codec

    codec = default_codec()
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})  # fmt: skip
    t0 = time.perf_counter()
    c.assign(c.offsets_for_times([TopicPartition(topic, p, since_ms) for p in range(PARTITIONS)], timeout=30))
    sought = time.perf_counter()
    seen, nbytes = 0, 0
    while seen < n:
        for m in c.consume(500, 1.0):
            if m.error() is None:
                v = m.value()
                nbytes += len(v)
                codec.decode(v, m.headers())
                seen += 1
    last = time.perf_counter()
    c.close()
    return {"entries": seen, "seek": sought - t0, "seconds": last - t0, "bytes": nbytes,
            "peak_rss_mb": _peak_rss_mb(), "cpu_seconds": _cpu_seconds()}  # fmt: skip


def _runtime(bootstrap: str, topic: str, n: int, since_ms: int, control: str) -> dict[str, Any]:
    from logferry.kafka import KafkaSettings
    from logferry.processors import Processor
    from logferry.processors.control import ReplayCommand, publish_and_wait
    from logferry.processors.offsets import GroupOffsetsAdmin, ResetTarget

    group = f"bench-replay-{uuid.uuid4().hex[:8]}"
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    admin = GroupOffsetsAdmin(kafka)
    admin.execute(admin.plan(group, ResetTarget("to_latest"), [(topic, None)]))  # a group that is caught up
    counter = itertools.count(1)
    done = threading.Event()
    nbytes = [0]

    def handle(entry: object, ctx: Any) -> None:
        nbytes[0] += len(ctx.value)  # races lose a few bytes at most; the count below is exact
        if next(counter) == n:
            done.set()

    app = Processor(group, [topic], kafka=kafka, ordering="key", concurrency=64, control_topic=control)
    app.handler(handle)
    t = threading.Thread(target=app.run, kwargs={"install_signals": False}, daemon=True)
    t.start()
    if not app.wait_assigned(60):
        raise RuntimeError("the member got no partitions")
    member = app.runtime.consumer.memberid()
    t0 = time.perf_counter()
    acks = publish_and_wait(kafka, ReplayCommand(group, "datetime", since_ms), {member}, 60, control)
    sought = time.perf_counter()
    if member not in acks:
        raise RuntimeError("the member did not acknowledge the replay")
    done.wait(900)
    last = time.perf_counter()
    app.stop()
    t.join(30)
    return {"entries": n, "seek": sought - t0, "seconds": last - t0, "bytes": nbytes[0],
            "peak_rss_mb": _peak_rss_mb(), "cpu_seconds": _cpu_seconds()}  # fmt: skip


def _side(name: str, args: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "logferry.bench.replay", name, json.dumps(args)],
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"bench side {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def replay(
    entries: Annotated[int, typer.Option(help="Records to replay.")] = 200_000,
    full: Annotated[bool, typer.Option("--full", help="1M records.")] = False,
    rounds: Annotated[int, typer.Option(help="Alternating rounds of the two sides (best kept).")] = 1,
    bootstrap_servers: Annotated[
        str | None, typer.Option("--bootstrap-servers", "-b", help="Use this Kafka instead of a throw-away one.")
    ] = None,
) -> None:
    """Live replay of a running group (control topic, seek, re-process) vs a raw confluent-kafka loop."""
    n = 1_000_000 if full else entries
    if bootstrap_servers:
        _run(bootstrap_servers, n, rounds)
        return
    from logferry.broker import ephemeral_cluster

    with out.status("starting a throw-away Kafka…"), ephemeral_cluster() as cluster:
        _run(cluster.bootstrap_servers, n, rounds)


def _run(bootstrap: str, n: int, rounds: int) -> None:
    topic = f"bench-replay-{uuid.uuid4().hex[:8]}"
    control = f"bench-control-{uuid.uuid4().hex[:8]}"
    since_ms = int(time.time() * 1000) - 1
    with out.status(f"filling {topic} with {n} records…"):
        value_bytes = fill(bootstrap, topic, n)
    avg = value_bytes / n
    raws, rts = [], []
    with out.status("running the sides…"):
        for _ in range(rounds):  # alternate: the machine is shared
            raws.append(_side("raw", {"bootstrap": bootstrap, "topic": topic, "n": n, "since_ms": since_ms}))
            rts.append(_side("runtime", {"bootstrap": bootstrap, "topic": topic, "n": n, "since_ms": since_ms,
                                         "control": control}))  # fmt: skip
    raw = min(raws, key=lambda r: r["seconds"])
    rt = min(rts, key=lambda r: r["seconds"])
    table = Table(title=f"logferry bench replay — {n} records, {PARTITIONS} partitions, ~{avg:.0f} B/record")
    for col in ("side", "seek s", "total s", "records/s", "MB/s", "CPU s", "peak RSS MB"):
        table.add_column(col, justify="left" if col == "side" else "right")
    for name, r in (("raw: offsets_for_times + assign + consume(500) + decode", raw),
                    ("logferry replay → running Processor (key-ordered, 64 threads)", rt)):  # fmt: skip
        rate = r["entries"] / r["seconds"]
        table.add_row(name, f"{r['seek']:.3f}", f"{r['seconds']:.2f}", f"{rate:,.0f}", f"{rate * avg / 1e6:.1f}",
                      f"{r['cpu_seconds']:.1f}", f"{r['peak_rss_mb']:.0f}")  # fmt: skip
    out.print(table)
    out.print(f"runtime / raw records/s: {raw['seconds'] / rt['seconds']:.2f}x "
              f"(seek: command → every member acknowledged {rt['seek'] * 1000:.0f} ms, raw lookup+assign "
              f"{raw['seek'] * 1000:.0f} ms)")  # fmt: skip


if __name__ == "__main__":
    side, args = sys.argv[1], json.loads(sys.argv[2])
    result = _raw(**args) if side == "raw" else _runtime(**args)
    print(json.dumps(result))
