"""What every `logferry bench` suite shares: repetitions, alternation, machine facts, table, JSON, chart.

A suite measures named runs (logferry and its references) several times each, in
alternating order so that a noisy neighbour on a shared machine hurts every side alike,
and hands a `Report` the runs and the ratios it claims. The report prints a rich table
(min / median / max of every run), and writes `<suite>.json` and `<suite>.png` to the
output directory. Ratios always compare medians measured in the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

out = Console(width=160)

# Options every suite takes, declared once.
BootstrapOpt = Annotated[
    str | None,
    typer.Option("--bootstrap-servers", "-b", help="Use this Kafka; default: start a throw-away local broker."),
]
OutOpt = Annotated[Path, typer.Option("--out", help="Directory for <suite>.json and <suite>.png.")]
FullOpt = Annotated[bool, typer.Option("--full", help="README sizes (several minutes per suite).")]
RepeatOpt = Annotated[int | None, typer.Option("--repeat", min=1, help="Repetitions per run (default 3, --full 5).")]
DEFAULT_OUT = Path("bench-results")


def repetitions(repeat: int | None, full: bool) -> int:
    return repeat if repeat is not None else (5 if full else 3)


# ---- one measured run --------------------------------------------------------------------------
@dataclass
class Sample:
    """One repetition of one run. `cpu_seconds` and `peak_rss_mb` are the measured process's own."""

    entries: int
    seconds: float
    cpu_seconds: float | None = None
    peak_rss_mb: float | None = None

    @property
    def rate(self) -> float:
        return self.entries / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Spread:
    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(min(values), statistics.median(values), max(values))


@dataclass
class Run:
    """Every repetition of one named side (e.g. "logferry unix source", "bare unix socket")."""

    name: str
    entry_bytes: float
    group: str = ""  # runs compared with each other share a group (e.g. "fifo 100 B")
    samples: list[Sample] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    @property
    def rate(self) -> Spread:
        return Spread.of([s.rate for s in self.samples])

    @property
    def mb_per_s(self) -> Spread:
        r = self.rate
        return Spread(*(x * self.entry_bytes / 1e6 for x in (r.min, r.median, r.max)))

    def cpu_per_million(self) -> float | None:
        """Median CPU seconds per million entries, from the samples that measured CPU."""
        values = [s.cpu_seconds / s.entries * 1e6 for s in self.samples if s.cpu_seconds is not None and s.entries]
        return statistics.median(values) if values else None

    def peak_rss_mb(self) -> float | None:
        values = [s.peak_rss_mb for s in self.samples if s.peak_rss_mb is not None]
        return max(values) if values else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "entry_bytes": self.entry_bytes,
            "repetitions": len(self.samples),
            "entries_per_s": asdict(self.rate),
            "mb_per_s": asdict(self.mb_per_s),
            "cpu_s_per_million": self.cpu_per_million(),
            "peak_rss_mb": self.peak_rss_mb(),
            "samples": [asdict(s) for s in self.samples],
        }


def alternate(sides: dict[str, Callable[[], Sample]], runs: dict[str, Run], repeat: int) -> None:
    """Run every side `repeat` times, rotating the order each round (A B C, B C A, ...).

    Rotation spreads warm caches and noisy neighbours over all sides instead of one."""
    names = list(sides)
    for i in range(repeat):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            runs[name].add(sides[name]())


@dataclass
class Ratio:
    name: str  # "logferry / ProducerPerformance"
    value: float
    target: float | None = None  # the claim: value >= target (or <= for `at_most`)
    at_most: bool = False

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value <= self.target if self.at_most else self.value >= self.target


def ratio(name: str, ours: Run, reference: Run, target: float | None = None) -> Ratio:
    ref = reference.rate.median
    return Ratio(name, ours.rate.median / ref if ref else 0.0, target)


# ---- the machine and the peers -----------------------------------------------------------------
def _first_line(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (p.stdout or p.stderr).strip()
    return text.splitlines()[0].strip() if text else None


def machine_info(peers: dict[str, str | None] | None = None) -> dict[str, Any]:
    """Cores, memory, OS, Python and the versions of logferry's own stack plus `peers`."""
    import confluent_kafka

    import logferry

    mem = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    load = os.getloadavg()
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "cpu": _cpu_model(),
        "load_average_1m": round(load[0], 2),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "logferry": getattr(logferry, "__version__", "?"),
            "confluent-kafka": _first(confluent_kafka.version()),
            "librdkafka": confluent_kafka.libversion()[0],
            **(peers or {}),
        },
    }
    return info


def _first(version: object) -> str:
    return str(version[0] if isinstance(version, tuple) else version)


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        return found.group(1).strip() if found else None
    return None


def java_version() -> str | None:
    from logferry.broker.local import java_command

    with contextlib.suppress(Exception):
        p = subprocess.run([java_command(), "-version"], capture_output=True, text=True, timeout=30)
        return (p.stderr or p.stdout).strip().splitlines()[0]
    return None


# ---- processes: CPU and peak RSS from the kernel -----------------------------------------------
def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, peak RSS MiB) of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return cpu, (int(hwm.group(1)) / 1024 if hwm else 0.0)


