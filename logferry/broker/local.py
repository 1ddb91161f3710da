"""A real Apache Kafka (KRaft) cluster on loopback, run from Apache's jars with the local Java.

State lives in one directory (`home`): cluster.json (pids, ports, version, cluster id)
and one folder per node with its config, data and logs. Stopping keeps the data, so a
later `start` brings the same topics back; `start --fresh` wipes it.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from confluent_kafka.admin import AdminClient

from logferry.broker import maven
from logferry.errors import BrokerError

JVM_FLAGS = [
    "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent", "-Djava.awt.headless=true",
]  # fmt: skip


def default_home() -> Path:
    base = os.environ.get("LOGFERRY_BROKER_HOME")
    if base:
        return Path(base)
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "logferry" / "broker"


@dataclass
class Node:
    node_id: int
    port: int
    controller_port: int
    pid: int | None = None
    sasl_port: int | None = None  # a SASL_PLAINTEXT (SCRAM-SHA-256) listener, when started with sasl_users

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class ClusterState:
    version: str
    cluster_id: str
    home: str
    nodes: list[Node] = field(default_factory=list)
    started_at: float = 0.0

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.address for n in self.nodes)

    @property
    def sasl_bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{n.sasl_port}" for n in self.nodes if n.sasl_port)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        raw = json.loads(text)
        raw["nodes"] = [Node(**n) for n in raw["nodes"]]
        return cls(**raw)


def new_cluster_id() -> str:
    """Same shape as Kafka's Uuid.randomUuid(): base64url, no padding, never a leading '-'."""
    while True:
        s = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not s.startswith("-"):
            return s


