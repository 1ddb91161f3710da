"""Binding a Unix socket at a path the way operators expect, shared by `unix` and `unixgram`.

- A missing parent directory is a clear ConfigError (we do not create /run/... silently).
- A stale socket file (left by a crashed agent) is replaced; a socket another live process
  still listens on is refused, and so is a path that is not a socket.
- The socket file gets `mode` (0660 by default) and optionally `owner`/`group`, set before
  anyone can connect: bind under a tight umask, then chmod/chown.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import stat
from pathlib import Path

from logferry.collectors.sources.ipcutil import FileMode
from logferry.config import StrictModel
from logferry.errors import ConfigError


class SocketFileOptions(StrictModel):
    mode: FileMode = 0o660
    owner: str | None = None
    group: str | None = None


def _live(path: Path, kind: int) -> bool:
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(str(path))
        return True
    except OSError:  # ECONNREFUSED: nobody listens; the file is stale
        return False
    finally:
        probe.close()


def bind_unix(path: Path, kind: int, opts: SocketFileOptions, what: str, backlog: int | None = None) -> socket.socket:
    """A socket of `kind` bound at `path` (listening when `backlog` is given); ConfigError otherwise."""
    if not path.parent.is_dir():
        raise ConfigError(f"{what}: directory {path.parent} does not exist (for socket {path})")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{what}: {path} exists and is not a socket; refusing to replace it")
        if _live(path, kind):
            raise ConfigError(f"{what}: another process is listening on {path}")
    try:
        uid = pwd.getpwnam(opts.owner).pw_uid if opts.owner else -1
        gid = grp.getgrnam(opts.group).gr_gid if opts.group else -1
    except KeyError as e:
        raise ConfigError(f"{what}: unknown owner or group ({e.args[0]})") from None
    # Bind (and listen) under a temporary name, then rename into place: a client never finds
    # the path bound but not yet listening, and a stale file is replaced atomically.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, kind)
    old_umask = os.umask(0o177)  # nobody but us until chmod
    try:
        sock.bind(str(tmp))
        if uid != -1 or gid != -1:
            os.chown(tmp, uid, gid)
        os.chmod(tmp, opts.mode)
        if backlog is not None:
            sock.listen(backlog)
        os.rename(tmp, path)
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"{what}: cannot bind {path}: {e.strerror}") from None
    finally:
        os.umask(old_umask)
    return sock


def inode(path: Path) -> int:
    return os.stat(path).st_ino


def unlink_own(path: Path, ino: int | None) -> None:
    """Remove the socket file if it is still the one we bound (a newer agent may have replaced it)."""
    if ino is None:
        return
    with contextlib.suppress(OSError):
        if inode(path) == ino:
            path.unlink()
