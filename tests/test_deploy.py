"""docker/ and docker/systemd/, checked as far as a machine without a Docker engine allows.

Compose and Prometheus/Grafana files parse and point at files that exist; every command a
container or unit runs is a real logferry command whose config file validates; Prometheus
scrapes the ports the services listen on; promtool and systemd-analyze accept the files.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from logferry.broker import DEFAULT_KAFKA_VERSION

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SYSTEMD = DOCKER / "systemd"
LOGFERRY = str(Path(sys.executable).with_name("logferry"))
COMPOSE: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
LOGFERRY_SERVICES = {n: s for n, s in SERVICES.items() if s.get("image") == "logferry:dev"}


# ---- helpers ---------------------------------------------------------------------------------
def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(args, capture_output=True, text=True, env=env, input=stdin, timeout=120)


def check_logferry_command(args: list[str]) -> str:
    """Fail unless `logferry ARGS` names a leaf command and every option it passes exists; return its help."""
    leading = args[: next((i for i, a in enumerate(args) if a.startswith("-")), len(args))]
    result = run(LOGFERRY, *leading, "--help")
    assert result.returncode == 0, f"`logferry {' '.join(args)}`: {result.stdout}{result.stderr}"
    usage = re.search(r"Usage: logferry (.*)", result.stdout)
    assert usage and "COMMAND" not in usage[1], f"`logferry {' '.join(leading)}` is a group, not a command"
    for option in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(rf"{re.escape(option)}\b", result.stdout), f"`logferry {' '.join(leading)}` has no {option}"
    return result.stdout


def option_value(args: list[str], option: str) -> str | None:
    for i, a in enumerate(args):
        if a == option and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(option + "="):
            return a.split("=", 1)[1]
    return None


def check_config(path: Path) -> dict[str, Any]:
    result = run(LOGFERRY, "config", "check", str(path))
    assert result.returncode == 0, f"{path}: {result.stdout}{result.stderr}"
    return tomllib.loads(path.read_text())


def mounts(service: dict[str, Any]) -> list[tuple[Path, PurePosixPath]]:
    """Bind mounts (host path, container path) of a compose service; named volumes are skipped."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append(((DOCKER / source).resolve(), PurePosixPath(target)))
    return out


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a file the container sees comes from, through the service's bind mounts."""
    path = PurePosixPath(container_path)
    for source, target in mounts(service):
        if path == target or target in path.parents:
            return source / path.relative_to(target)
    raise AssertionError(f"{container_path} is not mounted into the container")


def service_config(service: dict[str, Any]) -> dict[str, Any]:
    config = option_value([str(a) for a in service["command"]], "--config")
    assert config, f"{service['command']}: no --config"
    return tomllib.loads(host_path(service, config).read_text())


def metrics_port(config: dict[str, Any], default: int) -> tuple[str, int]:
    host, _, port = config.get("metrics", {}).get("address", f"127.0.0.1:{default}").rpartition(":")
    return host, int(port)


# ---- compose ---------------------------------------------------------------------------------
def test_compose_brings_up_the_whole_pipeline():
    assert {"kafka", "prometheus", "grafana", "agent", "processor-1", "processor-2", "loadgen"} <= set(SERVICES)
    kraft = SERVICES["kafka"]["environment"]
    assert "controller" in kraft["KAFKA_PROCESS_ROLES"]
    # Same Kafka as the local broker the tests and the demo run on.
    assert SERVICES["kafka"]["image"] == f"apache/kafka:{DEFAULT_KAFKA_VERSION}"
    assert SERVICES["topics"]["image"] == SERVICES["kafka"]["image"]


def test_compose_files_exist():
    for name, service in SERVICES.items():
        for source, _ in mounts(service):
            assert source.exists(), f"service {name} mounts {source}, which does not exist"
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for dep in service.get("depends_on", {}):
            assert dep in SERVICES, f"service {name} depends on unknown service {dep}"


def test_processor_members_share_one_group():
    configs = [service_config(SERVICES[name]) for name in ("processor-1", "processor-2")]
    assert configs[0]["processor"]["group"] == configs[1]["processor"]["group"]


