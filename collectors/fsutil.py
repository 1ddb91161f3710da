"""Durable file helpers shared by the spool and the checkpoint registry.

State files are private (0600, dirs 0700): log lines may carry secrets. A file is replaced
atomically (tmp + fsync + rename + fsync of the directory) so a crash leaves either the
old or the new version on disk, never a torn mix.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def default_state_dir() -> Path:
    """`$LOGFERRY_STATE_DIR`, else /var/lib/logferry for root, else ~/.local/state/logferry/agent."""
    env = os.environ.get("LOGFERRY_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/logferry")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "logferry" / "agent"


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) with mode 0700; tighten an existing dir we own."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        os.chmod(path, DIR_MODE)
    return path


def fsync_dir(path: Path) -> None:
    """Make a create/rename/unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, fsync: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
