"""`logferry bench replay`: live replay of a running group vs a raw confluent-kafka loop.

The topic is filled once (the `bench process` filler: 6 partitions, 1000 keys, Avro LogEntry),
stamped from a time T taken just before. Then, each side in its own subprocess:

- runtime: a running `Processor` (key-ordered, no-op handler) whose group sits at the log end
  gets a `logferry replay --to-datetime T` command on the control topic; the clock runs from
  publishing the command, through the members' seek (the acknowledgement), to the last
  replayed record handled.
- raw: a bare consumer resolves T with offsets_for_times, assigns, and reads the same range
  with consume(500) + decode + the same no-op.

Sides alternate over the repetitions; the table, JSON and chart are the other suites' (rates
include the seek).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any

import typer
from confluent_kafka import Consumer, TopicPartition

from logferry.bench.common import (
    DEFAULT_OUT,
    BootstrapOpt,
    FullOpt,
    OutOpt,
    RepeatOpt,
    Report,
    Run,
    Sample,
    Spread,
    alternate,
    finish,
    kafka,
    machine_info,
    out,
    ratio,
    repetitions,
)
from logferry.bench.process import PARTITIONS, _cpu_seconds, _peak_rss_mb, fill


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
    entries: Annotated[int | None, typer.Option(help="Records to replay (default 200000, --full 1M).")] = None,
    bootstrap_servers: BootstrapOpt = None,
    repeat: RepeatOpt = None,
    full: FullOpt = False,
    out_dir: OutOpt = DEFAULT_OUT,
) -> None:
    """Seek a running group to a time and re-process: logferry replay vs a raw confluent-kafka loop."""
    n = entries or (1_000_000 if full else 200_000)
    with kafka(bootstrap_servers) as bootstrap:
        finish(measure(bootstrap, n, repetitions(repeat, full), full), out_dir)


def measure(bootstrap: str, n: int, repeat: int, full: bool = False) -> Report:
    topic = f"bench-replay-{uuid.uuid4().hex[:8]}"
    since_ms = int(time.time() * 1000) - 1
    with out.status(f"filling {topic} with {n} records…"):
        avg = fill(bootstrap, topic, n) / n
    report = Report(
        "replay", f"seek a group to a time, re-process {n} records ({PARTITIONS} partitions, ~{avg:.0f} B each)",
        {"entries": n, "partitions": PARTITIONS, "repetitions": repeat, "full": full}, machine_info({}),
    )  # fmt: skip
    runs = {"raw": Run("raw: offsets_for_times + assign + consume(500) + decode", avg),
            "runtime": Run("logferry replay → running Processor (key-ordered, 64 threads)", avg)}  # fmt: skip
    seeks: dict[str, list[float]] = {"raw": [], "runtime": []}

    def side(name: str) -> Callable[[], Sample]:
        def run() -> Sample:
            args = {"bootstrap": bootstrap, "topic": topic, "n": n, "since_ms": since_ms}
            if name == "runtime":
                args["control"] = f"bench-control-{uuid.uuid4().hex[:8]}"
            r = _side(name, args)
            seeks[name].append(r["seek"])
            return Sample(r["entries"], r["seconds"], r["cpu_seconds"], r["peak_rss_mb"])

        return run

    with out.status(f"replay: raw and logferry x {repeat}…"):
        alternate({k: side(k) for k in runs}, runs, repeat)
    report.runs = list(runs.values())
    report.ratios.append(ratio("re-processing: logferry replay / raw loop", runs["runtime"], runs["raw"]))
    report.extra["seek_s"] = {k: asdict(Spread.of(v)) for k, v in seeks.items()}
    raw_seek, rt_seek = (Spread.of(seeks[k]).median for k in ("raw", "runtime"))
    report.notes.append(
        f"seek (median): logferry command → every member acknowledged {rt_seek * 1000:.0f} ms; "
        f"raw offsets_for_times + assign {raw_seek * 1000:.0f} ms. Rates include the seek."
    )
    return report


if __name__ == "__main__":
    side, args = sys.argv[1], json.loads(sys.argv[2])
    result = _raw(**args) if side == "raw" else _runtime(**args)
    print(json.dumps(result))
