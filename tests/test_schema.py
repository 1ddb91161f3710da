"""LogEntry codec: round trips, the fingerprint header, and Avro schema evolution both ways."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from logferry.errors import SchemaError
from logferry.schemas import FINGERPRINT_HEADER, Codec, default_codec, header, schema_json


def entry(**over):
    base = {
        "timestamp": 1_700_000_000_000_000,
        "received_at": 1_700_000_000_000_123,
        "host": "h1",
        "source": "app-socket",
        "service": "billing",
        "level": "error",
        "message": "payment failed",
        "attributes": {"order": "42"},
    }
    base.update(over)
    return base


def as_micros(dt) -> int:
    return (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def test_round_trip_keeps_every_field():
    codec = default_codec()
    e = entry()
    got = codec.decode(codec.encode(e), codec.headers)
    assert as_micros(got["timestamp"]) == e["timestamp"]
    assert {k: got[k] for k in ("host", "source", "service", "level", "message", "attributes")} == {
        k: e[k] for k in ("host", "source", "service", "level", "message", "attributes")
    }
    assert got["parse_error"] is None and got["raw"] is None


def test_headers_name_the_writer_schema():
    codec = default_codec()
    assert header(codec.headers, FINGERPRINT_HEADER) == codec.fingerprint
    assert len(codec.fingerprint) == 16


def with_optional_field():
    s = copy.deepcopy(schema_json())
    s["fields"].append({"name": "trace_id", "type": ["null", "string"], "default": None})
    return s


def test_new_reader_reads_old_data():
    old = Codec(schema_json())
    new = Codec(with_optional_field(), known=[schema_json()])
    got = new.decode(old.encode(entry()), old.headers)
    assert got["trace_id"] is None
    assert got["message"] == "payment failed"


def test_old_reader_reads_new_data():
    new = Codec(with_optional_field())
    old = Codec(schema_json(), known=[with_optional_field()])
    got = old.decode(new.encode(entry(trace_id="abc")), new.headers)
    assert "trace_id" not in got
    assert got["service"] == "billing"


def test_unknown_fingerprint_is_a_schema_error():
    codec = default_codec()
    with pytest.raises(SchemaError, match="unknown writer schema"):
        codec.decode(codec.encode(entry()), [(FINGERPRINT_HEADER, b"0000000000000000")])


def test_garbage_is_a_schema_error_not_a_crash():
    with pytest.raises(SchemaError):
        default_codec().decode(b"\xff\xff\xff\xff\xff\xff\xff", None)


def test_entry_missing_a_required_field_is_a_schema_error():
    e = entry()
    del e["host"]
    with pytest.raises(SchemaError, match="does not fit"):
        default_codec().encode(e)


text = st.text(max_size=200)


@given(
    message=text,
    host=text,
    service=st.none() | text,
    level=st.none() | st.sampled_from(["info", "error", "debug"]),
    attributes=st.dictionaries(text, text, max_size=5),
    ts=st.integers(min_value=0, max_value=253_402_300_799_999_999),  # datetime.max: what readers can represent
    raw=st.none() | st.binary(max_size=100),
)
def test_round_trip_property(message, host, service, level, attributes, ts, raw):
    codec = default_codec()
    e = entry(message=message, host=host, service=service, level=level, attributes=attributes, raw=raw)
    e["timestamp"] = e["received_at"] = ts
    got = codec.decode(codec.encode(e), codec.headers)
    assert (got["message"], got["host"], got["service"], got["level"]) == (message, host, service, level)
    assert got["attributes"] == attributes and got["raw"] == raw
    assert as_micros(got["timestamp"]) == ts
