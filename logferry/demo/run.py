"""`logferry demo`: agent, load with a burst, a shaved key-ordered group, a live replay; then the checks.

Phases (the sampler tags each sample with the current one): warm-up at the steady rate, the
burst, drain (steady again until the lag is back to its pre-burst level), tail, settle (load
stopped, everything delivered and committed), replay (the group re-handles from the burst's
start). Everything started here is stopped here, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka.admin import NewTopic
from rich.console import Console
from rich.live import Live

from logferry.broker import ephemeral_cluster
from logferry.demo import check, procs
from logferry.demo.load import LoadGenerator
from logferry.demo.plan import DEFAULT, QUICK, SOURCES, Plan
from logferry.demo.report import print_summary, rate_series
from logferry.demo.sampler import LagReader, Sample, Sampler, counter_sums
from logferry.demo.verdict import Observed, iso_ms, summarize
from logferry.errors import LogferryError
from logferry.kafka import KafkaSettings, wait_reachable


@contextlib.contextmanager
def kafka(bootstrap: str | None, console: Console) -> Iterator[KafkaSettings]:
    if bootstrap:
        settings = KafkaSettings(bootstrap_servers=bootstrap)
        wait_reachable(settings, timeout=30)
        yield settings
        return
    with contextlib.ExitStack() as stack:
        with console.status("starting a local Apache Kafka (the first run fetches its jars from Maven Central)…"):
            cluster = stack.enter_context(ephemeral_cluster())
        say(console, f"local Kafka ready at {cluster.bootstrap_servers}")
        try:
            yield KafkaSettings(bootstrap_servers=cluster.bootstrap_servers)
        finally:
            with console.status("stopping the local Kafka…"):
                stack.close()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the clean-up below runs either way."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def say(console: Console, message: str) -> None:
    """One timestamped progress line (above the live status line while that runs)."""
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}", highlight=False)


class Demo:
    def __init__(self, plan: Plan, settings: KafkaSettings, console: Console, out: Path, external: bool) -> None:
        self.plan, self.settings, self.console, self.out = plan, settings, console, out
        self.external = external  # --bootstrap-servers: remove the demo's topic and group afterwards
        self.run_id = uuid.uuid4().hex[:8]
        self.topic = f"logferry.demo.{self.run_id}"
        self.group = f"logferry-demo-{self.run_id}"
        self.children: list[procs.Child] = []
        self.marks: dict[str, float] = {}  # sampler time of phase changes
        self.live: Live | None = None
        self.sources: dict[str, str] = {}

    # ---- set-up ------------------------------------------------------------------------------
    def create_topic(self, stack: contextlib.ExitStack) -> None:
        admin = self.settings.admin()
        fut = admin.create_topics([NewTopic(self.topic, num_partitions=self.plan.partitions, replication_factor=1)])
        fut[self.topic].result(30)

        def delete() -> None:  # on the user's cluster; the local broker is thrown away anyway
            with contextlib.suppress(Exception):
                admin.delete_consumer_groups([self.group])[self.group].result(10)
            with contextlib.suppress(Exception):
                admin.delete_topics([self.topic])[self.topic].result(10)

        if self.external:
            stack.callback(delete)

    def start_pipeline(self, stack: contextlib.ExitStack, workdir: Path) -> procs.IpcEndpoints:
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (workdir / "records").mkdir()
        endpoints = procs.IpcEndpoints(workdir, self.run_id)
        self.sources = endpoints.addresses
        stack.callback(endpoints.remove)
        bootstrap = self.settings.bootstrap_servers
        agent = procs.start_agent(bootstrap, self.topic, workdir, logs, endpoints)
        stack.callback(agent.stop)
        members = []
        for n in (1, 2):
            m = procs.start_member(n, bootstrap, self.topic, self.group, self.plan, workdir, logs)
            stack.callback(m.stop)
            members.append(m)
        self.children = [agent, *members]
        for c in self.children:
            say(self.console, f"started {c.name} (pid {c.proc.pid}, metrics http://{c.metrics}/metrics): "
                             f"{' '.join(c.argv)}")  # fmt: skip
        with self.console.status("waiting for the agent and both group members to be ready…"):
            procs.wait_ready(self.children, timeout=90)
        say(self.console, f"agent listening on {', '.join(f'{k}:{v}' for k, v in endpoints.addresses.items())}")
        return endpoints

    # ---- running -----------------------------------------------------------------------------
    def status_line(self, sampler: Sampler) -> str:
        s = sampler.last
        if s is None:
            return "…"
        recent = sampler.samples[-4:]
        rin, rout = (rate_series(recent, f)[-1] for f in ("received", "processed"))
        return (
            f"[bold]{s.phase:<8}[/] {s.t:5.1f}s  written {s.written:>7,}  agent {s.received:>7,.0f}  "
            f"kafka {s.delivered:>7,.0f}  handled {s.processed:>7,.0f}  [red]lag {s.lag:>6,}[/]  "
            f"in {rin:>6,.0f}/s  out {rout:>5,.0f}/s"
        )

    def watch(self, sampler: Sampler, seconds: float, until: Callable[[Sample], bool] | None = None) -> bool:
        """Show progress for up to `seconds`; True as soon as `until` holds for the latest sample."""
        deadline = time.monotonic() + seconds
        seen = len(sampler.samples)
        while time.monotonic() < deadline:
            for c in self.children:
                if not c.alive():
                    raise LogferryError(f"{c.name} exited with status {c.proc.returncode}; see {c.log.name}")
            if self.live is not None:
                self.live.update(self.status_line(sampler))
            s = sampler.last
            if until is not None and s is not None and len(sampler.samples) > seen and until(s):
                return True
            time.sleep(0.1)
        return until is None

    def enter(self, sampler: Sampler, phase: str, message: str) -> None:
        sampler.phase = phase
        self.marks[phase] = time.monotonic() - sampler.t0
        say(self.console, f"[bold]{phase}[/]: {message}")

    def replay(self, since_ms: int) -> dict[str, Any]:
        argv = ["replay", "--group", self.group, "--to-datetime", iso_ms(since_ms), "--json",
                "--bootstrap-servers", self.settings.bootstrap_servers]  # fmt: skip
        say(self.console, f"running: logferry {' '.join(argv)}")
        done = subprocess.run([sys.executable, "-m", "logferry", *argv], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise LogferryError(f"logferry replay exited {done.returncode}: {done.stderr.strip() or done.stdout}")
        return json.loads(done.stdout)

    def run(self) -> dict[str, Any]:
        p = self.plan
        t_start = time.monotonic()
        with contextlib.ExitStack() as stack:
            self.create_topic(stack)
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="logferry-demo-")))
            endpoints = self.start_pipeline(stack, workdir)
            agent, *members = self.children
            load = LoadGenerator(endpoints.addresses, p.services)
            stack.callback(load.stop)
            lag_reader = LagReader(self.settings, self.topic, self.group, p.partitions)
            stack.callback(lag_reader.close)
            sampler = Sampler(lag_reader, f"http://{agent.metrics}", [f"http://{m.metrics}" for m in members],
                              lambda: load.written, p.sample_s)  # fmt: skip
            stack.callback(sampler.stop)
            self.live = stack.enter_context(Live("", console=self.console, refresh_per_second=4, transient=True))
            sampler.start()
            load.start()

            self.enter(sampler, "warm-up", f"{p.services} services write {p.steady_rate:g} entries/s into "
                       f"{len(SOURCES)} sources; the group may process {p.capacity:g}/s")  # fmt: skip
            load.rate = p.steady_rate
            self.watch(sampler, p.warmup_s)
            pre_burst = max((s.lag for s in sampler.samples), default=0)

            self.enter(sampler, "burst", f"{p.burst_rate:g} entries/s for {p.burst_s:g}s "
                       f"({p.burst_rate / p.capacity:.1f} times what the group may process)")  # fmt: skip
            burst_ms = int(time.time() * 1000)
            load.rate = p.burst_rate
            self.watch(sampler, p.burst_s)

            threshold = max(pre_burst, int(p.steady_rate))
            self.enter(sampler, "drain", f"back to {p.steady_rate:g}/s; the backlog drains at the rate limit")
            load.rate = p.steady_rate
            drained = self.watch(sampler, p.drain_max_s, lambda s: s.lag <= threshold)
            drain_s = time.monotonic() - sampler.t0 - self.marks["drain"] if drained else None
            self.enter(sampler, "tail", f"lag back to ≤ {threshold:,}" if drained else "lag did not drain in time")
            self.watch(sampler, p.tail_s)

            self.enter(sampler, "settle", "load stopped; waiting for the last entries to be delivered and committed")
            load.rate = 0
            load.stop()
            written = load.written
            settled = self.watch(sampler, 60, lambda s: s.delivered >= written and s.lag == 0)

            self.enter(sampler, "replay", f"replaying the group from the burst's start ({iso_ms(burst_ms)})")
            before = sampler.last.processed if sampler.last else 0.0
            replay_ns = time.time_ns()
            acks = self.replay(burst_ms)
            window = check.read_window(self.settings, self.topic, p.partitions, burst_ms)
            expected = sum(len(v) for v in window.values())
            say(self.console, f"{len(acks['partitions'])} partitions moved; {expected:,} entries to re-handle")
            self.watch(sampler, expected / p.capacity * 2 + 20,
                       lambda s: s.processed >= before + expected and s.lag == 0)  # fmt: skip
            sampler.stop()
            sampler.sample()
            names = ("logferry_source_entries_received_total", "logferry_entries_delivered_total",
                     "logferry_entries_dropped_total")  # fmt: skip
            final_agent = dict(zip(names, counter_sums(f"http://{agent.metrics}", *names) or [0.0] * 3, strict=True))
            self.live.update("stopping the agent and the group…")
            exits = {c.name: c.stop() for c in reversed(self.children)}
            delivered = sum(lag_reader.ends())
            handles = check.read_records(workdir / "records")
            sent = list(load.sent)
            obs = Observed(
                topic=self.topic, group=self.group, sources=self.sources, samples=sampler.samples, handles=handles,
                sent=sent, window=window, replay_ns=replay_ns, burst_ms=burst_ms, acks=acks, agent=final_agent,
                delivered=delivered, exits=exits, pre_burst=pre_burst, drain_threshold=threshold,
                drain_started_s=self.marks["drain"], drain_s=drain_s, settled=settled, load_errors=load.errors,
                duration_s=time.monotonic() - t_start,
            )  # fmt: skip
        return summarize(p, obs, self.out)


def run_demo(
    bootstrap: str | None, console: Console, *, quick: bool = False, out: Path = Path("demo-results"),
    as_json: bool = False,
) -> int:  # fmt: skip
    """The `logferry demo` command; 0 when every check passed. With `as_json` the summary goes to stdout as JSON."""
    plan = QUICK if quick else DEFAULT
    shown = Console(stderr=True) if as_json else console
    try:
        with sigterm_as_interrupt(), kafka(bootstrap, shown) as settings:
            summary = Demo(plan, settings, shown, out.resolve(), bootstrap is not None).run()
    except KeyboardInterrupt:
        shown.print("[yellow]interrupted: every process and IPC object the demo started has been cleaned up[/]")
        return 130
    print_summary(shown, summary)
    if as_json:
        print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1
