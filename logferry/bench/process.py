"""`logferry bench process`: the processor runtime beside hand-written confluent-kafka loops, one run.

Two comparisons on the same pre-filled topic (6 partitions, 1000 keys, Avro LogEntry):

1. no-op handler: `Processor(ordering="key")` vs a raw `consume(500)` loop that decodes each
   record with the same codec and calls the same no-op (the least a real consumer does);
   a loop that does not even decode is printed too, for scale.
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
import pstats
import resource
import subprocess
import sys
import threading
import time
import uuid
from typing import Annotated, Any

import typer
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console
from rich.table import Table

out = Console(width=150)
PARTITIONS = 6
KEYS = 1000


# ---- the sides (each runs in a subprocess: `python -m logferry.bench.process SIDE ARGS`) -----
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _raw(bootstrap: str, topic: str, n: int, decode: bool, sleep: float = 0.0) -> dict[str, Any]:
    from logferry.schemas import default_codec

    codec = default_codec()
    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })  # fmt: skip
    c.subscribe([topic])
    seen, nbytes, t0 = 0, 0, None
    while seen < n:
        msgs = c.consume(500, 1.0)
        if msgs and t0 is None:
            t0 = time.perf_counter()
        for m in msgs:
            if m.error() is not None:
                continue
            v = m.value()
            nbytes += len(v)
            if decode:
                entry = codec.decode(v, m.headers())
                _noop(entry, m)
            if sleep:
                time.sleep(sleep)
            seen += 1
    c.commit(asynchronous=False)
    seconds = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    return {"entries": seen, "seconds": seconds, "bytes": nbytes, "peak_rss_mb": _peak_rss_mb(),
            "cpu_seconds": _cpu_seconds()}  # fmt: skip


def _noop(entry: object, ctx: object) -> None:
    return None


def _runtime(bootstrap: str, topic: str, n: int, kind: str, concurrency: int, profile: bool = False) -> dict[str, Any]:
    from logferry.processors import Processor

    counter = itertools.count(1)
    stamps: dict[str, float] = {}
    done = threading.Event()

    def finish() -> None:
        if next(counter) == n:
            stamps["last"] = time.perf_counter()
            done.set()

    if kind == "noop":

        def handle(entry: object, ctx: Any) -> None:
            stamps.setdefault("first", time.perf_counter())
            finish()
    elif kind == "sleep":

        def handle(entry: object, ctx: Any) -> None:
            stamps.setdefault("first", time.perf_counter())
            time.sleep(0.005)
            finish()
    else:

        async def handle(entry: object, ctx: Any) -> None:  # type: ignore[misc]
            stamps.setdefault("first", time.perf_counter())
            await asyncio.sleep(0.005)
            finish()

    app = Processor(group=f"bench-rt-{uuid.uuid4().hex[:8]}", topics=[topic], bootstrap_servers=bootstrap,
                    ordering="key", concurrency=concurrency)  # fmt: skip
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
        "cpu_seconds": _cpu_seconds(),
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


def process(
    entries: Annotated[int, typer.Option(help="Records for the no-op comparison.")] = 200_000,
    io_entries: Annotated[int, typer.Option(help="Records for the 5 ms handler (runtime side).")] = 20_000,
    sequential_entries: Annotated[int, typer.Option(help="Records for the sequential 5 ms reference.")] = 300,
    concurrency: Annotated[int, typer.Option(help="Runtime concurrency for the 5 ms handler.")] = 128,
    bootstrap_servers: Annotated[
        str | None, typer.Option("--bootstrap-servers", "-b", help="Use this Kafka instead of a throw-away one.")
    ] = None,
    profile: Annotated[bool, typer.Option(help="Profile the no-op runtime side and print its top functions.")] = False,
    rounds: Annotated[int, typer.Option(help="Alternating rounds of the no-op sides (best kept).")] = 2,
) -> None:
    """Processor runtime vs raw confluent-kafka loops: no-op throughput and 5 ms I/O-bound speed-up."""
    if bootstrap_servers:
        _run(bootstrap_servers, entries, io_entries, sequential_entries, concurrency, profile, rounds)
        return
    from logferry.broker import ephemeral_cluster

    with out.status("starting a throw-away Kafka…"), ephemeral_cluster() as cluster:
        _run(cluster.bootstrap_servers, entries, io_entries, sequential_entries, concurrency, profile, rounds)


def _run(
    bootstrap: str, entries: int, io_entries: int, seq_entries: int, concurrency: int, profile: bool, rounds: int
) -> None:
    topic = f"bench-process-{uuid.uuid4().hex[:8]}"
    with out.status(f"filling {topic} with {entries} records…"):
        value_bytes = fill(bootstrap, topic, max(entries, io_entries))
    avg = value_bytes / max(entries, io_entries)
    rows: list[tuple[str, dict[str, Any]]] = []
    with out.status("running the sides…"):
        # The machine is shared: alternate the two no-op sides and keep each one's best round.
        raws, rts = [], []
        for _ in range(rounds):
            raws.append(_side("raw", {"bootstrap": bootstrap, "topic": topic, "n": entries, "decode": True}))
            rts.append(_side("runtime", {"bootstrap": bootstrap, "topic": topic, "n": entries, "kind": "noop",
                                         "concurrency": 64, "profile": profile}))  # fmt: skip
        raw = min(raws, key=lambda r: r["seconds"])
        rt = min(rts, key=lambda r: r["seconds"])
        rows.append((f"raw consume(500) + decode + no-op (best of {rounds})", raw))
        bare = _side("raw", {"bootstrap": bootstrap, "topic": topic, "n": entries, "decode": False})
        rows.append(("raw consume(500), no decode (scale only)", bare))
        rows.append((f"Processor key-ordered no-op, 64 threads (best of {rounds})", rt))
        seq = _side("raw", {"bootstrap": bootstrap, "topic": topic, "n": seq_entries, "decode": True,
                            "sleep": 0.005})  # fmt: skip
        rows.append(("sequential consumer, 5 ms handler", seq))
        io_t = _side("runtime", {"bootstrap": bootstrap, "topic": topic, "n": io_entries, "kind": "sleep",
                                 "concurrency": concurrency})  # fmt: skip
        rows.append((f"Processor 5 ms time.sleep ({concurrency} threads)", io_t))
        io_a = _side("runtime", {"bootstrap": bootstrap, "topic": topic, "n": io_entries, "kind": "async",
                                 "concurrency": concurrency * 2})  # fmt: skip
        rows.append((f"Processor 5 ms asyncio.sleep ({concurrency * 2} tasks)", io_a))
    table = Table(title=f"logferry bench process — {PARTITIONS} partitions, {KEYS} keys, ~{avg:.0f} B/record")
    for col in ("side", "records", "seconds", "records/s", "MB/s", "CPU s (process)", "peak RSS MB"):
        table.add_column(col, justify="right" if col != "side" else "left")
    for name, r in rows:
        rate = r["entries"] / r["seconds"]
        table.add_row(name, str(r["entries"]), f"{r['seconds']:.2f}", f"{rate:,.0f}", f"{rate * avg / 1e6:.1f}",
                      f"{r['cpu_seconds']:.1f}", f"{r['peak_rss_mb']:.0f}")  # fmt: skip
    out.print(table)

    def rate(r: dict[str, Any]) -> float:
        return r["entries"] / r["seconds"]

    out.print(f"no-op: runtime / raw consume+decode = [bold]{rate(rt) / rate(raw):.2f}x[/bold] (target >= 0.8x); "
              f"runtime / bare consume = {rate(rt) / rate(bare):.2f}x")  # fmt: skip
    out.print(f"no-op CPU per record: runtime / raw consume+decode = {rt['cpu_seconds'] / raw['cpu_seconds']:.2f}x "
              "(wall-clock ratios swing with other load on the machine; CPU does less)")  # fmt: skip
    out.print(f"5 ms handler: threads / sequential = [bold]{rate(io_t) / rate(seq):.0f}x[/bold], "
              f"asyncio / sequential = [bold]{rate(io_a) / rate(seq):.0f}x[/bold] (target >= 50x)")  # fmt: skip
    if profile and "profile" in rt:
        out.print(rt["profile"], markup=False, highlight=False)


if __name__ == "__main__":
    side, raw_args = sys.argv[1], json.loads(sys.argv[2])
    fn = {"raw": _raw, "runtime": _runtime}[side]
    print(json.dumps(fn(**raw_args)))
