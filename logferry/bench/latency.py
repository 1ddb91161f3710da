"""`logferry bench latency`: write into the agent's unix socket → handler called in a processor.

The agent (`logferry collect --source unix:...`) and a processor (`Processor`, key-ordered,
in its own process: `python -m logferry.bench.latency consume ...`) run for the whole
suite. The writer paces 200-byte lines at each rate for a few seconds; every line starts
with its write time (`T<ns> P<phase> ...`), and the handler records `time.time_ns()` minus
it, so both ends read the same clock. Rates alternate across repetitions; percentiles are
over every entry of every repetition at a rate. Target: p99 ≤ 50 ms at 10k entries/s.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from logferry.bench.common import (
    DEFAULT_OUT,
    BootstrapOpt,
    FullOpt,
    OutOpt,
    Ratio,
    RepeatOpt,
    Report,
    Run,
    Sample,
    finish,
    kafka,
    machine_info,
    out,
    repetitions,
)
from logferry.bench.ingest import daemon
from logferry.collectors.config import SinkSettings
from logferry.processors.context import Context

PARTITIONS = 3
LINE_BYTES = 200
PERCENTILES = (50.0, 99.0, 99.9)
LINGER_MS = 5.0  # the agent's [sink] linger_ms here: a latency-minded setting, printed with the results


# ---- the consumer sides (each its own process) ------------------------------------------------
SIDES = {"logferry": "logferry Processor (key-ordered)", "raw": "raw confluent-kafka poll() loop"}
STAGES = (
    "write → agent received",
    "agent received → appended in Kafka (agent pipeline, linger, produce, broker)",
    "appended → handler called (fetch, consumer)",
)


def consume(bootstrap: str, topic: str, side: str) -> None:
    """Handle entries as `side`; on stdin `expect PHASE COUNT`, answer one JSON line once COUNT arrived."""
    lock = threading.Lock()
    seen: dict[int, list[float]] = {}
    # Per entry, ms spent in each stage (STAGES): where the end-to-end time goes.
    stages: dict[int, list[tuple[float, float, float]]] = {}
    expected: dict[int, int] = {}
    stop = threading.Event()

    def report_if_done(phase: int) -> None:
        if phase in expected and len(seen.get(phase, ())) >= expected[phase]:
            lat, parts = seen.pop(phase), stages.pop(phase)
            del expected[phase]
            sys.stdout.write(json.dumps({"phase": phase, "latencies_ms": lat, "stages_ms": parts}) + "\n")
            sys.stdout.flush()

    def handle(entry: dict[str, Any], ctx: Any) -> None:
        now = time.time_ns()
        stamp, tag, _ = entry["message"].split(" ", 2)
        written, phase, at = int(stamp[1:]), int(tag[1:]), entry["received_at"]
        at_ns = int(at.timestamp() * 1e9) if hasattr(at, "timestamp") else at * 1000  # datetime or µs
        # The topic stamps LogAppendTime: the broker's clock (same host) marks the Kafka hop.
        appended_ms = ctx.timestamp * 1000 if isinstance(ctx, Context) else ctx.timestamp()[1]
        with lock:
            seen.setdefault(phase, []).append((now - written) / 1e6)
            stages.setdefault(phase, []).append(
                ((at_ns - written) / 1e6, appended_ms - at_ns / 1e6, now / 1e6 - appended_ms)
            )
            report_if_done(phase)

    def commands() -> None:
        for line in sys.stdin:
            _, phase, count = line.split()
            with lock:
                expected[int(phase)] = int(count)
                report_if_done(int(phase))
        stop.set()

    threading.Thread(target=commands, daemon=True).start()
    group = f"bench-latency-{side}-{uuid.uuid4().hex[:8]}"
    if side == "logferry":
        from logferry.processors import Processor

        app = Processor(group=group, topics=[topic], bootstrap_servers=bootstrap, ordering="key", concurrency=64)
        app.handler(handle)
        threading.Thread(target=lambda: (stop.wait(), app.stop()), daemon=True).start()
        app.run(install_signals=False)
        return
    from confluent_kafka import Consumer as KafkaConsumer

    from logferry.schemas import default_codec

    codec = default_codec()
    consumer = KafkaConsumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    consumer.subscribe([topic])
    while not stop.is_set():
        msg = consumer.poll(0.1)
        if msg is not None and msg.error() is None:
            handle(codec.decode(msg.value(), msg.headers()), msg)
    consumer.close()


# ---- the writer (here) ---------------------------------------------------------------------------
def line(phase: int, seq: int) -> bytes:
    head = f"T{time.time_ns()} P{phase} key-{seq % 100} seq={seq} ".encode()
    return head.ljust(LINE_BYTES - 1, b"x") + b"\n"


def paced(sock: socket.socket, phase: int, rate: int, seconds: float) -> tuple[int, float]:
    """Send `rate` lines/s for `seconds`, in small bursts every ~0.5 ms; returns (lines, seconds taken)."""
    total = int(rate * seconds)
    sent = 0
    t0 = time.perf_counter()
    while sent < total:
        due = min(total, int((time.perf_counter() - t0) * rate) + 1) - sent
        if due > 0:
            sock.sendall(b"".join(line(phase, sent + i) for i in range(due)))
            sent += due
        else:
            time.sleep(0.0005)
    return sent, time.perf_counter() - t0


class Consumer:
    """A consumer-side subprocess and its little line protocol."""

    def __init__(self, bootstrap: str, topic: str, side: str) -> None:
        self.side = side
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "logferry.bench.latency", "consume", bootstrap, topic, side],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def expect(self, phase: int, count: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"expect {phase} {count}\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, list[float]]:
        assert self.proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not box or not box[0]:
            raise RuntimeError(
                f"the {self.side} consumer did not report within {timeout:.0f} s (exit {self.proc.poll()})"
            )
        return json.loads(box[0])

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()  # the processor stops at EOF
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(
    bootstrap: str, rates: list[int], seconds: float, repeat: int, full: bool = False, linger_ms: float = LINGER_MS
) -> Report:
    report = Report(
        "latency",
        f"unix socket write → agent → Kafka → handler, {LINE_BYTES} B lines, {PARTITIONS} partitions",
        {"rates": rates, "seconds_per_run": seconds, "repetitions": repeat, "full": full,
         "agent_sink_linger_ms": linger_ms},
        machine_info(),
    )  # fmt: skip
    report.notes.append(
        f"settings: agent sink.linger_ms = {linger_ms:g} (default {SinkSettings().linger_ms:g}); processor"
        " defaults (ordering=key, concurrency=64, batch_size=500); raw loop: confluent-kafka defaults"
    )
    topic = latency_topic(bootstrap)
    # Both consumers read the same entries at the same time (own groups): the same conditions for both.
    runs = {
        (side, r): Run(f"{label} at {r:,}/s", LINE_BYTES, f"{r:,}/s") for r in rates for side, label in SIDES.items()
    }
    pooled: dict[tuple[str, int], list[float]] = {k: [] for k in runs}
    stage_ms: dict[tuple[str, int], list[list[float]]] = {k: [] for k in runs}
    p99s: dict[tuple[str, int], list[float]] = {k: [] for k in runs}
    with (
        tempfile.TemporaryDirectory(prefix="lf-bench-latency-") as tmp,
        latency_agent(bootstrap, topic, Path(tmp), linger_ms),
    ):
        consumers = [Consumer(bootstrap, topic, side) for side in SIDES]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(Path(tmp) / "agent.sock"))
                with out.status("latency: waiting for the consumers to join…"):
                    warm_up(sock, consumers)
                phase = 1
                for i in range(repeat):
                    for rate in rates if i % 2 == 0 else rates[::-1]:
                        with out.status(f"latency: {rate:,} entries/s for {seconds:g} s…"):
                            sent, took = paced(sock, phase, rate, seconds)
                            for c in consumers:
                                c.expect(phase, sent)
                            for c in consumers:
                                got = c.result(60 + seconds)
                                pooled[c.side, rate] += got["latencies_ms"]
                                p99s[c.side, rate].append(percentile(got["latencies_ms"], 99))
                                runs[c.side, rate].add(Sample(sent, took))
                                stage_ms[c.side, rate] += got["stages_ms"]
                        phase += 1
        finally:
            for c in consumers:
                c.close()
    report.runs = list(runs.values())
    table: dict[str, dict[str, Any]] = {side: {} for side in SIDES}
    for (side, rate), values in pooled.items():
        pct = {f"p{p:g}": round(percentile(values, p), 2) for p in PERCENTILES}
        table[side][str(rate)] = {**pct, "max": round(max(values), 2), "entries": len(values),
                                  "p99_per_repetition": [round(x, 2) for x in p99s[side, rate]]}  # fmt: skip
        report.notes.append(
            f"{rate:>6,}/s {SIDES[side]}: p50 {pct['p50']:.1f} ms, p99 {pct['p99']:.1f} ms, p99.9 {pct['p99.9']:.1f}"
            f" ms (p99 per repetition min/median/max {min(p99s[side, rate]):.1f}/"
            f"{statistics.median(p99s[side, rate]):.1f}/{max(p99s[side, rate]):.1f} ms; {len(values)} entries)"
        )
    for (side, rate), rows in stage_ms.items():
        split = {}
        for i, stage in enumerate(STAGES):
            values = [row[i] for row in rows]
            split[stage] = {f"p{p:g}": round(percentile(values, p), 2) for p in PERCENTILES}
            report.notes.append(
                f"{rate:>6,}/s {side} stage {stage}: p50 {split[stage]['p50']:.1f} ms, p99 {split[stage]['p99']:.1f} ms"
            )
        table[side][str(rate)]["stages"] = split
        table[side][str(rate)]["write_to_agent_received"] = split[STAGES[0]]  # the key earlier results used
    report.extra["latency_ms"] = table
    top = str(max(rates))
    target = 50.0 if max(rates) >= 10_000 else None
    ours, raw = table["logferry"][top]["p99"], table["raw"][top]["p99"]
    report.ratios.append(Ratio(f"p99 latency at {int(top):,}/s, logferry Processor (ms)", ours, target, at_most=True))
    report.ratios.append(Ratio(f"p99 latency at {int(top):,}/s, Processor / raw poll loop", ours / raw if raw else 0))

    def plot(ax: Any) -> None:
        labels = [f"p{p:g}" for p in PERCENTILES]
        bars = [(side, rate) for rate in rates for side in SIDES]
        width = 0.8 / len(bars)
        for i, (side, rate) in enumerate(bars):
            ax.bar([x + i * width for x in range(len(labels))], [table[side][str(rate)][k] for k in labels], width,
                   label=f"{SIDES[side]}, {rate:,}/s")  # fmt: skip
        ax.set_xticks([x + width * (len(bars) - 1) / 2 for x in range(len(labels))], labels)
        ax.axhline(50, color="red", linestyle="--", linewidth=1, label="target p99 ≤ 50 ms at 10k/s")
        ax.set_ylabel("ms from socket write to handler")
        ax.legend(fontsize=8)

    report.plot = plot
    return report


@contextlib.contextmanager
def latency_agent(bootstrap: str, topic: str, work: Path, linger_ms: float) -> Iterator[subprocess.Popen[bytes]]:
    """`logferry collect --source unix:WORK/agent.sock --config agent.toml`, the toml setting `[sink] linger_ms`:
    the agent's documented knob between batching and latency (a record waits up to that long for company)."""
    sock, config = work / "agent.sock", work / "agent.toml"
    config.write_text(f"[sink]\nlinger_ms = {linger_ms:g}\n")
    env = {**os.environ, "LOGFERRY_STATE_DIR": str(work / "state")}
    cmd = [sys.executable, "-m", "logferry", "--log-level", "WARNING", "collect", "--config", str(config),
           "--source", f"unix:{sock}", "--topic", topic, "-b", bootstrap,
           "--metrics-address", "127.0.0.1:0"]  # fmt: skip
    with daemon(cmd, sock.exists, work / "agent.log", env=env, cwd=work) as proc:
        yield proc