def java_command() -> str:
    java = shutil.which("java")
    if java is None:
        raise BrokerError(
            "Java is not on PATH: the local Kafka broker needs Java 17 or newer "
            "(e.g. `apt-get install openjdk-17-jre-headless`), or use --bootstrap-servers with an existing cluster."
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    feature = int(m.group(1)) if m else 0
    if feature == 1 and m and m.group(2):  # "1.8" style
        feature = int(m.group(2))
    if feature < 17:
        raise BrokerError(f"{java} is Java {feature or '?'}; Kafka 4.x needs Java 17 or newer")
    return java


def pid_alive(pid: int | None) -> bool:
    """True while `pid` is a live (not zombie) Kafka JVM.

    The command line guards against pid reuse; it can read empty for a moment while the
    java launcher execs, so an empty one does not count as dead.
    """
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X") and (not cmdline or b"kafka.Kafka" in cmdline)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class LocalCluster:
    """One or more KRaft nodes (combined broker+controller) on 127.0.0.1."""

    def __init__(self, home: Path | None = None, tie_to_parent: bool = False) -> None:
        # tie_to_parent: nodes die with the process that started them (tests, demo), so a
        # killed test run never leaves brokers behind. `broker start` leaves them running.
        self.tie_to_parent = tie_to_parent
        self.home = Path(home) if home else default_home()
        self.state_file = self.home / "cluster.json"
        self._procs: dict[int, subprocess.Popen[bytes]] = {}  # nodes this object spawned

    # ---- state -------------------------------------------------------------------------
    def state(self) -> ClusterState | None:
        try:
            return ClusterState.from_json(self.state_file.read_text())
        except FileNotFoundError:
            return None

    def _save(self, state: ClusterState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        tmp.replace(self.state_file)

    @property
    def bootstrap_servers(self) -> str:
        return self._require_state().bootstrap_servers

    def running_nodes(self) -> list[Node]:
        st = self.state()
        return [n for n in st.nodes if pid_alive(n.pid)] if st else []

    def node_dir(self, node_id: int) -> Path:
        return self.home / f"node-{node_id}"

    def log_file(self, node_id: int = 1) -> Path:
        return self.node_dir(node_id) / "logs" / "server.log"

    # ---- start -------------------------------------------------------------------------
    def start(
        self,
        version: str = maven.DEFAULT_KAFKA_VERSION,
        nodes: int = 1,
        port: int = 9092,
        heap: str = "512m",
        fresh: bool = False,
        timeout: float = 90.0,
        sasl_users: dict[str, str] | None = None,
    ) -> ClusterState:
        """Start the cluster and return once every node answers a metadata request.

        port=0 picks free ports (tests); otherwise node i listens on port+2i and its
        controller on port+2i+1. `sasl_users` (name → password) adds a SASL_PLAINTEXT
        listener per node (SCRAM-SHA-256; port+2n+i) with those credentials created at
        format time, so it implies a fresh cluster; PLAINTEXT stays for the brokers' own traffic.
        """
        maven.check_version(version)
        if nodes < 1:
            raise BrokerError("--nodes must be at least 1")
        alive = self.running_nodes()
        if alive:
            st = self.state()
            assert st is not None
            raise BrokerError(
                f"a Kafka broker is already running from {self.home} "
                f"(pid {', '.join(str(n.pid) for n in alive)}, {st.bootstrap_servers}, Kafka {st.version}); "
                "use `logferry broker status`, or `logferry broker stop` first"
            )
        java = java_command()
        libs = maven.resolve(version)

        previous = self.state()
        if fresh or sasl_users or previous is None or previous.version != version or len(previous.nodes) != nodes:
            if self.home.exists():
                shutil.rmtree(self.home)
            previous = None
        self.home.mkdir(parents=True, exist_ok=True)

        if previous is not None and port in (0, previous.nodes[0].port):
            layout = previous.nodes  # restart: same ports, same data
        else:
            per_node = 3 if sasl_users else 2
            ports = free_ports(per_node * nodes) if port == 0 else list(range(port, port + per_node * nodes))
            layout = [Node(i + 1, ports[2 * i], ports[2 * i + 1]) for i in range(nodes)]
            if sasl_users:
                for i, node in enumerate(layout):
                    node.sasl_port = ports[2 * nodes + i]
        busy = [p for n in layout for p in (n.port, n.controller_port, n.sasl_port) if p and not port_free(p)]
        if busy:
            raise BrokerError(
                f"port(s) {', '.join(map(str, busy))} on 127.0.0.1 already in use; "
                "choose another with --port, or stop what listens there"
            )
        state = ClusterState(
            version=version,
            cluster_id=previous.cluster_id if previous else new_cluster_id(),
            home=str(self.home),
            nodes=layout,
            started_at=time.time(),
        )
        for node in layout:
            self._prepare_node(java, libs, state, node, sasl_users or {})
        for node in layout:
            node.pid = self._spawn(java, libs, state, node, heap)
        self._save(state)
        try:
            self.wait_ready(state, timeout)
        except BrokerError:
            self.stop(timeout=10)
            raise
        return state

    def _prepare_node(self, java: str, libs: Path, state: ClusterState, node: Node, sasl_users: dict[str, str]) -> None:
        d = self.node_dir(node.node_id)
        (d / "logs").mkdir(parents=True, exist_ok=True)
        props = d / "server.properties"
        props.write_text(self._server_properties(state, node))
        if (d / "data" / "meta.properties").exists():
            return
        proc = subprocess.run(
            [java, "-cp", f"{libs}/*", *self._log_flags(state.version, d), "kafka.tools.StorageTool",
             "format", "-t", state.cluster_id, "-c", str(props), *scram_args(sasl_users)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            output = proc.stdout + proc.stderr
            for password in sasl_users.values():  # never echo a credential
                output = output.replace(password, "***")
            raise BrokerError(f"formatting node {node.node_id} storage failed:\n{output}")

    def _server_properties(self, state: ClusterState, node: Node) -> str:
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in state.nodes)
        rf = min(3, len(state.nodes))
        lines = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": self.node_dir(node.node_id) / "data",
            "num.partitions": 1,
            "num.network.threads": 2,
            "num.io.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": 3,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": min(2, rf),
            "transaction.state.log.num.partitions": 3,
            "group.initial.rebalance.delay.ms": 0,
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            # Shorter failure detection so failover tests stay bounded.
            "controller.quorum.election.timeout.ms": 1000,
            "controller.quorum.fetch.timeout.ms": 2000,
            "broker.session.timeout.ms": 6000,
            "broker.heartbeat.interval.ms": 500,
        }
        if node.sasl_port:
            lines["listeners"] += f",SASL_PLAINTEXT://127.0.0.1:{node.sasl_port}"
            lines["advertised.listeners"] += f",SASL_PLAINTEXT://127.0.0.1:{node.sasl_port}"
            lines["listener.security.protocol.map"] += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
            lines["sasl.enabled.mechanisms"] = "SCRAM-SHA-256"
            lines["listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config"] = (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            )
        if maven.major(state.version) >= 4:
            lines["share.coordinator.state.topic.replication.factor"] = rf
            lines["share.coordinator.state.topic.min.isr"] = min(2, rf)
        return "".join(f"{k}={v}\n" for k, v in lines.items())

    @staticmethod
    def _log_flags(version: str, node_dir: Path) -> list[str]:
        pkg = resources.files("logferry.broker")
        if maven.major(version) >= 4:
            flag = f"-Dlog4j2.configurationFile={pkg.joinpath('log4j2.properties')}"
        else:
            flag = f"-Dlog4j.configuration=file:{pkg.joinpath('log4j.properties')}"
        return [flag, f"-Dkafka.logs.dir={node_dir / 'logs'}"]

    def _spawn(self, java: str, libs: Path, state: ClusterState, node: Node, heap: str) -> int:
        d = self.node_dir(node.node_id)
        cmd = [
            java, f"-Xms{min_heap(heap)}", f"-Xmx{heap}", *JVM_FLAGS, *self._log_flags(state.version, d),
            "-cp", f"{libs}/*", "kafka.Kafka", str(d / "server.properties"),
        ]  # fmt: skip
        with (d / "logs" / "stdout.log").open("ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent if self.tie_to_parent else None,
            )  # fmt: skip
        self._procs[node.node_id] = proc
        return proc.pid

    def wait_ready(self, state: ClusterState, timeout: float) -> None:
        """Await a metadata response listing every node (no sleeps standing in for readiness)."""
        admin = AdminClient({"bootstrap.servers": state.bootstrap_servers, "log_level": 0})
        deadline = time.monotonic() + timeout
        want = {n.node_id for n in state.nodes if n.pid}
        while time.monotonic() < deadline:
            dead = [n for n in state.nodes if n.pid and not pid_alive(n.pid)]
            if dead:
                raise BrokerError(
                    f"Kafka node {dead[0].node_id} exited during start-up; its errors:\n" + self.errors(dead[0].node_id)
                )
            with contextlib.suppress(Exception):
                md = admin.list_topics(timeout=1.0)
                if want <= set(md.brokers):
                    return
            time.sleep(0.2)
        raise BrokerError(f"Kafka did not become ready within {timeout:.0f}s; see {self.log_file()}")

    # ---- node-level control (failover tests) -------------------------------------------
    def stop_node(self, node_id: int, timeout: float = 30.0, kill: bool = False) -> None:
        st = self._require_state()
        node = next(n for n in st.nodes if n.node_id == node_id)
        _terminate([node.pid] if node.pid else [], timeout, kill)

    def start_node(self, node_id: int, heap: str = "512m", timeout: float = 60.0) -> None:
        st = self._require_state()
        node = next(n for n in st.nodes if n.node_id == node_id)
        if pid_alive(node.pid):
            return
        java = java_command()
        node.pid = self._spawn(java, maven.resolve(st.version), st, node, heap)
        self._save(st)
        self.wait_ready(st, timeout)

    def _require_state(self) -> ClusterState:
        st = self.state()
        if st is None:
            raise BrokerError(f"no local broker has been started from {self.home}")
        return st

    # ---- stop / logs -------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> list[int]:
        """SIGTERM every node at once (controlled shutdown), SIGKILL what remains after `timeout`."""
        st = self.state()
        if st is None:
            return []
        pids = [n.pid for n in st.nodes if pid_alive(n.pid)]
        _terminate(pids, timeout, kill=False)
        for n in st.nodes:
            n.pid = None
        self._save(st)
        return [p for p in pids if p]

    def errors(self, node_id: int, limit: int = 12) -> str:
        """The ERROR/FATAL lines of a node's logs plus the JVM's own output: why it died."""
        logs = self.node_dir(node_id) / "logs"
        found: list[str] = []
        for name in ("server.log", "stdout.log"):
            with contextlib.suppress(FileNotFoundError):
                text = (logs / name).read_text(errors="replace").splitlines()
                found += [ln for ln in text if name == "stdout.log" or " ERROR " in ln or " FATAL " in ln]
        proc = self._procs.get(node_id)
        status = f"exit status {proc.poll()}; " if proc is not None else ""
        return status + ("\n".join(found[-limit:]) or f"(nothing in {logs})")

    def tail(self, node_id: int = 1, lines: int = 50) -> str:
        path = self.log_file(node_id)
        if not path.exists():
            path = self.node_dir(node_id) / "logs" / "stdout.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return f"(no log yet at {path})"


def _terminate(pids: list[int | None], timeout: float, kill: bool) -> None:
    live = [p for p in pids if p and pid_alive(p)]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in live):
        time.sleep(0.1)
    for p in live:
        if pid_alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    # Reap if they were our children (tests), so no zombie keeps /proc/<pid> alive.
    for p in live:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(p, os.WNOHANG)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the parent exits (Linux prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # 1 == PR_SET_PDEATHSIG


def scram_args(users: dict[str, str]) -> list[str]:
    """StorageTool flags that create SCRAM-SHA-256 credentials in the cluster's bootstrap metadata."""
    return [a for name, pw in users.items() for a in ("--add-scram", f"SCRAM-SHA-256=[name={name},password={pw}]")]


def min_heap(heap: str) -> str:
    return "128m" if heap.lower().endswith(("m", "g")) else heap


@contextlib.contextmanager
def ephemeral_cluster(
    version: str = maven.DEFAULT_KAFKA_VERSION,
    nodes: int = 1,
    heap: str = "512m",
    sasl_users: dict[str, str] | None = None,
) -> Iterator[LocalCluster]:
    """A throw-away cluster on free ports in a temp dir, stopped and removed on exit (tests, demo)."""
    with tempfile.TemporaryDirectory(prefix="logferry-kafka-") as home:
        cluster = LocalCluster(Path(home), tie_to_parent=True)
        cluster.start(version=version, nodes=nodes, port=0, heap=heap, sasl_users=sasl_users)
        try:
            yield cluster
        finally:
            cluster.stop(timeout=20)
