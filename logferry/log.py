"""Logging setup, and a helper that logs each kind of bad input once instead of per entry."""

from __future__ import annotations

import logging
import sys
import threading

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format=_FORMAT, stream=sys.stderr, force=True)


class LogOnce:
    """Warn the first time a kind of problem is seen; later ones are only counted in metrics."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def warning(self, kind: str, msg: str, *args: object) -> None:
        with self._lock:
            if kind in self._seen:
                return
            self._seen.add(kind)
        self._logger.warning(msg + " (further '%s' problems are only counted)", *args, kind)