def wait_child(proc: subprocess.Popen[Any], timeout: float) -> tuple[int, float, float]:
    """Reap a child: (exit code, CPU seconds, peak RSS MiB) from wait4's rusage, exact to the end."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{proc.args!r} did not finish in {timeout:.0f} s")
        time.sleep(0.01)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, pause: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(pause)


# ---- Kafka -------------------------------------------------------------------------------------
@contextlib.contextmanager
def kafka(bootstrap_servers: str | None) -> Iterator[str]:
    """The user's cluster, or a throw-away local broker for the length of the suite.

    On the user's cluster the suite deletes, at the end, the topics that appeared while it ran
    and are named `bench-…`: its own input topics and the dead-letter topics its Processors made
    (so two suites run at once on one cluster would delete each other's)."""
    if bootstrap_servers:
        before = bench_topics(bootstrap_servers)
        try:
            yield bootstrap_servers
        finally:
            _delete_topics(bootstrap_servers, bench_topics(bootstrap_servers) - before)
        return
    from logferry.broker import ephemeral_cluster

    with out.status("starting a throw-away Kafka…"), ephemeral_cluster() as cluster:
        yield cluster.bootstrap_servers


def bench_topics(bootstrap: str) -> set[str]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    return {t for t in admin.list_topics(timeout=30).topics if t.startswith("bench-")}


def _delete_topics(bootstrap: str, topics: set[str]) -> None:
    from confluent_kafka.admin import AdminClient

    if not topics:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    for topic, fut in admin.delete_topics(sorted(topics), operation_timeout=30).items():
        try:
            fut.result(60)
        except Exception as e:  # the results are printed already: say what is left, do not fail the run
            out.print(f"[yellow]could not delete bench topic {topic}: {e}[/]")


def new_topic(bootstrap: str, prefix: str, partitions: int = 1) -> str:
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})  # held while the future resolves
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)
    return topic


def end_offsets(bootstrap: str, topic: str, partitions: int = 1) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:6]}"})
    try:
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions))
    finally:
        c.close()


# ---- the report --------------------------------------------------------------------------------
@dataclass
class Report:
    suite: str
    title: str
    params: dict[str, Any]
    machine: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "rsyslog: not installed and not root"
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # suite-specific results (latency percentiles, ...)
    plot: Callable[[Any], None] | None = None  # draws on a matplotlib Axes instead of the rate bars

    def skip(self, what: str, why: str) -> None:
        line = f"{what}: skipped — {why}"
        self.skipped.append(line)
        out.print(f"[yellow]{line}[/yellow]")

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "title": self.title,
            "params": self.params,
            "machine": self.machine,
            "runs": [r.as_dict() for r in self.runs],
            "ratios": [{**asdict(r), "met": r.met} for r in self.ratios],
            "skipped": self.skipped,
            "notes": self.notes,
            **self.extra,
        }

    def print(self) -> None:
        m = self.machine
        table = Table(title=f"logferry bench {self.suite} — {self.title}", title_justify="left")
        for col in ("run", "entries/s min", "median", "max", "MB/s (median)", "CPU s / M entries", "peak RSS MiB"):
            table.add_column(col, justify="left" if col == "run" else "right")
        group = None
        for r in self.runs:
            if group is not None and r.group != group:
                table.add_section()
            group = r.group
            rate, cpu, rss = r.rate, r.cpu_per_million(), r.peak_rss_mb()
            table.add_row(
                f"{r.group}: {r.name}" if r.group else r.name,
                f"{rate.min:,.0f}", f"{rate.median:,.0f}", f"{rate.max:,.0f}", f"{r.mb_per_s.median:,.1f}",
                f"{cpu:,.1f}" if cpu is not None else "-", f"{rss:,.0f}" if rss is not None else "-",
            )  # fmt: skip
        out.print(table)
        for x in self.ratios:
            target = "" if x.target is None else f" (target {'≤' if x.at_most else '≥'} {x.target:g})"
            mark = {True: "[green]met[/green]", False: "[red]missed[/red]", None: ""}[x.met]
            out.print(f"  {x.name}: [bold]{x.value:.2f}[/bold]{target} {mark}")
        for line in self.skipped:
            out.print(f"  [yellow]{line}[/yellow]")
        for line in self.notes:
            out.print(f"  {line}")
        versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
        out.print(
            f"  machine: {m['cores']} cores ({m.get('cpu') or '?'}), {m['memory_gib']} GiB,"
            f" load {m['load_average_1m']}; {versions}"
        )

    def write(self, directory: Path) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        data = directory / f"{self.suite}.json"
        data.write_text(json.dumps(self.as_dict(), indent=2, default=str) + "\n")
        chart = directory / f"{self.suite}.png"
        self.chart(chart)
        out.print(f"  wrote {data} and {chart}")
        return data, chart

    def chart(self, path: Path) -> None:
        """Horizontal bars of the median entries/s, whiskers from min to max, one colour per kind of side."""
        import matplotlib

        matplotlib.use("Agg")  # files only, never a display
        import matplotlib.pyplot as plt

        if self.plot is not None:
            fig, ax = plt.subplots(figsize=(10, 4))
            self.plot(ax)
            ax.set_title(f"logferry bench {self.suite} — {self.title}", fontsize=9)
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            return
        runs = [r for r in self.runs if r.samples]
        labels = [f"{r.group}: {r.name}" if r.group else r.name for r in runs]
        med = [r.rate.median for r in runs]
        lo = [r.rate.median - r.rate.min for r in runs]
        hi = [r.rate.max - r.rate.median for r in runs]
        colors = ["#1f77b4" if r.name.startswith("logferry") else "#aaaaaa" for r in runs]
        fig, ax = plt.subplots(figsize=(10, 0.9 + 0.32 * max(len(runs), 1)))
        ax.barh(range(len(runs)), med, xerr=[lo, hi], color=colors, capsize=2)
        ax.set_yticks(range(len(runs)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("entries/s (median; whiskers min-max)")
        ax.set_title(f"logferry bench {self.suite} — {self.title}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def finish(report: Report, directory: Path) -> Report:
    report.print()
    report.write(directory)
    return report