@pytest.mark.parametrize("name", sorted(n for n, s in LOGFERRY_SERVICES.items() if "entrypoint" not in s))
def test_service_runs_a_valid_logferry_command_with_a_valid_config(name):
    service = SERVICES[name]
    args = [str(a) for a in service["command"]]
    check_logferry_command(args)
    config_path = option_value(args, "--config")
    assert config_path, f"{name}: runs without a config file"
    config = check_config(host_path(service, config_path))
    # The container must listen beyond loopback for Prometheus, on a port the service exposes,
    # which is the port the image's HEALTHCHECK asks.
    host, port = metrics_port(config, 0)
    assert host == "0.0.0.0", f"{name}: metrics on {host} cannot be scraped from another container"
    assert str(port) in [str(p) for p in service.get("expose", [])], f"{name}: metrics port {port} not exposed"
    assert f"127.0.0.1:{port}/healthz" in dockerfile_text()


def test_load_generator_runs_with_its_compose_arguments(tmp_path):
    """The loadgen container's command, run for real into a unix socket; every line is a JSON entry."""
    service = SERVICES["loadgen"]
    assert service["entrypoint"][0] == "python"
    script = dockerfile_copy_source(service["entrypoint"][1])
    args = [str(a) for a in service["command"]]
    socket_path = option_value(args, "--socket")
    assert socket_path and any(str(t) == str(PurePosixPath(socket_path).parent) for t in named_volume_targets("agent"))
    local = str(tmp_path / "app.sock")
    args[args.index(socket_path)] = local
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(local)
    server.listen(1)
    received = bytearray()

    def accept() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(65536):
                received.extend(chunk)

    reader = threading.Thread(target=accept)
    reader.start()
    result = run(sys.executable, str(script), *args, "--count", "300", "--connect-timeout", "10")
    reader.join(30)
    server.close()
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in received.decode().splitlines()]
    assert len(entries) == 300
    assert {"timestamp", "service", "level", "message", "seq"} <= set(entries[0])
    per_service: dict[str, list[int]] = {}
    for e in entries:
        per_service.setdefault(e["service"], []).append(e["seq"])
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in per_service.values())


def named_volume_targets(name: str) -> list[PurePosixPath]:
    return [PurePosixPath(v.split(":")[1]) for v in SERVICES[name].get("volumes", []) if not v.startswith((".", "/"))]


# ---- the image -------------------------------------------------------------------------------
def dockerfile_text() -> str:
    return (DOCKER / "Dockerfile").read_text()


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def dockerfile_copy_source(container_path: str) -> Path:
    for op, arg in dockerfile_instructions():
        parts = arg.split()
        if op == "COPY" and not parts[0].startswith("--from") and parts[-1] == container_path:
            return ROOT / parts[0]
    raise AssertionError(f"the Dockerfile copies nothing to {container_path}")


def test_dockerfile_is_small_non_root_with_a_healthcheck():
    instructions = dockerfile_instructions()
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert froms and froms[-1].split()[0] == "python:3.11-slim", "the runtime stage is python:3.11-slim"
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    health = [arg for op, arg in instructions if op == "HEALTHCHECK"]
    assert health and "LOGFERRY_HEALTH_URL" in health[0] and "/healthz" in dockerfile_text()
    assert ("ENTRYPOINT", '["logferry"]') in instructions
    for op, arg in instructions:
        if op == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the build context"
    # The context sends only what is allow-listed; every COPY source must be on that list.
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for op, arg in instructions:
        if op == "COPY" and not arg.startswith("--from"):
            assert set(arg.split()[:-1]) <= allowed, f"COPY {arg}: excluded by Dockerfile.dockerignore"
    # Every package folder the wheel needs is copied into the build stage.
    copied = {arg.split()[0] for op, arg in instructions if op == "COPY"}
    package_dirs = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    )
    assert package_dirs <= copied


# ---- Prometheus and Grafana ------------------------------------------------------------------
def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "prometheus.yml").read_text())


