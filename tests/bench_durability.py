"""Benchmark (not a test): spool throughput per fsync policy, checkpoint costs, file → Kafka with checkpoints.

    .venv/bin/python tests/bench_durability.py [--records 200000] [--kafka]

Every number is printed beside a reference measured in the same run (fsync=never for the
spool; a plain read of the same file for file → Kafka), so ratios survive a noisy machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from logferry.collectors.checkpoint import AckTracker, CheckpointStore, FileCheckpoint
from logferry.collectors.spool import Spool

RECORD = 200  # bytes, like the agent benchmark's lines
BATCH = 500  # records per append: one source read


def spool_append(directory: Path, policy: str, n: int) -> float:
    payloads = [b"x" * RECORD] * BATCH
    with Spool(directory, fsync=policy, fsync_interval=0.1, max_bytes=8 << 30) as spool:  # type: ignore[arg-type]
        t0 = time.perf_counter()
        for _ in range(n // BATCH):
            spool.append(payloads)
        spool.flush()
        return time.perf_counter() - t0


def spool_drain(directory: Path) -> tuple[int, float]:
    with Spool(directory, max_bytes=8 << 30) as spool:
        t0 = time.perf_counter()
        count = 0
        while items := spool.read(max_records=BATCH * 4, max_bytes=4 << 20):
            spool.ack(i.position for i in items)
            count += len(items)
        spool.flush()
        return count, time.perf_counter() - t0


def bench_spool(n: int, root: Path) -> None:
    print(f"spool: {n} records of {RECORD} B, appended in batches of {BATCH}")
    ref = None
    for policy in ("never", "interval", "batch"):
        d = root / f"spool-{policy}"
        secs = spool_append(d, policy, n)
        ref = ref or secs
        rate = n / secs
        print(f"  append fsync={policy:8s} {rate:>10,.0f} rec/s {rate * RECORD / 1e6:7.1f} MB/s  "
              f"{secs / (n // BATCH) * 1e3:6.2f} ms/batch  cost x{secs / ref:.2f} of never")  # fmt: skip
    count, secs = spool_drain(root / "spool-batch")
    print(f"  read+ack (drain)      {count / secs:>10,.0f} rec/s (cursor saved every 0.2 s, segments unlinked)")


def bench_checkpoint(root: Path) -> None:
    t = AckTracker(0)
    n = 1_000_000
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        t.add(i, 1)
    for i in range(1, n + 1):
        t.ack(i)
    secs = time.perf_counter() - t0
    print(f"checkpoint: AckTracker add+ack {n / secs:,.0f} chunks/s")
    store = CheckpointStore(root / "cp.json", interval=0)
    saves = 200
    t0 = time.perf_counter()
    for i in range(saves):
        store.set(FileCheckpoint("/var/log/app.log", 1, 2, "00000000", 1024, i))
        store.save(force=True)
    secs = time.perf_counter() - t0
    print(f"  registry save (tmp+fsync+rename+dir fsync) {secs / saves * 1e3:.2f} ms each; the agent saves at most 1/s")


def file_source_alone(log: Path, state: Path, lines: int) -> float:
    """FileSource with acks and checkpoints but no pipeline or Kafka: this module's own cost."""
    import threading

    from logferry.collectors.sources.base import Frames
    from logferry.collectors.sources.file import FileSource

    src = FileSource("alone", str(log), {"state_dir": str(state), "start_at": "beginning"})
    seen = 0
    done = threading.Event()

    def emit(fr: Frames) -> None:
        nonlocal seen
        src.delivered(fr.ack_tokens or [])
        seen += len(fr.frames)
        if seen >= lines:
            done.set()

    t0 = time.perf_counter()
    thread = threading.Thread(target=src.run, args=(emit,))
    thread.start()
    done.wait(600)
    secs = time.perf_counter() - t0
    src.stop()
    thread.join()
    src.close()
    return lines / secs


def bench_file_to_kafka(n: int, root: Path) -> None:
    from logferry.broker import ephemeral_cluster
    from logferry.collectors.testing import RunningAgent, wait_until

    log = root / "app.log"
    with log.open("wb") as f:
        for i in range(0, n, 1000):
            f.write(b"".join(b"%08d " % k + b"x" * (RECORD - 10) + b"\n" for k in range(i, i + 1000)))
    t0 = time.perf_counter()
    with log.open("rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    read_secs = time.perf_counter() - t0
    source_rate = file_source_alone(log, root / "alone", lines)
    with ephemeral_cluster() as cluster:
        cfg = {
            "kafka": {"bootstrap_servers": cluster.bootstrap_servers},
            "sources": [{"kind": "file", "address": str(log), "name": "bench",
                         "options": {"start_at": "beginning", "checkpoint_interval": 1.0}}],
            "route": {"topic": "bench"},
            "agent": {"state_dir": str(root / "state")},
        }  # fmt: skip
        cp = root / "state" / "checkpoints" / "bench.json"
        size = log.stat().st_size
        with RunningAgent(cfg) as agent:
            t0 = time.perf_counter()
            src = agent.sources["bench"]
            wait_until(lambda: any(c.offset == size for c in src.store.entries()), timeout=600, what="checkpoint")
            secs = time.perf_counter() - t0
        assert cp.exists()
    print(f"file → Kafka with checkpoints: {lines} lines of {RECORD} B in {secs:.1f} s = {lines / secs:,.0f} lines/s "
          f"{lines * RECORD / secs / 1e6:.1f} MB/s (until the checkpoint reached EOF, i.e. every line acked); "
          f"the file source alone (null emit, acks, checkpoints): {source_rate:,.0f} lines/s; "
          f"a bare read of the file: {lines / read_secs:,.0f} lines/s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--kafka", action="store_true", help="also file → Kafka on a throw-away local broker")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="logferry-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        bench_spool(args.records, root)
        bench_checkpoint(root)
        if args.kafka:
            bench_file_to_kafka(args.records, root)


if __name__ == "__main__":
    main()
