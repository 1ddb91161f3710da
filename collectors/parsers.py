"""Parsers: one frame (bytes) → one LogEntry dict (schemas/log_entry.avsc).

A parser never raises on input: what it cannot parse becomes a raw entry (message = the
text) with `parse_error` naming the problem. Bytes that are not UTF-8 are kept in `raw`
and the message holds them with replacement characters. Timestamps found in the input
are used only when they fall in year 1..9999 (what Avro readers turn into datetimes);
otherwise the receive time stands in.

The pipeline fills `host` and `source` afterwards (a parser sets `host` only when the
input names one, like syslog's HOSTNAME).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from logferry.collectors.config import ParserSettings
from logferry.schemas import LogEntry

ParseFn = Callable[[bytes, int], LogEntry]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_MICROS = (datetime(1, 1, 2, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)  # a day of slack for tz
MAX_MICROS = (datetime(9999, 12, 30, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)

SEVERITIES = ("emergency", "alert", "critical", "error", "warning", "notice", "info", "debug")
LEVEL_RANK = {name: rank for rank, name in enumerate(("trace", "debug", "info", "notice", "warning", "error",
                                                      "critical", "alert", "emergency"))}  # fmt: skip
_LEVEL_ALIASES = {
    **{name: name for name in LEVEL_RANK},
    "trc": "trace", "finest": "trace", "finer": "trace",
    "dbg": "debug", "fine": "debug", "verbose": "debug",
    "information": "info", "informational": "info", "inf": "info",
    "warn": "warning", "wrn": "warning",
    "err": "error", "eror": "error", "severe": "error",
    "crit": "critical", "fatal": "critical", "ftl": "critical",
    "emerg": "emergency", "panic": "emergency",
}  # fmt: skip
FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
              "ftp", "ntp", "audit", "alert", "clock", *(f"local{i}" for i in range(8)))  # fmt: skip


def normalise_level(value: Any) -> str | None:
    """Map the many spellings of a severity (and syslog numbers 0-7) onto the schema's names."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return SEVERITIES[value] if 0 <= value <= 7 else None
    text = str(value).strip().lower()
    if text.isdigit():
        n = int(text)
        return SEVERITIES[n] if n <= 7 else None
    return _LEVEL_ALIASES.get(text)


def micros_in_range(micros: int) -> int | None:
    return micros if MIN_MICROS <= micros <= MAX_MICROS else None


