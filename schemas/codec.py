"""Avro codec for LogEntry on fastavro: schemaless bodies, the writer schema named in headers.

A Kafka record's value is the bare Avro body; its headers carry
`content-type: application/vnd.logferry.log-entry+avro` and `schema-fingerprint` (the
CRC-64-AVRO fingerprint, hex) so a reader never guesses which schema wrote it. A reader
resolves any known writer schema (current or older) to its own reader schema.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from logferry.errors import SchemaError
from logferry.schemas.decode import WRITTEN_FOR, EntryDecoder

CONTENT_TYPE = "application/vnd.logferry.log-entry+avro"
CONTENT_TYPE_HEADER = "content-type"
FINGERPRINT_HEADER = "schema-fingerprint"

LogEntry = dict[str, Any]
Headers = Sequence[tuple[str, bytes | str | None]] | None


def schema_json(name: str = "log_entry") -> dict[str, Any]:
    text = resources.files("logferry.schemas").joinpath(f"{name}.avsc").read_text()
    return json.loads(text)


class Codec:
    """Encode with one schema; decode any schema it has been told about."""

    def __init__(self, schema: dict[str, Any], known: Sequence[dict[str, Any]] = ()) -> None:
        self.schema = parse_schema(schema)
        self.fingerprint = schema_fingerprint(self.schema)
        self.headers: list[tuple[str, bytes]] = [
            (CONTENT_TYPE_HEADER, CONTENT_TYPE.encode()),
            (FINGERPRINT_HEADER, self.fingerprint.encode()),
        ]
        own = self._decode_with(self.schema)
        # The specialised decoder reads one schema: the shipped one (logical types included), as it
        # was when the decoder was written. For its fingerprint, the codec's own schema wins over an
        # equal one in `known`.
        if self.fingerprint == WRITTEN_FOR and schema == schema_json():
            own = EntryDecoder(own)
        self._decode_own = own
        self._decoders: dict[str, Callable[[bytes], LogEntry]] = {self.fingerprint: own}
        for s in known:
            parsed = parse_schema(s)
            self._decoders.setdefault(schema_fingerprint(parsed), self._decode_with(parsed))

    def encode(self, entry: LogEntry) -> bytes:
        buf = io.BytesIO()
        try:
            schemaless_writer(buf, self.schema, entry)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SchemaError(f"entry does not fit the LogEntry schema: {e}") from None
        return buf.getvalue()

    def decode(self, value: bytes, headers: Headers = None) -> LogEntry:
        if headers == self.headers:  # what this codec writes, nearly every record: no header search
            return self._decode_own(value)
        fp = header(headers, FINGERPRINT_HEADER)
        decode = self._decoders.get(self.fingerprint if fp is None else fp)
        if decode is None:
            raise SchemaError(f"unknown writer schema fingerprint {fp}")
        return decode(value)

    def _decode_with(self, writer: Any) -> Callable[[bytes], LogEntry]:
        def decode(value: bytes) -> LogEntry:
            try:
                return schemaless_reader(io.BytesIO(value), writer, self.schema)  # type: ignore[return-value]
            except Exception as e:  # fastavro raises many types on corrupt input
                raise SchemaError(f"value is not a LogEntry in Avro ({type(e).__name__}: {e})") from None

        return decode


def schema_fingerprint(parsed: Any) -> str:
    """CRC-64-AVRO (Rabin) of the Parsing Canonical Form, as in Avro's single-object encoding."""
    return fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")


def header(headers: Headers, name: str) -> str | None:
    for k, v in headers or ():
        if k == name and v is not None:
            return v.decode() if isinstance(v, bytes) else v
    return None


@cache
def default_codec() -> Codec:
    return Codec(schema_json())
