"""Parsers turn any bytes into a LogEntry that fits the schema; the fast encoder writes the codec's bytes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from logferry.collectors.config import ParserSettings
from logferry.collectors.encode import EntryEncoder
from logferry.collectors.parsers import (
    MAX_MICROS,
    MIN_MICROS,
    as_text,
    make_parser,
    normalise_level,
    parse_timestamp,
    safe,
)
from logferry.schemas import default_codec

RECEIVED = 1_795_000_000_000_000  # 2026-11-19, micros
KINDS = ["raw", "json", "syslog", "logfmt"]


def parser(kind: str, **kw):
    return safe(make_parser(ParserSettings(kind=kind, **kw)), kind)


def micros(*args) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1_000_000)


def roundtrip(entry: dict) -> dict:
    """What a reader gets back: the entry must fit the schema (host/source filled as the pipeline does)."""
    entry = {**entry, "host": entry["host"] or "h", "source": "s"}
    return default_codec().decode(default_codec().encode(entry))


# ---- properties: never raise, always schema-valid, bytes survive --------------------------------
@settings(max_examples=300, deadline=None)
@given(frame=st.binary(max_size=300), kind=st.sampled_from(KINDS))
def test_any_bytes_give_a_schema_valid_entry(frame, kind):
    entry = parser(kind)(frame, RECEIVED)
    roundtrip(entry)
    assert MIN_MICROS <= entry["timestamp"] <= MAX_MICROS
    try:
        frame.decode()
    except UnicodeDecodeError:
        assert entry["raw"] == frame
    else:
        assert entry["raw"] is None


@settings(max_examples=200, deadline=None)
@given(
    fields=st.dictionaries(
        st.text(min_size=1, max_size=10).filter(lambda k: k not in ("message", "msg", "log")),
        st.one_of(st.text(max_size=20), st.integers(), st.booleans(), st.none()),
        max_size=6,
    ),
    message=st.text(max_size=50),
)
def test_json_objects_keep_every_field(fields, message):
    p = parser("json")
    entry = p(json.dumps({**fields, "message": message}).encode(), RECEIVED)
    assert entry["parse_error"] is None
    assert entry["message"] == message
    for k, v in fields.items():
        in_fields = k in ("service", "app", "service_name", "level", "severity", "lvl", "loglevel", "timestamp",
                          "time", "ts", "@timestamp", "host", "hostname")  # fmt: skip
        if not in_fields:
            assert entry["attributes"][k] == as_text(v), k
    roundtrip(entry)


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.dictionaries(
        st.from_regex(r"[a-z_][a-z0-9_.]{0,8}", fullmatch=True).filter(lambda k: k not in ("msg", "message", "log")),
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=15),
        min_size=1,
        max_size=6,
    )
)
def test_logfmt_round_trips_quoted_values(pairs):
    line = " ".join(f"{k}={json.dumps(v)}" for k, v in pairs.items())
    entry = parser("logfmt")(line.encode(), RECEIVED)
    assert entry["parse_error"] is None, entry
    for k, v in pairs.items():
        if k in entry["attributes"]:
            assert entry["attributes"][k] == v


@settings(max_examples=300, deadline=None)
@given(
    entry=st.fixed_dictionaries(
        {
            "timestamp": st.integers(MIN_MICROS, MAX_MICROS),
            "received_at": st.integers(MIN_MICROS, MAX_MICROS),
            "host": st.text(max_size=20),
            "source": st.text(max_size=20),
            "service": st.none() | st.text(max_size=20),
            "level": st.none() | st.sampled_from(["info", "error"]),
            "message": st.text(max_size=20000),
            "attributes": st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=5),
            "parse_error": st.none() | st.text(max_size=20),
            "raw": st.none() | st.binary(max_size=50),
        }
    )
)
@example(entry={"timestamp": -5, "received_at": -1, "host": "", "source": "", "service": None, "level": None,
                "message": "", "attributes": {}, "parse_error": None, "raw": None})  # fmt: skip
def test_fast_encoder_writes_the_codec_bytes(entry):
    assert EntryEncoder()(entry) == default_codec().encode(entry)


# ---- examples: what users send ------------------------------------------------------------------
def test_raw_keeps_invalid_utf8_in_raw():
    entry = parser("raw")(b"caf\xe9 \xff", RECEIVED)
    assert entry["raw"] == b"caf\xe9 \xff" and entry["message"] == "caf\ufffd \ufffd"
    assert entry["parse_error"] is None and entry["timestamp"] == RECEIVED == entry["received_at"]


def test_json_standard_fields():
    line = b'{"ts": "2026-11-20T10:00:00.123456789Z", "level": "WARN", "msg": "disk", "service": "db", "n": 3}'
    e = parser("json")(line, RECEIVED)
    assert (e["level"], e["message"], e["service"]) == ("warning", "disk", "db")
    assert e["timestamp"] == micros(2026, 11, 20, 10, 0, 0, 123456)
    assert e["attributes"] == {"n": "3"}


@pytest.mark.parametrize(
    "line, error",
    [(b"not json", "json: not JSON"), (b"[1,2]", "json: expected a JSON object"), (b'{"a":', "json: not JSON")],
)
def test_json_failures_are_raw_with_parse_error(line, error):
    e = parser("json")(line, RECEIVED)
    assert e["parse_error"].startswith(error) and e["message"] == line.decode()


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2026-11-20T10:00:00Z", micros(2026, 11, 20, 10)),
        (1_795_000_000, 1_795_000_000_000_000),  # seconds
        (1_795_000_000_123, 1_795_000_000_123_000),  # ms
        (1_795_000_000_123_456, 1_795_000_000_123_456),  # µs
        ("99999-01-01T00:00:00Z", None),  # beyond year 9999: unusable
        (1e300, None),
        (float("nan"), None),
        (-1e20, None),
        ("yesterday", None),
    ],
)
def test_timestamps_are_parsed_or_refused(value, expected):
    assert parse_timestamp(value) == expected


def test_out_of_range_timestamp_falls_back_to_receive_time():
    e = parser("json")(b'{"time": "0000-01-01T00:00:00", "msg": "x"}', RECEIVED)
    assert e["timestamp"] == RECEIVED and e["attributes"]["timestamp"] == "0000-01-01T00:00:00"
    e = parser("json")(b'{"ts": 1e30, "msg": "x"}', RECEIVED)
    assert e["timestamp"] == RECEIVED
    roundtrip(e)


def test_levels_normalise():
    assert [normalise_level(v) for v in ("WARN", "err", "Fatal", 3, "7", "information", "weird", None)] == [
        "warning", "error", "critical", "error", "debug", "info", None, None,
    ]  # fmt: skip


def test_syslog_5424_with_structured_data():
    line = b'<165>1 2026-11-20T10:00:00.5+01:00 web01 nginx 4242 ID47 [ex@1 a="1" b="q\\"x"][y@2 c="3"] \xef\xbb\xbfhi'
    e = parser("syslog")(line, RECEIVED)
    assert e["parse_error"] is None
    assert (e["host"], e["service"], e["level"], e["message"]) == ("web01", "nginx", "notice", "hi")
    assert e["timestamp"] == micros(2026, 11, 20, 9, 0, 0, 500000)
    assert e["attributes"] == {"facility": "local4", "pid": "4242", "msgid": "ID47", "ex@1.a": "1",
                               "ex@1.b": 'q"x', "y@2.c": "3"}  # fmt: skip


def test_syslog_5424_nil_fields():
    e = parser("syslog")(b"<14>1 - - - - - - just text", RECEIVED)
    assert e["parse_error"] is None and e["message"] == "just text" and e["timestamp"] == RECEIVED
    assert e["host"] is None and e["service"] is None


@pytest.mark.parametrize(
    "line, host, service, pid, message",
    [
        (b"<13>Nov 21 05:58:42 root: hello world", None, "root", None, "hello world"),  # logger -u
        (b"<13>Nov 21 05:58:42 vm app3: x y", "vm", "app3", None, "x y"),  # logger --rfc3164
        (b"<30>Nov  1 01:02:03 host sshd[123]: Accepted", "host", "sshd", "123", "Accepted"),
        (b"Nov 21 05:58:42 vm cron[9]: job", "vm", "cron", "9", "job"),  # no PRI
        (b"<13>no timestamp here", None, None, None, "no timestamp here"),
    ],
)
def test_syslog_3164_variants(line, host, service, pid, message):
    e = parser("syslog")(line, RECEIVED)
    assert e["parse_error"] is None
    assert (e["host"], e["service"], e["attributes"].get("pid"), e["message"]) == (host, service, pid, message)


def test_syslog_3164_year_comes_from_receive_time():
    e = parser("syslog")(b"<13>Nov 21 05:58:42 h t: m", RECEIVED)
    assert e["timestamp"] == micros(2026, 11, 21, 5, 58, 42)
    e = parser("syslog")(b"<13>Feb 30 05:58:42 h t: m", RECEIVED)  # no such day
    assert e["parse_error"] is not None and e["timestamp"] == RECEIVED


@pytest.mark.parametrize("line", [b"plain text line", b"<999>1 x", b""])
def test_syslog_failures(line):
    e = parser("syslog")(line, RECEIVED)
    assert e["parse_error"].startswith("syslog:") and e["message"] == line.decode()


def test_logfmt_fields_and_errors():
    e = parser("logfmt")(b'level=error msg="db down" service=api retry=3 dry', RECEIVED)
    assert (e["level"], e["message"], e["service"]) == ("error", "db down", "api")
    assert e["attributes"] == {"retry": "3", "dry": "true"}
    assert parser("logfmt")(b'a="unterminated', RECEIVED)["parse_error"].startswith("logfmt:")


def test_regex_named_groups():
    p = parser("regex", pattern=r"^(?P<level>\w+) \[(?P<service>[^\]]+)\] (?P<message>.*) took=(?P<took>\d+)ms$")
    e = p(b"ERROR [billing] charge failed took=12ms", RECEIVED)
    assert (e["level"], e["service"], e["message"], e["attributes"]) == ("error", "billing", "charge failed",
                                                                         {"took": "12"})  # fmt: skip
    miss = p(b"something else", RECEIVED)
    assert miss["parse_error"] == "regex: the pattern did not match" and miss["message"] == "something else"


def test_a_parser_bug_still_gives_a_raw_entry():
    def broken(frame: bytes, received_at: int) -> dict:
        raise RuntimeError("boom")

    e = safe(broken, "custom")(b"line", RECEIVED)
    assert e["parse_error"] == "custom: RuntimeError: boom" and e["message"] == "line"
