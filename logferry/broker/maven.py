"""Resolve Apache Kafka's jars from Maven Central into a per-version cache dir."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from logferry.errors import BrokerError

# The newest 4.x whose broker *and* tools artifacts are all on Central (4.4.0's tools are not).
DEFAULT_KAFKA_VERSION = "4.3.1"
_VERSION = re.compile(r"^(3\.9|4\.\d+)\.\d+$")


def cache_root() -> Path:
    base = os.environ.get("LOGFERRY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "logferry"
    )
    return Path(base)


def check_version(version: str) -> str:
    if not _VERSION.match(version):
        raise BrokerError(f"--kafka-version {version!r}: expected 4.x.y or 3.9.y (KRaft), e.g. 4.3.1 or 3.9.1")
    return version


def major(version: str) -> int:
    return int(version.split(".", 1)[0])


def libs_dir(version: str) -> Path:
    return cache_root() / "kafka" / version / "libs"


def resolve(version: str) -> Path:
    """Return the dir holding every runtime jar of Kafka `version`, fetching it once.

    Jars are copied into a temp dir and renamed into place, so a fetch that was
    interrupted never leaves a half-filled cache behind.
    """
    check_version(version)
    target = libs_dir(version)
    if (target / ".complete").exists():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            f"Kafka {version} jars are not cached in {target} and Maven (`mvn`) is not on PATH to fetch them. "
            "Install Maven (e.g. `apt-get install maven`) or point --bootstrap-servers at an existing cluster."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    pom = resources.files("logferry.broker").joinpath("pom.xml")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, resources.as_file(pom) as pom_path:
        out = Path(tmp) / "libs"
        cmd = [
            mvn, "-q", "-B", "-f", str(pom_path), "dependency:copy-dependencies",
            "-DincludeScope=runtime", f"-DoutputDirectory={out}", f"-Dkafka.version={version}",
            "-P", "kafka4" if major(version) >= 4 else "kafka3",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not any(out.glob("kafka_2.13-*.jar")):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            raise BrokerError(f"Maven could not resolve Kafka {version}:\n{tail}")
        (out / ".complete").write_text(version)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    return target