def datetime_micros(dt: datetime) -> int | None:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return micros_in_range((dt - EPOCH) // timedelta(microseconds=1))
    except OverflowError:
        return None


_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_timestamp(value: Any) -> int | None:
    """ISO 8601 text or an epoch number (s, ms, µs or ns, told apart by magnitude) → micros, or None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        magnitude = abs(value)
        scale = 1_000_000 if magnitude < 1e11 else 1_000 if magnitude < 1e14 else 1 if magnitude < 1e17 else 0.001
        try:
            return micros_in_range(int(value * scale))
        except (OverflowError, ValueError):
            return None
    text = str(value).strip()
    if not text:
        return None
    if text.replace(".", "", 1).isdigit():
        return parse_timestamp(float(text) if "." in text else int(text))
    if text[-1] in "zZ":
        text = text[:-1] + "+00:00"
    text = _FRACTION.sub(r"\1", text)  # nanosecond precision: datetime keeps microseconds
    try:
        return datetime_micros(datetime.fromisoformat(text))
    except ValueError:
        return None


def decode(frame: bytes) -> tuple[str, bytes | None]:
    """The text of a frame, plus the original bytes when they were not valid UTF-8."""
    try:
        return frame.decode(), None
    except UnicodeDecodeError:
        return frame.decode(errors="replace"), bytes(frame)


def new_entry(text: str, raw: bytes | None, received_at: int) -> LogEntry:
    return {
        "timestamp": received_at,
        "received_at": received_at,
        "host": None,
        "source": "",
        "service": None,
        "level": None,
        "message": text,
        "attributes": {},
        "parse_error": None,
        "raw": raw,
    }


def parse_raw(frame: bytes, received_at: int) -> LogEntry:
    text, raw = decode(frame)
    return new_entry(text, raw, received_at)


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, bool) else str(value)


class FieldParser:
    """Shared by json, logfmt and regex: move well-known keys into entry fields, the rest into attributes."""

    name = "fields"

    def __init__(self, settings: ParserSettings) -> None:
        self.settings = settings
        self._roles = {}
        for role, keys in (
            ("service", settings.service_keys),
            ("level", settings.level_keys),
            ("timestamp", settings.timestamp_keys),
            ("message", settings.message_keys),
            ("host", ["host", "hostname"]),
        ):
            for k in reversed(keys):  # the first key listed wins
                self._roles[k] = role

    def fields(self, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, frame: bytes, received_at: int) -> LogEntry:
        text, raw = decode(frame)
        entry = new_entry(text, raw, received_at)
        try:
            fields = self.fields(text)
        except ValueError as e:
            entry["parse_error"] = f"{self.name}: {e}"[:500]
            return entry
        self.apply(entry, fields)
        return entry

    def apply(self, entry: LogEntry, fields: dict[str, Any]) -> None:
        attributes: dict[str, str] = entry["attributes"]
        found: dict[str, Any] = {}
        roles = self._roles
        for key, value in fields.items():
            role = roles.get(key)
            if role is not None and role not in found and value is not None:
                found[role] = value
            else:
                attributes[key] = as_text(value)
        if "message" in found:
            entry["message"] = as_text(found["message"])
        if "service" in found:
            entry["service"] = as_text(found["service"])
        if "host" in found:
            entry["host"] = as_text(found["host"])
        if "level" in found:
            level = normalise_level(found["level"])
            if level is None:
                attributes["level"] = as_text(found["level"])  # unknown spelling: keep it, don't guess
            entry["level"] = level
        if "timestamp" in found:
            ts = parse_timestamp(found["timestamp"])
            if ts is None:
                attributes["timestamp"] = as_text(found["timestamp"])
            else:
                entry["timestamp"] = ts


class JsonParser(FieldParser):
    name = "json"

    def fields(self, text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"not JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {type(value).__name__}")
        return value


_LOGFMT = re.compile(r'\s*([^\s=]+)(?:=("(?:[^"\\]|\\.)*"|[^\s"]*))?')


class LogfmtParser(FieldParser):
    name = "logfmt"

    def fields(self, text: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        pos, end = 0, len(text.rstrip())
        while pos < end:
            m = _LOGFMT.match(text, pos)
            if m is None or m.end() == pos:
                raise ValueError(f"unexpected character at offset {pos}")
            key, value = m.group(1), m.group(2)
            if value is None:
                if "=" in key or '"' in key:
                    raise ValueError(f"malformed pair at offset {pos}")
                value = "true"  # a bare key is a flag, as in logfmt's reference implementation
            elif value.startswith('"'):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    value = value[1:-1]
            out[key] = value
            pos = m.end()
        if not out:
            raise ValueError("no key=value pairs")
        return out


class RegexParser(FieldParser):
    name = "regex"

    def __init__(self, settings: ParserSettings) -> None:
        super().__init__(settings)
        assert settings.pattern is not None  # the config validated it
        self.pattern = re.compile(settings.pattern)
        self._roles = {r: r for r in ("message", "level", "service", "timestamp", "host")}

    def fields(self, text: str) -> dict[str, Any]:
        m = self.pattern.search(text)
        if m is None:
            raise ValueError("the pattern did not match")
        return {k: v for k, v in m.groupdict().items() if v is not None}


# ---- syslog ---------------------------------------------------------------------------------
_PRI = re.compile(r"<(\d{1,3})>")
_RFC5424 = re.compile(r"1 (\S+) (\S+) (\S+) (\S+) (\S+) ")
_RFC3164_TS = re.compile(r"([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d)(?:\.\d+)? ")
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                                       "Dec"), 1)}  # fmt: skip
_TAG = re.compile(r"([^\s:\[]{1,128})(?:\[([^\]\s]{1,64})\])?: ?")
_SD_ELEMENT = re.compile(r'\[([^\s\]=]+)((?: [^\s\]=]+="(?:[^"\\]|\\.)*")*)\]')
_SD_PARAM = re.compile(r' ([^\s\]=]+)="((?:[^"\\]|\\.)*)"')


def _nil(value: str) -> str | None:
    return None if value == "-" else value


class SyslogParser:
    """RFC 5424 and RFC 3164 (BSD), with or without the <PRI> header, as local sockets and networks send them."""

    name = "syslog"

    def __init__(self, settings: ParserSettings | None = None) -> None:
        pass

    def __call__(self, frame: bytes, received_at: int) -> LogEntry:
        text, raw = decode(frame)
        entry = new_entry(text, raw, received_at)
        attributes = entry["attributes"]
        pos = 0
        m = _PRI.match(text)
        if m is not None:
            pri = int(m.group(1))
            if pri > 191:
                entry["parse_error"] = f"syslog: PRI {pri} out of range 0..191"
                return entry
            entry["level"] = SEVERITIES[pri & 7]
            attributes["facility"] = FACILITIES[pri >> 3]
            pos = m.end()
        is_5424 = text.startswith("1 ", pos)
        ok = self._rfc5424(text, pos, entry) if is_5424 else self._rfc3164(text, pos, entry)
        if not ok:
            entry["message"] = text
            entry["parse_error"] = "syslog: neither RFC 5424 nor RFC 3164"
        return entry

    @staticmethod
    def _rfc5424(text: str, pos: int, entry: LogEntry) -> bool:
        m = _RFC5424.match(text, pos)
        if m is None:
            return False
        ts, host, app, procid, msgid = (_nil(g) for g in m.groups())
        attributes = entry["attributes"]
        if ts is not None:
            micros = parse_timestamp(ts)
            if micros is None:
                attributes["timestamp"] = ts
            else:
                entry["timestamp"] = micros
        entry["host"] = host
        entry["service"] = app
        if procid is not None:
            attributes["pid"] = procid
        if msgid is not None:
            attributes["msgid"] = msgid
        pos = m.end()
        if text.startswith("-", pos):
            pos += 1
        else:
            if not text.startswith("[", pos):
                return False
            while (sd := _SD_ELEMENT.match(text, pos)) is not None:
                for p in _SD_PARAM.finditer(sd.group(2)):
                    value = re.sub(r'\\(["\\\]])', r"\1", p.group(2))
                    attributes[f"{sd.group(1)}.{p.group(1)}"] = value
                pos = sd.end()
            if text.startswith("[", pos):
                return False
        message = text[pos + 1 :] if text.startswith(" ", pos) else text[pos:]
        entry["message"] = message.removeprefix("\ufeff")
        return True

    @staticmethod
    def _rfc3164(text: str, pos: int, entry: LogEntry) -> bool:
        m = _RFC3164_TS.match(text, pos)
        if m is not None:
            month = _MONTHS.get(m.group(1))
            if month is None:
                return False
            # BSD syslog has no year: take the receive year, or last year for a December entry in January.
            received = EPOCH + timedelta(microseconds=entry["received_at"])
            year = received.year - (1 if month == 12 and received.month == 1 else 0)
            try:
                dt = datetime(year, month, int(m.group(2)), *map(int, m.groups()[2:]), tzinfo=UTC)
            except ValueError:
                return False
            micros = datetime_micros(dt)
            if micros is not None:
                entry["timestamp"] = micros
            pos = m.end()
            # HOSTNAME is present when the first word is not already the tag (`logger -u` omits it).
            first, _, _ = text[pos:].partition(" ")
            if first and not first.endswith(":") and "[" not in first and " " in text[pos:]:
                entry["host"] = first
                pos += len(first) + 1
        elif pos == 0:
            return False  # no PRI and no timestamp: this is not syslog
        tag = _TAG.match(text, pos)
        if tag is not None:
            entry["service"] = tag.group(1)
            if tag.group(2):
                entry["attributes"]["pid"] = tag.group(2)
            pos = tag.end()
        entry["message"] = text[pos:]
        return True


PARSERS: dict[str, Callable[[ParserSettings], ParseFn]] = {
    "raw": lambda _settings: parse_raw,
    "json": JsonParser,
    "logfmt": LogfmtParser,
    "regex": RegexParser,
    "syslog": SyslogParser,
}


def make_parser(settings: ParserSettings) -> ParseFn:
    return PARSERS[settings.kind](settings)


def safe(parser: ParseFn, name: str) -> ParseFn:
    """Wrap a parser so that even a bug in it yields a raw entry with parse_error, never an exception."""

    def parse(frame: bytes, received_at: int) -> LogEntry:
        try:
            return parser(frame, received_at)
        except Exception as e:  # the contract: bad input never stops the pipeline
            entry = parse_raw(frame, received_at)
            entry["parse_error"] = f"{name}: {type(e).__name__}: {e}"[:500]
            return entry

    return parse
