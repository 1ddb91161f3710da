"""`logferry bench process`: the processor runtime beside hand-written confluent-kafka loops, one run.

Two comparisons on the same pre-filled topic (6 partitions, 1000 keys, Avro LogEntry):

1. no-op handler: `Processor(ordering="key")`, on 64 worker threads (also with `pin_to_cpu`)
   and `inline` on the poll thread, vs a raw `consume(500)` loop that decodes each
   record with the same codec and calls the same no-op (the least a real consumer does);
   the same loop decoding with plain fastavro (as one written without logferry would) and a
   loop that does not even decode are printed too, for scale.
2. a 5 ms I/O-bound handler (time.sleep on threads, asyncio.sleep on the event loop) vs a
   sequential consumer calling the same handler one record at a time.

Each side runs in its own subprocess (its own GIL, its own peak RSS), with a fresh group;
the clock runs from the first record handled to the last. `--profile` runs the no-op
runtime side under cProfile and prints its top functions.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import itertools
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any

import typer
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from logferry.bench.common import (
    DEFAULT_OUT,
    BootstrapOpt,
    FullOpt,
    OutOpt,
    RepeatOpt,
    Report,
    Run,
    Sample,
    alternate,
    finish,
    java_version,
    kafka,
    machine_info,
    out,
    ratio,
    repetitions,
)
from logferry.broker.maven import DEFAULT_KAFKA_VERSION

PARTITIONS = 6
KEYS = 1000


# ---- the sides (each runs in a subprocess: `python -m logferry.bench.process SIDE ARGS`) -----
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _raw(bootstrap: str, topic: str, n: int, decode: str | None, sleep: float = 0.0) -> dict[str, Any]:
    """decode: "logferry" (the codec the Processor uses), "fastavro" (schemaless_reader, as a loop written
    without logferry would) or None."""
    from fastavro import schemaless_reader

    from logferry.schemas import default_codec

    if decode not in ("logferry", "fastavro", None):
        raise ValueError(f"unknown decode {decode!r}")
    codec = default_codec()
    schema = codec.schema
    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })  # fmt: skip
    c.subscribe([topic])
    seen, nbytes, t0, cpu0 = 0, 0, None, 0.0
    while seen < n:
        msgs = c.consume(500, 1.0)
        if msgs and t0 is None:
            t0, cpu0 = time.perf_counter(), _cpu_seconds()
        for m in msgs:
            if m.error() is not None:
                continue
            v = m.value()
            nbytes += len(v)
            if decode == "logferry":
                _noop(codec.decode(v, m.headers()), m)
            elif decode == "fastavro":
                _noop(schemaless_reader(io.BytesIO(v), schema, schema), m)
            if sleep:
                time.sleep(sleep)
            seen += 1
    seconds, window_cpu = time.perf_counter() - (t0 or time.perf_counter()), _cpu_seconds() - cpu0
    c.commit(asynchronous=False)
    c.close()
    return {"entries": seen, "seconds": seconds, "bytes": nbytes, "peak_rss_mb": _peak_rss_mb(),
            "cpu_seconds": _cpu_seconds(), "window_cpu_seconds": window_cpu}  # fmt: skip


def _noop(entry: object, ctx: object) -> None:
    return None


def _runtime(
    bootstrap: str, topic: str, n: int, kind: str, concurrency: int, profile: bool = False, inline: bool = False,
    pin_to_cpu: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    from logferry.processors import Processor

    counter = itertools.count(1)
    stamps: dict[str, float] = {}
    done = threading.Event()

    def begin() -> None:
        if "first" not in stamps:
            stamps["first"], stamps["cpu0"] = time.perf_counter(), _cpu_seconds()

    def finish() -> None:
        if next(counter) == n:
            stamps["last"], stamps["cpu1"] = time.perf_counter(), _cpu_seconds()
            done.set()

    if kind == "noop":

        def handle(entry: object, ctx: Any) -> None:
            # As little per record as the raw loop's `seen += 1`: one count, no calls.
            i = next(counter)
            if i == 1:
                begin()
            if i == n:
                stamps["last"], stamps["cpu1"] = time.perf_counter(), _cpu_seconds()
                done.set()
    elif kind == "sleep":

        def handle(entry: object, ctx: Any) -> None:
            begin()
            time.sleep(0.005)
            finish()
    else:

        async def handle(entry: object, ctx: Any) -> None:  # type: ignore[misc]
            begin()
            await asyncio.sleep(0.005)
            finish()

    app = Processor(group=f"bench-rt-{uuid.uuid4().hex[:8]}", topics=[topic], bootstrap_servers=bootstrap,
                    ordering="key", concurrency=concurrency, inline=inline, pin_to_cpu=pin_to_cpu)  # fmt: skip
    app.handler(handle)
    prof = cProfile.Profile() if profile else None

    def run() -> None:
        # cProfile sees the thread it is enabled in: the poll thread, where the per-record work is.
        if prof:
            prof.enable()
        try:
            app.run(install_signals=False)
        finally:
            if prof:
                prof.disable()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    done.wait(600)
    app.stop()
    t.join(30)
    result = {
        "entries": n, "seconds": stamps["last"] - stamps["first"], "peak_rss_mb": _peak_rss_mb(),
        "cpu_seconds": _cpu_seconds(), "window_cpu_seconds": stamps["cpu1"] - stamps["cpu0"],
    }  # fmt: skip
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
        result["profile"] = buf.getvalue()
    return result


def _side(name: str, args: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "logferry.bench.process", name, json.dumps(args)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"bench side {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the command --------------------------------------------------------------------------
def fill(bootstrap: str, topic: str, n: int) -> int:
    """n LogEntry records (about 200 bytes each) over 1000 keys; returns the value bytes."""
    from logferry.schemas import default_codec

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(30)
    codec = default_codec()
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.size": 1_000_000,
                  "compression.type": "lz4"})  # fmt: skip
    words = "payment accepted order shipped user login cache miss retry timeout upstream".split()  # noqa: SIM905
    total = 0
    for i in range(n):
        e = {"timestamp": 1_790_000_000_000_000 + i, "received_at": 1_790_000_000_000_000 + i, "host": "web-01",
             "source": "app-socket", "service": f"svc-{i % 16}", "level": "info",
             "message": " ".join(words[(i + j) % len(words)] for j in range(12)),
             "attributes": {"request_id": f"{i:012d}", "key": f"k{i % KEYS}"}}  # fmt: skip
        v = codec.encode(e)
        total += len(v)
        while True:
            try:
                p.produce(topic, v, key=f"k{i % KEYS}".encode(), headers=codec.headers)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    p.flush(60)
    return total


def consumer_performance(bootstrap: str, topic: str, n: int, version: str) -> Sample:
    """Kafka's own ConsumerPerformance from the broker's jars; its fetch rate leaves out the group join."""
    from logferry.bench.common import wait_child
    from logferry.broker import maven
    from logferry.broker.local import java_command

    cmd = [java_command(), "-Xmx512m", "-cp", f"{maven.resolve(version)}/*",
           "org.apache.kafka.tools.ConsumerPerformance", "--bootstrap-server", bootstrap, "--topic", topic,
           "--num-records", str(n), "--group", f"bench-cp-{uuid.uuid4().hex[:8]}", "--timeout", "60000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text: list[str] = []
    reader = threading.Thread(target=lambda: text.append(proc.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    code, cpu, rss = wait_child(proc, 900)
    reader.join()
    lines = [line for line in "".join(text).splitlines() if line.count(",") >= 9 and not line.startswith("start")]
    if code != 0 or not lines:
        raise RuntimeError(f"ConsumerPerformance failed ({code}):\n{''.join(text)[-2000:]}")
    fields = [f.strip() for f in lines[-1].split(",")]
    consumed, fetch_rate = int(fields[4]), float(fields[9])
    # CPU and RSS include the JVM's start-up and the group join; the rate is the fetch phase only.
    return Sample(consumed, consumed / fetch_rate, cpu, rss)


def _sample(r: dict[str, Any]) -> Sample:
    return Sample(r["entries"], r["seconds"], r["cpu_seconds"], r["peak_rss_mb"])


def process(
    entries: Annotated[
        int | None, typer.Option(help="Records for the no-op comparison (default 50000, --full 1M).")
    ] = None,
    io_entries: Annotated[int | None, typer.Option(help="Records for the 5 ms handler (default 10000).")] = None,
    sequential_entries: Annotated[int | None, typer.Option(help="Records for the sequential 5 ms reference.")] = None,
    concurrency: Annotated[int, typer.Option(help="Runtime concurrency for the 5 ms handler.")] = 128,
    bootstrap_servers: BootstrapOpt = None,
    kafka_version: Annotated[str, typer.Option(help="Version of ConsumerPerformance's jars.")] = DEFAULT_KAFKA_VERSION,
    consumer_perf: Annotated[bool, typer.Option(help="Run Kafka's ConsumerPerformance beside the no-op sides.")] = True,
    profile: Annotated[bool, typer.Option(help="Profile the no-op runtime side and print its top functions.")] = False,
    repeat: RepeatOpt = None,
    full: FullOpt = False,
    out_dir: OutOpt = DEFAULT_OUT,
) -> None:
    """Processor runtime vs raw confluent-kafka loop and ConsumerPerformance; 5 ms handler vs sequential."""
    n = entries or (1_000_000 if full else 50_000)
    io_n = io_entries or (100_000 if full else 10_000)
    seq_n = sequential_entries or (1_000 if full else 200)
    with kafka(bootstrap_servers) as bootstrap:
        report = measure(bootstrap, n, io_n, seq_n, concurrency, repetitions(repeat, full), kafka_version,
                         consumer_perf, profile, full)  # fmt: skip
        finish(report, out_dir)
        if profile and "profile" in report.extra:
            out.print(report.extra.pop("profile"), markup=False, highlight=False)


def measure(
    bootstrap: str, entries: int, io_entries: int, seq_entries: int, concurrency: int, repeat: int,
    kafka_version: str, consumer_perf: bool = True, profile: bool = False, full: bool = False,
) -> Report:  # fmt: skip
    topic = f"bench-process-{uuid.uuid4().hex[:8]}"
    with out.status(f"filling {topic} with {max(entries, io_entries)} records…"):
        value_bytes = fill(bootstrap, topic, max(entries, io_entries))
    avg = value_bytes / max(entries, io_entries)
    versions: dict[str, str | None] = {"kafka (ConsumerPerformance)": kafka_version if consumer_perf else None}
    if consumer_perf:
        versions["java"] = java_version()
    report = Report(
        "process",
        f"{PARTITIONS} partitions, {KEYS} keys, ~{avg:.0f} B Avro records",
        {"entries": entries, "io_entries": io_entries, "sequential_entries": seq_entries, "concurrency": concurrency,
         "repetitions": repeat, "full": full},
        machine_info(versions),
    )  # fmt: skip
    noop = "no-op handler"
    runs = {
        "raw": Run("raw consume(500) + decode + no-op", avg, noop),
        "fastavro": Run("raw consume(500) + fastavro decode + no-op", avg, noop),
        "runtime": Run("logferry Processor key-ordered, 64 threads", avg, noop),
        "inline": Run("logferry Processor key-ordered, inline", avg, noop),
        "pinned": Run("logferry Processor key-ordered, 64 threads, pin_to_cpu", avg, noop),
        "bare": Run("raw consume(500), no decode (scale only)", avg, noop),
    }

    # CPU s per entry inside the timed window
    window_cpu: dict[str, list[float]] = {"raw": [], "runtime": [], "inline": [], "pinned": []}

    def side(name: str, n: int, window: str | None = None, **args: Any) -> Callable[[], Sample]:
        def run() -> Sample:
            r = _side(name, {"bootstrap": bootstrap, "topic": topic, "n": n, **args})
            if window is not None:
                window_cpu[window].append(r["window_cpu_seconds"] / r["entries"])
            return _sample(r)

        return run

    last_cpu = max(os.sched_getaffinity(0))
    sides = {
        "raw": side("raw", entries, "raw", decode="logferry"),
        "fastavro": side("raw", entries, decode="fastavro"),
        "runtime": side("runtime", entries, "runtime", kind="noop", concurrency=64),
        "inline": side("runtime", entries, "inline", kind="noop", concurrency=64, inline=True),
        "pinned": side("runtime", entries, "pinned", kind="noop", concurrency=64, pin_to_cpu=last_cpu),
        "bare": side("raw", entries, decode=None),
    }
    if consumer_perf:
        runs["cp"] = Run(f"Kafka ConsumerPerformance {kafka_version}", avg, noop)
        sides["cp"] = lambda: consumer_performance(bootstrap, topic, entries, kafka_version)
    io = "5 ms I/O handler"
    runs |= {
        "seq": Run("sequential consumer", avg, io),
        "threads": Run(f"logferry Processor, time.sleep, {concurrency} threads", avg, io),
        "async": Run(f"logferry Processor, asyncio.sleep, {concurrency * 2} tasks", avg, io),
    }
    sides |= {
        "seq": side("raw", seq_entries, decode="logferry", sleep=0.005),
        "threads": side("runtime", io_entries, kind="sleep", concurrency=concurrency),
        "async": side("runtime", io_entries, kind="async", concurrency=concurrency * 2),
    }
    with out.status("process: running the sides (alternating)…"):
        # The machine may be shared: every side runs `repeat` times, in rotating order.
        alternate(sides, runs, repeat)
        if profile:
            args = {"bootstrap": bootstrap, "topic": topic, "n": entries, "kind": "noop", "concurrency": 64}
            report.extra["profile"] = _side("runtime", {**args, "profile": True})["profile"]
    report.runs = list(runs.values())
    report.ratios.append(ratio("no-op: Processor inline / raw consume+decode", runs["inline"], runs["raw"], 0.8))
    report.ratios.append(ratio("no-op: Processor 64 threads / raw consume+decode", runs["runtime"], runs["raw"], 0.8))
    report.ratios.append(
        ratio("no-op: Processor 64 threads pinned / raw consume+decode", runs["pinned"], runs["raw"], 0.8)
    )
    report.ratios.append(ratio("no-op: Processor inline / raw consume+fastavro", runs["inline"], runs["fastavro"]))
    report.ratios.append(ratio("no-op: Processor 64 threads / raw consume, no decode", runs["runtime"], runs["bare"]))
    if consumer_perf:
        report.ratios.append(ratio("no-op: Processor 64 threads / ConsumerPerformance", runs["runtime"], runs["cp"]))
    report.ratios.append(ratio("5 ms: Processor threads / sequential", runs["threads"], runs["seq"], 50))
    report.ratios.append(ratio("5 ms: Processor asyncio / sequential", runs["async"], runs["seq"], 50))
    cpu_raw = runs["raw"].cpu_per_million()
    for name, label in (("inline", "Processor inline"), ("runtime", "Processor 64 threads"),
                        ("pinned", "Processor 64 threads pinned")):  # fmt: skip
        cpu_rt = runs[name].cpu_per_million()
        if cpu_rt and cpu_raw:  # wall-clock ratios swing with other load on a shared machine; CPU per record less
            in_window = statistics.median(window_cpu[name]) / statistics.median(window_cpu["raw"])
            report.notes.append(
                f"no-op CPU per record: {label} / raw consume+decode = {in_window:.2f}x between first and last"
                f" record handled ({cpu_rt / cpu_raw:.2f}x over the whole process, start-up included)"
            )
    report.notes.append("Each side is its own process; CPU s and RSS are that process's (JVM start-up included).")
    return report


if __name__ == "__main__":
    side, raw_args = sys.argv[1], json.loads(sys.argv[2])
    fn = {"raw": _raw, "runtime": _runtime}[side]
    print(json.dumps(fn(**raw_args)))