def latency_topic(bootstrap: str) -> str:
    """The suite's topic; the broker stamps each record's append time, which splits the latency by stage."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"bench-latency-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    new = NewTopic(topic, PARTITIONS, 1, config={"message.timestamp.type": "LogAppendTime"})
    admin.create_topics([new])[topic].result(30)
    return topic


def warm_up(sock: socket.socket, consumers: list[Consumer]) -> None:
    """Phase 0: one line every 0.2 s until every consumer has joined its group and handled one."""
    done = threading.Event()
    failure: list[BaseException] = []

    def wait() -> None:
        try:
            for c in consumers:
                c.expect(0, 1)
                c.result(120)
        except BaseException as e:
            failure.append(e)
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    seq = 0
    while not done.wait(0.2):
        sock.sendall(line(0, seq))
        seq += 1
    if failure:
        raise failure[0]


def latency(
    rates: Annotated[str, typer.Option(help="Comma-separated entries/s.")] = "1000,10000",
    seconds: Annotated[
        float | None, typer.Option(help="Seconds per rate and repetition (default 4, --full 30).")
    ] = None,
    bootstrap_servers: BootstrapOpt = None,
    repeat: RepeatOpt = None,
    full: FullOpt = False,
    linger_ms: Annotated[
        float, typer.Option(help="The agent's [sink] linger_ms for this run (its default, 20, favours batching).")
    ] = LINGER_MS,
    out_dir: OutOpt = DEFAULT_OUT,
) -> None:
    """End-to-end latency, socket write → handler: p50/p99/p99.9 at each rate (target p99 ≤ 50 ms at 10k/s)."""
    chosen = [int(r) for r in rates.split(",") if r.strip()]
    with kafka(bootstrap_servers) as bootstrap:
        seconds = seconds or (30.0 if full else 4.0)
        finish(measure(bootstrap, chosen, seconds, repetitions(repeat, full), full, linger_ms), out_dir)


if __name__ == "__main__":
    if sys.argv[1] == "consume":
        consume(sys.argv[2], sys.argv[3], sys.argv[4])