def test_prometheus_scrapes_the_ports_the_services_listen_on():
    scraped: dict[str, set[str]] = {}
    for job in prometheus_config()["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                assert host in SERVICES, f"job {job['job_name']} scrapes {host}, which is no compose service"
                service = SERVICES[host]
                config = tomllib.loads(
                    host_path(service, option_value(service["command"], "--config") or "").read_text()
                )
                assert metrics_port(config, 0)[1] == int(port), f"{target}: the service listens elsewhere"
                scraped.setdefault(job["job_name"], set()).add(host)
    assert scraped == {"logferry-agent": {"agent"}, "logferry-processor": {"processor-1", "processor-2"}}
    # The alert rules name these jobs.
    alerts = (ROOT / "dashboards" / "alerts.yml").read_text()
    assert 'up{job="logferry-processor"}' in alerts and 'up{job="logferry-agent"}' in alerts


def test_promtool_accepts_the_prometheus_config_as_mounted(tmp_path):
    """Lay out /etc/prometheus as the container sees it (bind mounts), then `promtool check config`."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `bash .ci/system-deps` installs Debian's prometheus package"
    service = SERVICES["prometheus"]
    config_in_container = next(a.split("=", 1)[1] for a in service["command"] if a.startswith("--config.file="))
    root = tmp_path / "container"
    for source, target in mounts(service):
        dest = root / target.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, dest)
    result = run(promtool, "check", "config", str(root / PurePosixPath(config_in_container).relative_to("/")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "rules found" in result.stdout


def test_grafana_provisioning_points_at_what_exists():
    grafana = SERVICES["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    prometheus = [d for d in datasources if d["type"] == "prometheus"]
    assert len(prometheus) == 1 and prometheus[0].get("isDefault")
    url = re.fullmatch(r"http://([\w-]+):(\d+)/?", prometheus[0]["url"])
    assert url and url[1] == "prometheus" and url[1] in SERVICES
    assert any(p.endswith(f":{url[2]}") for p in SERVICES["prometheus"]["ports"])
    providers = yaml.safe_load((provisioning / "dashboards" / "logferry.yaml").read_text())["providers"]
    for provider in providers:
        folder = host_path(grafana, provider["options"]["path"])
        dashboards = sorted(folder.glob("*.json"))
        assert [d.name for d in dashboards] == ["logferry-pipeline.json"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home).is_file()
    # The dashboard's data source variable offers exactly the provisioned type.
    variables = json.loads(dashboards[0].read_text())["templating"]["list"]
    assert {"type": "datasource", "query": prometheus[0]["type"]}.items() <= variables[0].items()


# ---- systemd ---------------------------------------------------------------------------------
UNITS = {"logferry-agent.service": None, "logferry-processor@.service": "stats"}


def unit_path_for(unit: str, instance: str | None) -> str:
    return unit.replace("@.", f"@{instance}.") if instance else unit


def read_unit(unit: str) -> configparser.ConfigParser:
    """Strict INI parse: no duplicate sections or keys, the sections systemd knows."""
    parser = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string((SYSTEMD / unit).read_text(), source=unit)
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    return parser


@pytest.mark.parametrize(("unit", "instance"), UNITS.items())
def test_systemd_unit_runs_a_valid_logferry_command(unit, instance):
    service = read_unit(unit)["Service"]
    assert service["Restart"] == "on-failure"
    assert service["User"] != "root" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["CapabilityBoundingSet"] == ""
    exe, *args = service["ExecStart"].replace("%i", instance or "").split()
    assert Path(exe).name == "logferry"
    check_logferry_command(args)
    config = option_value(args, "--config")
    assert config and config.startswith("/etc/logferry/")
    check_config(SYSTEMD / PurePosixPath(config).name)  # the example shipped beside the unit


@pytest.mark.parametrize(("unit", "instance"), UNITS.items())
def test_systemd_analyze_verifies_the_unit(unit, instance, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # no systemd on this machine: the strict parse above is what we can do
        read_unit(unit)
        return
    # verify also checks that ExecStart exists: point it at this environment's logferry.
    text = (SYSTEMD / unit).read_text().replace("/opt/logferry/bin/logferry", LOGFERRY)
    path = tmp_path / unit_path_for(unit, instance)
    path.write_text(text)
    result = run(analyze, "verify", str(path))
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr
