"""`logferry bench ingest`: lines → Kafka, the logferry agent beside Kafka's and the usual peers.

Every side produces the same 200-byte log lines to a fresh one-partition topic on the
same broker with the agent's producer settings: acks=all, enable.idempotence=true,
compression.type=zstd, linger.ms and batch.size from the agent's `SinkSettings` defaults.

- logferry agent: `logferry collect --source unix:SOCK` in its own process; the generator
  writes the lines over a few unix stream connections. Also pinned (`--pin-to-cpu`), and as two
  agents pinned to two CPUs, each fed half the lines over half the connections: how an agent
  uses more than the one core its GIL allows.
- Kafka ProducerPerformance (from the broker's jars) with `--payload-file` of the same lines.
- rsyslog + omkafka: its own rsyslogd instance (tmp config, pid and work dir), fed by the
  same generator through `imptcp` listening on a unix socket, `%rawmsg%` template, and
  `resubmitOnFailure` on: by default omkafka drops a line librdkafka's full queue refuses
  ("Local: Queue full"), and the agent is measured losing nothing.
- kcat -P -l FILE: the same lines from a file.
- a bare confluent-kafka loop (the Python ceiling): the same lines from a file, one
  `produce()` per line with the agent's headers, timestamp and delivery reports (failures
  only, as the agent's sink asks for them from sources that want no acknowledgements), in
  its own process. It parses and encodes nothing, so the agent can only approach it; the
  gap between the two is what logferry itself costs.

The clock stops when the topic's end offset reaches the lines sent (ProducerPerformance
reports its own rate). CPU seconds and peak RSS are the peer process's own, from /proc
(long-running daemons) or wait4's rusage (processes that exit). Peers that are missing
are installed with apt when running as root, or skipped with a line saying why.
`--profile` runs the agent under cProfile and prints its top functions.
"""

from __future__ import annotations

import contextlib
import json
import os
import pstats
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import typer

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
    end_offsets,
    finish,
    java_version,
    kafka,
    machine_info,
    new_topic,
    out,
    proc_stats,
    ratio,
    repetitions,
    wait_child,
    wait_for,
)
from logferry.broker import DEFAULT_KAFKA_VERSION, maven
from logferry.broker.local import java_command
from logferry.collectors.config import SinkSettings
from logferry.collectors.profiling import ENV as PROFILE_ENV

PEERS = ("logferry", "logferry-pinned", "logferry-x2", "producer-perf", "rsyslog", "kcat", "python-loop")
APT = {"rsyslog": ("rsyslog-kafka", "rsyslogd"), "kcat": ("kcat", "kcat")}  # peer: (package, binary)
SINK = SinkSettings()


def producer_props() -> dict[str, str]:
    """The agent's producer settings, which every peer gets too."""
    return {"acks": "all", "enable.idempotence": "true", "compression.type": SINK.compression,
            "linger.ms": f"{SINK.linger_ms:g}", "batch.size": str(SINK.batch_size)}  # fmt: skip


def make_lines(n_distinct: int, size: int) -> list[bytes]:
    """Log-like lines of `size` bytes with varied words, so zstd does not see one repeated payload."""
    rnd = random.Random(7)
    words = ["".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(3, 9))) for _ in range(500)]
    lines = []
    for i in range(n_distinct):
        text = f"2026-11-21T06:00:{i % 60:02d}Z INFO svc-{i % 16} " + " ".join(rnd.choices(words, k=40))
        lines.append(text.encode()[: size - 1].ljust(size - 1, b".") + b"\n")
    return lines


def split(total: int, parts: int) -> list[int]:
    """`total` in `parts` shares that differ by at most one."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def feed_unix(path: Path, lines: list[bytes], total: int, clients: int) -> int:
    """The generator: `total` lines over `clients` unix stream connections; returns the lines sent."""
    chunk = b"".join(lines)

    def write(count: int) -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)  # a daemon that stops reading fails the run instead of hanging it
            s.connect(str(path))
            left = count
            while left > 0:
                n = min(left, len(lines))
                s.sendall(chunk if n == len(lines) else b"".join(lines[:n]))
                left -= n
        return count

    with ThreadPoolExecutor(clients) as pool:  # a refused connection or broken pipe is raised here
        return sum(pool.map(write, split(total, clients)))


@contextlib.contextmanager
def daemon(cmd: list[str], ready: Callable[[], bool], log: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """A long-running peer: started, awaited until `ready`, stopped with SIGTERM."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115
    try:
        wait_for(lambda: ready() or proc.poll() is not None, 30, f"{cmd[0]} to start")
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {log.read_text()[-2000:]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def timed_feed(bootstrap: str, topic: str, procs: list[subprocess.Popen[bytes]], socks: list[Path],
               lines: list[bytes], total: int, clients: int) -> Sample:  # fmt: skip
    """Feed running daemons through their sockets, the lines and clients split evenly between them;
    stop the clock when Kafka holds every line. CPU and peak RSS are the daemons' together."""
    if clients < len(socks):
        raise ValueError(f"{clients} client(s) cannot feed {len(socks)} daemons")
    cpu0 = sum(proc_stats(p.pid)[0] for p in procs)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(socks)) as pool:  # a feeder's failure is raised here, not lost in a thread
        feeds = pool.map(feed_unix, socks, [lines] * len(socks), split(total, len(socks)), split(clients, len(socks)))
        sent = sum(feeds)
    wait_delivered(bootstrap, topic, sent)
    seconds = time.perf_counter() - t0
    stats = [proc_stats(p.pid) for p in procs]
    return Sample(sent, seconds, sum(cpu for cpu, _ in stats) - cpu0, sum(rss for _, rss in stats))


def wait_delivered(bootstrap: str, topic: str, total: int, stall: float = 30) -> None:
    """Until the topic holds `total` records; fails once the count stops growing for `stall` seconds."""
    last, since = -1, time.monotonic()
    while (now := end_offsets(bootstrap, topic)) < total:
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall:
            raise RuntimeError(f"{topic}: stuck at {now} of {total} records for {stall:.0f} s")
        time.sleep(0.05)


