"""The specialised LogEntry decoder returns exactly what fastavro returns, and fails where it fails."""

from __future__ import annotations

import io

import pytest
from fastavro import schemaless_reader
from hypothesis import example, given, settings
from hypothesis import strategies as st

from logferry.errors import SchemaError
from logferry.schemas import default_codec
from logferry.schemas.decode import EntryDecoder

CODEC = default_codec()


def fastavro_decode(value: bytes) -> dict:
    return schemaless_reader(io.BytesIO(value), CODEC.schema, CODEC.schema)  # type: ignore[return-value]


def outcome(decode, value: bytes) -> tuple[str, object]:
    """('ok', the entry with its values' types, datetimes' tzinfo and the map's order spelled out)
    or ('error', the exception's type and text)."""
    try:
        got = decode(value)
    except Exception as e:
        return "error", (type(e).__name__, str(e))
    spelled = {k: (v, type(v), getattr(v, "tzinfo", None)) for k, v in got.items()}
    return "ok", (spelled, list(got["attributes"].items()))


def no_fallback(value: bytes) -> dict:
    raise AssertionError(f"a well-formed body went to fastavro: {value!r}")


micros = st.integers(-62_135_596_800_000_000, 253_402_300_799_999_999)  # datetime.min .. datetime.max
entries = st.fixed_dictionaries({
    "timestamp": micros | st.integers(-(1 << 20), 1 << 20),  # 8- and 9-byte varints; short ones
    "received_at": micros,
    "host": st.text(max_size=80),
    "source": st.text(max_size=20),
    "service": st.none() | st.text(max_size=20),
    "level": st.none() | st.sampled_from(["info", "error"]),
    "message": st.text(max_size=300) | st.text(min_size=64, max_size=9000),
    "attributes": st.dictionaries(st.text(max_size=70), st.text(max_size=70), max_size=6),
    "parse_error": st.none() | st.text(max_size=20),
    "raw": st.none() | st.binary(max_size=200),
})  # fmt: skip


def test_the_default_codec_uses_it():
    assert isinstance(CODEC._decoders[CODEC.fingerprint], EntryDecoder)


@settings(max_examples=500, deadline=None)
@given(entry=entries)
def test_decodes_what_fastavro_decodes(entry):
    value = CODEC.encode(entry)
    want = outcome(fastavro_decode, value)
    assert want[0] == "ok"
    decoder = EntryDecoder(no_fallback)  # decoded by itself, not by handing it to fastavro
    assert outcome(decoder, value) == want
    assert outcome(decoder, value) == want  # again: the datetimes now come from its cache


flips = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3)  # (position, new byte)


@settings(max_examples=1000, deadline=None)
@given(entry=entries, cut=st.integers(0, 400), flips=flips)
def test_damaged_bodies_fare_as_with_fastavro(entry, cut, flips):
    value = bytearray(CODEC.encode(entry))
    for at, byte in flips:
        if at < len(value):
            value[at] = byte
    damaged = bytes(value[: len(value) - cut % (len(value) + 1)])
    decoder = EntryDecoder(fastavro_decode)
    assert outcome(decoder, damaged) == outcome(fastavro_decode, damaged)


@given(st.binary(max_size=300))
@example(b"\x02\x02" + b"\x00" * 8)  # short varints, empty strings, then an empty map and two nulls
def test_arbitrary_bytes_fare_as_with_fastavro(value):
    assert outcome(EntryDecoder(fastavro_decode), value) == outcome(fastavro_decode, value)


def test_a_map_in_blocks_with_byte_sizes_is_read_like_fastavro():
    """Avro lets a writer split a map into blocks, each count negated and followed by its size in bytes."""
    head = CODEC.encode({**BASE, "attributes": {}})
    cut = len(head) - 3  # the empty map's 0, then parse_error's and raw's nulls
    blocks = b"\x01\x08\x02a\x02b" + b"\x01\x08\x02c\x02d" + b"\x00"  # each: -1 pair, 4 bytes, the pair
    body = head[:cut] + blocks + head[cut + 1 :]
    want = outcome(fastavro_decode, body)
    assert fastavro_decode(body)["attributes"] == {"a": "b", "c": "d"}
    assert outcome(EntryDecoder(no_fallback), body) == want


@pytest.mark.parametrize(
    ("field", "old", "new", "fastavro_says"),
    [
        ("host", b"\x02h", b"\x01h", "error"),  # a negative length
        ("message", b"\x02m", b"\x03m", "error"),
        ("message", b"\x02m", b"\xc7\x01m", "error"),  # -100, two bytes
        ("service", b"\x02\x02v", b"\x04\x02v", "error"),  # a union branch the schema does not have
        ("raw", b"\x00\x02\x02r", b"\x00\x04\x02r", "error"),
        ("level", b"\x02\x02v", b"\x82\x00\x02v", "ok"),  # branch 1 as a two-byte varint
    ],
)
def test_unusual_encodings_fare_as_with_fastavro(field, old, new, fastavro_says):
    optional = {"service": "v", "level": "v", "raw": b"r"}
    value = CODEC.encode({**BASE, **{k: v if k == field else None for k, v in optional.items()}})
    assert value.count(old) == 1, (value, old)
    damaged = value.replace(old, new)
    assert outcome(fastavro_decode, damaged)[0] == fastavro_says
    decoder = EntryDecoder(fastavro_decode)  # each of these goes to fastavro, the non-canonical branch too
    assert outcome(decoder, damaged) == outcome(fastavro_decode, damaged)
    if fastavro_says == "error":
        with pytest.raises(SchemaError):
            CODEC.decode(damaged, CODEC.headers)


@pytest.mark.parametrize("value", [None, b""])
def test_no_value_is_a_schema_error(value):
    """A tombstone's value is None: the processor sends it to the dead-letter topic as undecodable."""
    with pytest.raises(SchemaError, match="EOFError"):
        CODEC.decode(value, None)


def test_invalid_utf8_is_the_same_schema_error():
    body = CODEC.encode({**BASE, "message": "ok"}).replace(b"\x04ok", b"\x04\xff\xfe")
    with pytest.raises(SchemaError, match="UnicodeDecodeError"):
        CODEC.decode(body, CODEC.headers)


BASE = {"timestamp": 1_700_000_000_000_000, "received_at": 1_700_000_000_000_000, "host": "h", "source": "s",
        "service": None, "level": None, "message": "m", "attributes": {}, "parse_error": None, "raw": None}  # fmt: skip
