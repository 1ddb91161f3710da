"""Avro codec for LogEntry on fastavro: schemaless bodies, the writer schema named in headers.

A Kafka record's value is the bare Avro body; its headers carry
`content-type: application/vnd.logferry.log-entry+avro` and `schema-fingerprint` (the
CRC-64-AVRO fingerprint, hex) so a reader never guesses which schema wrote it. A reader
resolves any known writer schema (current or older) to its own reader schema.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from logferry.errors import SchemaError

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
        self._writers: dict[str, Any] = {self.fingerprint: self.schema}
        for s in known:
            parsed = parse_schema(s)
            self._writers[schema_fingerprint(parsed)] = parsed

    def encode(self, entry: LogEntry) -> bytes:
        buf = io.BytesIO()
        try:
            schemaless_writer(buf, self.schema, entry)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SchemaError(f"entry does not fit the LogEntry schema: {e}") from None
        return buf.getvalue()

    def decode(self, value: bytes, headers: Headers = None) -> LogEntry:
        writer = self.schema
        fp = header(headers, FINGERPRINT_HEADER)
        if fp is not None:
            writer = self._writers.get(fp)
            if writer is None:
                raise SchemaError(f"unknown writer schema fingerprint {fp}")
        try:
            return schemaless_reader(io.BytesIO(value), writer, self.schema)  # type: ignore[return-value]
        except Exception as e:  # fastavro raises many types on corrupt input
            raise SchemaError(f"value is not a LogEntry in Avro ({type(e).__name__}: {e})") from None


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
