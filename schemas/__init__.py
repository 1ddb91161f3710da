"""The LogEntry Avro schema (log_entry.avsc, the contract other teams read) and its codec."""

from logferry.schemas.codec import (
    CONTENT_TYPE,
    FINGERPRINT_HEADER,
    Codec,
    LogEntry,
    default_codec,
    header,
    schema_json,
)

__all__ = [
    "CONTENT_TYPE",
    "FINGERPRINT_HEADER",
    "Codec",
    "LogEntry",
    "default_codec",
    "header",
    "schema_json",
]
