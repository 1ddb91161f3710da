"""Filtering before the handler: unwanted entries are committed without work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from logferry.processors.config import FilterSettings

Predicate = Callable[[dict[str, Any]], bool]


class EntryFilter:
    """Keep an entry when its level is allowed, every listed field matches, and `predicate` agrees.

    A field is a LogEntry field (service, host, source, ...) or, failing that, an attribute.
    """

    def __init__(self, settings: FilterSettings | None = None, predicate: Predicate | None = None) -> None:
        settings = settings or FilterSettings()
        self.levels = {lv.lower() for lv in settings.levels} if settings.levels is not None else None
        self.fields = {k: set(v) for k, v in settings.fields.items()}
        self.predicate = predicate

    @property
    def active(self) -> bool:
        return self.levels is not None or bool(self.fields) or self.predicate is not None

    def __call__(self, entry: dict[str, Any]) -> bool:
        if self.levels is not None and (entry.get("level") or "").lower() not in self.levels:
            return False
        for name, allowed in self.fields.items():
            value = entry.get(name)
            if value is None:
                value = (entry.get("attributes") or {}).get(name)
            if value not in allowed:
                return False
        return self.predicate is None or bool(self.predicate(entry))