# ---- the sides -----------------------------------------------------------------------------------
@contextlib.contextmanager
def agent(
    bootstrap: str, topic: str, work: Path, profile: Path | None = None, pin_to_cpu: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`logferry collect --source unix:WORK/agent.sock` into `topic`, running until the block ends."""
    sock = work / "agent.sock"
    env = {**os.environ, "LOGFERRY_STATE_DIR": str(work / "state")}
    if profile is not None:
        env[PROFILE_ENV] = str(profile)
    cmd = [sys.executable, "-m", "logferry", "--log-level", "WARNING", "collect", "--source", f"unix:{sock}",
           "--topic", topic, "-b", bootstrap, "--metrics-address", "127.0.0.1:0"]  # fmt: skip
    if pin_to_cpu is not None:
        cmd += ["--pin-to-cpu", str(pin_to_cpu)]
    with daemon(cmd, sock.exists, work / "agent.log", env=env, cwd=work) as proc:
        yield proc


def run_agents(
    bootstrap: str, lines: list[bytes], total: int, clients: int, profile: Path | None, pins: Sequence[int | None]
) -> Sample:
    """One agent per entry of `pins` (its `pin_to_cpu`), each on its own socket, all into one topic."""
    topic = new_topic(bootstrap, "bench-agent")
    with contextlib.ExitStack() as stack:
        works = [Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lf-bench-agent-"))) for _ in pins]
        procs = [
            stack.enter_context(agent(bootstrap, topic, w, profile, pin)) for w, pin in zip(works, pins, strict=True)
        ]
        return timed_feed(bootstrap, topic, procs, [w / "agent.sock" for w in works], lines, total, clients)


def run_rsyslog(bootstrap: str, lines: list[bytes], total: int, clients: int) -> Sample:
    topic = new_topic(bootstrap, "bench-rsyslog")
    with tempfile.TemporaryDirectory(prefix="lf-bench-rsyslog-") as tmp:
        work, sock = Path(tmp), Path(tmp) / "rsyslog.sock"
        (work / "spool").mkdir()
        conf_params = ", ".join(f'"{k}={v}"' for k, v in producer_props().items())
        brokers = ", ".join(f'"{b}"' for b in bootstrap.split(","))
        (work / "rsyslog.conf").write_text(f"""
global(workDirectory="{work}/spool" net.enableDNS="off" maxMessageSize="64k")
main_queue(queue.type="LinkedList" queue.size="500000")
module(load="imptcp")
module(load="omkafka")
template(name="raw" type="string" string="%rawmsg%")
input(type="imptcp" path="{sock}" unlink="on" supportOctetCountedFraming="off")
action(type="omkafka" broker=[{brokers}] topic="{topic}" template="raw" confParam=[{conf_params}]
       resubmitOnFailure="on")
""")
        cmd = ["rsyslogd", "-n", "-f", str(work / "rsyslog.conf"), "-i", str(work / "rsyslogd.pid")]
        with daemon(cmd, sock.exists, work / "rsyslog.log", cwd=work) as proc:
            try:
                return timed_feed(bootstrap, topic, [proc], [sock], lines, total, clients)
            except RuntimeError as e:  # lines missing: rsyslog's own account of them
                raise RuntimeError(f"{e}; rsyslog said: {(work / 'rsyslog.log').read_text()[-2000:]}") from None


def run_kcat(bootstrap: str, lines: list[bytes], total: int) -> Sample:
    topic = new_topic(bootstrap, "bench-kcat")
    with tempfile.TemporaryDirectory(prefix="lf-bench-kcat-") as tmp:
        data = Path(tmp) / "lines.log"
        with data.open("wb") as f:
            for i in range(total):
                f.write(lines[i % len(lines)])
        props = [arg for k, v in producer_props().items() for arg in ("-X", f"{k}={v}")]
        t0 = time.perf_counter()
        proc = subprocess.Popen(["kcat", "-P", "-b", bootstrap, "-t", topic, "-l", *props, str(data)],
                                stderr=subprocess.PIPE)  # fmt: skip
        code, cpu, rss = wait_child(proc, 600)
        seconds = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"kcat exited {code}: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    delivered = end_offsets(bootstrap, topic)
    if delivered < total:
        raise RuntimeError(f"kcat delivered {delivered} of {total} lines")
    return Sample(total, seconds, cpu, rss)


def produce_loop(bootstrap: str, topic: str, path: str) -> dict[str, float]:
    """The Python ceiling (run in a child process): each line produced as the agent's sink does it,
    with the very producer settings of the sink (`producer_config`), and nothing else."""
    from confluent_kafka import Producer

    from logferry.collectors.sink import ANY_PARTITION, failures_only, producer_config
    from logferry.kafka import KafkaSettings
    from logferry.schemas import default_codec

    failed = [0]

    def on_failure(err: object, _msg: object) -> None:
        failed[0] += 1

    # Reports as the sink asks for them when no source wants acknowledgements: failures only.
    producer = Producer(failures_only(producer_config(KafkaSettings(bootstrap_servers=bootstrap), SINK), on_failure))
    headers = default_codec().headers

    lines = Path(path).read_bytes().split(b"\n")[:-1]
    t0 = time.perf_counter()
    produce, poll = producer.produce, producer.poll
    for start in range(0, len(lines), 1000):  # one receive time per 1000 lines, as for one read of a socket
        now_ms = int(time.time() * 1000)
        for line in lines[start : start + 1000]:
            while True:
                try:
                    produce(topic, line, None, ANY_PARTITION, None, None, now_ms, headers)
                    break
                except BufferError:
                    poll(0.05)
        poll(0)
    left = producer.flush(120)
    return {"seconds": time.perf_counter() - t0, "delivered": len(lines) - left - failed[0]}


def run_python_loop(bootstrap: str, lines: list[bytes], total: int) -> Sample:
    topic = new_topic(bootstrap, "bench-pyloop")
    with tempfile.TemporaryDirectory(prefix="lf-bench-pyloop-") as tmp:
        data = Path(tmp) / "lines.log"
        with data.open("wb") as f:
            for i in range(total):
                f.write(lines[i % len(lines)])
        args = json.dumps({"bootstrap": bootstrap, "topic": topic, "path": str(data)})
        proc = subprocess.Popen([sys.executable, "-m", "logferry.bench.ingest", args], stdout=subprocess.PIPE)
        code, cpu, rss = wait_child(proc, 600)
        result = json.loads(proc.stdout.read() or b"{}") if proc.stdout else {}
    if code != 0 or result.get("delivered") != total:
        raise RuntimeError(f"the confluent-kafka loop exited {code} having delivered {result.get('delivered')}/{total}")
    # Its own clock, from the first produce() to the end of flush(): interpreter start-up excluded.
    return Sample(total, result["seconds"], cpu, rss)


def run_producer_performance(bootstrap: str, lines: list[bytes], total: int, version: str) -> Sample:
    topic = new_topic(bootstrap, "bench-pp")
    with tempfile.TemporaryDirectory(prefix="lf-bench-pp-") as tmp:
        payloads = Path(tmp) / "payloads.txt"
        payloads.write_bytes(b"".join(lines))
        props = [f"{k}={v}" for k, v in producer_props().items()]
        cmd = [java_command(), "-Xmx512m", "-cp", f"{maven.resolve(version)}/*",
               "org.apache.kafka.tools.ProducerPerformance", "--topic", topic, "--num-records", str(total),
               "--payload-file", str(payloads), "--payload-delimiter", "\n", "--throughput", "-1",
               "--producer-props", f"bootstrap.servers={bootstrap}", *props]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        text_out: list[bytes] = []
        reader = threading.Thread(target=lambda: text_out.append(proc.stdout.read()))  # type: ignore[union-attr]
        reader.start()
        _, cpu, rss = wait_child(proc, 600)
        reader.join()
    text = b"".join(text_out).decode(errors="replace")
    found = re.findall(r"(\d+) records sent, ([\d.]+) records/sec", text)
    if not found:
        raise RuntimeError(f"ProducerPerformance failed:\n{text[-2000:]}")
    sent, rate = int(found[-1][0]), float(found[-1][1])
    # CPU and RSS include the JVM's start-up; the rate is ProducerPerformance's own (sending only).
    return Sample(sent, sent / rate, cpu, rss)


# ---- peers: present, installed, or skipped with the reason ---------------------------------------
def ensure_peer(peer: str, report: Report, install: bool) -> bool:
    package, binary = APT[peer]
    if shutil.which(binary) and (peer != "rsyslog" or Path("/usr/lib/x86_64-linux-gnu/rsyslog/omkafka.so").exists()
                                 or _omkafka_installed()):  # fmt: skip
        return True
    if not install:
        report.skip(peer, f"{package} is not installed and --no-install was given")
        return False
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        report.skip(peer, f"{package} is not installed and this is not root with apt-get (apt-get install {package})")
        return False
    with out.status(f"installing {package} with apt-get…"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        steps = [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]]
        for step in steps:
            p = subprocess.run(step, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                report.skip(peer, f"`{' '.join(step)}` failed: {(p.stderr or p.stdout).strip()[-300:]}")
                return False
    return shutil.which(binary) is not None


def _omkafka_installed() -> bool:
    return subprocess.run(["dpkg", "-s", "rsyslog-kafka"], capture_output=True).returncode == 0


def peer_versions(chosen: list[str], kafka_version: str) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"kafka (broker, ProducerPerformance)": kafka_version}
    if "producer-perf" in chosen:
        versions["java"] = java_version()
    if "rsyslog" in chosen and shutil.which("rsyslogd"):
        p = subprocess.run(["rsyslogd", "-v"], capture_output=True, text=True)
        found_r = re.search(r"rsyslogd\s+([\w.]+)", p.stdout)
        versions["rsyslog"] = found_r.group(1) if found_r else None
    if "kcat" in chosen and shutil.which("kcat"):
        p = subprocess.run(["kcat", "-V"], capture_output=True, text=True)
        found = re.search(r"kcat - .*?version ([\w.\-]+)", p.stdout + p.stderr) or re.search(
            r"Version ([\w.\-]+)", p.stdout + p.stderr
        )
        lib = re.search(r"librdkafka ([\d.]+)", p.stdout + p.stderr)
        versions["kcat"] = " ".join(x for x in (found and found.group(1), lib and f"(librdkafka {lib.group(1)})") if x)
    return versions


# ---- the command -------------------------------------------------------------------------------
def measure(
    bootstrap: str, peers: list[str], entries: int, size: int, clients: int, repeat: int, kafka_version: str,
    install: bool = True, profile: Path | None = None, full: bool = False,
) -> Report:  # fmt: skip
    report = Report(
        "ingest",
        f"{size}-byte lines → Kafka, acks=all, idempotent, {SINK.compression}, linger.ms={SINK.linger_ms:g}",
        {"entries": entries, "record_bytes": size, "clients": clients, "repetitions": repeat, "peers": peers,
         "producer": producer_props(), "full": full},
        {},
    )  # fmt: skip
    ours = ("logferry", "logferry-pinned", "logferry-x2", "producer-perf", "python-loop")
    chosen = [p for p in peers if p in ours or ensure_peer(p, report, install)]
    cpus = sorted(os.sched_getaffinity(0))
    if "logferry-x2" in chosen and (len(cpus) < 2 or clients < 2):
        chosen.remove("logferry-x2")
        why = f"this process may use only CPU {cpus[0]}" if len(cpus) < 2 else "--clients is 1"
        report.skip("logferry-x2", f"two agents pinned to two CPUs, each fed by its own clients, but {why}")
    for p in PEERS:
        if p not in peers:
            report.skip(p, "not selected with --peers")
    report.machine = machine_info(peer_versions(chosen, kafka_version))
    lines = make_lines(1000, size)
    names = {
        "logferry": "logferry agent (unix socket)",
        "logferry-pinned": "logferry agent (unix socket), pin_to_cpu",
        "logferry-x2": "2 logferry agents, one per CPU (pin_to_cpu)",
        "producer-perf": "Kafka ProducerPerformance",
        "rsyslog": "rsyslog imptcp → omkafka",
        "kcat": "kcat -P -l file",
        "python-loop": "confluent-kafka produce() loop (Python ceiling)",
    }
    sides: dict[str, Callable[[], Sample]] = {
        "logferry": lambda: run_agents(bootstrap, lines, entries, clients, profile, [None]),
        "logferry-pinned": lambda: run_agents(bootstrap, lines, entries, clients, None, [cpus[-1]]),
        "logferry-x2": lambda: run_agents(bootstrap, lines, entries, clients, None, cpus[-2:]),
        "producer-perf": lambda: run_producer_performance(bootstrap, lines, entries, kafka_version),
        "rsyslog": lambda: run_rsyslog(bootstrap, lines, entries, clients),
        "kcat": lambda: run_kcat(bootstrap, lines, entries),
        "python-loop": lambda: run_python_loop(bootstrap, lines, entries),
    }
    runs = {p: Run(names[p], size) for p in chosen}
    with out.status(f"ingest: {', '.join(chosen)} x {repeat}…"):
        alternate({p: sides[p] for p in chosen}, runs, repeat)
    report.runs = list(runs.values())
    targets = {"producer-perf": 0.7, "rsyslog": 1.0, "kcat": None, "python-loop": None}
    for agent_side, label in (("logferry", "logferry"), ("logferry-pinned", "logferry pin_to_cpu"),
                              ("logferry-x2", "2 logferry agents")):  # fmt: skip
        for p, target in targets.items():
            if agent_side in runs and p in runs:
                report.ratios.append(ratio(f"{label} / {names[p]}", runs[agent_side], runs[p], target))
    report.notes.append(
        "logferry records are Avro LogEntry values (line + host, timestamps); the peers send the bare line. "
        "ProducerPerformance CPU/RSS include JVM start-up. Two agents: each on its own socket with half "
        "the clients and lines, one topic; CPU and RSS are both processes' together."
    )
    if "python-loop" in runs and "rsyslog" in runs:
        report.notes.append(
            "The confluent-kafka loop is the most any CPython agent gets from this producer: "
            f"it reaches {ratio('', runs['python-loop'], runs['rsyslog']).value:.2f}x rsyslog on this machine."
        )
    return report


def ingest(
    entries: Annotated[int | None, typer.Option(help="Lines per run (default 100000, --full 1000000).")] = None,
    record_size: Annotated[int, typer.Option(help="Bytes per line / record.")] = 200,
    clients: Annotated[int, typer.Option(help="Concurrent generator connections (agent, rsyslog).")] = 4,
    peers: Annotated[str, typer.Option(help="Comma-separated sides to run.")] = ",".join(PEERS),
    install: Annotated[bool, typer.Option(help="apt-get install missing peers when root.")] = True,
    bootstrap_servers: BootstrapOpt = None,
    kafka_version: Annotated[str, typer.Option(help="Version of ProducerPerformance's jars.")] = DEFAULT_KAFKA_VERSION,
    repeat: RepeatOpt = None,
    full: FullOpt = False,
    out_dir: OutOpt = DEFAULT_OUT,
    profile: Annotated[bool, typer.Option(help="Run the agent under cProfile and print its top functions.")] = False,
) -> None:
    """Lines → Kafka: logferry agent vs ProducerPerformance, rsyslog+omkafka, kcat (targets ≥0.7x, ≥1.0x)."""
    chosen = [p.strip() for p in peers.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PEERS))
    if unknown:
        raise typer.BadParameter(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}", param_hint="--peers")
    n = entries or (1_000_000 if full else 100_000)
    with kafka(bootstrap_servers) as bootstrap, tempfile.TemporaryDirectory() as prof_dir:
        prof = Path(prof_dir) if profile else None
        report = measure(bootstrap, chosen, n, record_size, clients, repetitions(repeat, full), kafka_version,
                         install, prof, full)  # fmt: skip
        finish(report, out_dir)
        files = sorted(prof.glob("*.prof")) if prof is not None else []
        if files:  # every agent thread's profile (of the last repetition), merged
            out.print(f"agent profile ({', '.join(f.stem for f in files)}), by own time:")
            pstats.Stats(*map(str, files)).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    print(json.dumps(produce_loop(**json.loads(sys.argv[1]))))
