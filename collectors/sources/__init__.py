"""One module per IPC channel; each turns its channel into raw entries and can be stopped.

`KINDS` is the source registry: kind → "module:Class", imported only when a config uses
that kind, so a missing optional library (posix_ipc, sysv_ipc) only matters to its users.
A new source module registers itself here with one line.
"""

from __future__ import annotations

import importlib

from logferry.collectors.sources.base import Source
from logferry.errors import ConfigError

KINDS: dict[str, str] = {
    "stdin": "logferry.collectors.sources.stdin:StdinSource",
    "unix": "logferry.collectors.sources.unix:UnixStreamSource",
    "unixgram": "logferry.collectors.sources.unixgram:UnixDatagramSource",
    "fifo": "logferry.collectors.sources.fifo:FifoSource",
    "posix_mq": "logferry.collectors.sources.posix_mq:PosixMqSource",
    "sysv_mq": "logferry.collectors.sources.sysv_mq:SysvMqSource",
    "shm": "logferry.collectors.sources.shm:ShmSource",
    "syslog": "logferry.collectors.sources.syslog:SyslogSource",
    "file": "logferry.collectors.sources.file:FileSource",
}


def known_kinds() -> str:
    return ", ".join(sorted(KINDS))


def source_class(kind: str) -> type[Source]:
    """The class for `kind`; a clear ConfigError listing the known kinds otherwise."""
    target = KINDS.get(kind)
    if target is None:
        raise ConfigError(f"unknown source kind {kind!r}; known kinds: {known_kinds()}")
    module, _, name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ConfigError(f"source kind {kind!r} cannot be loaded ({e})") from None
    return cls
