"""Fuzz targets for framing, parsers and the Avro codec (issue 9), shared by atheris and hypothesis.

`check(data)` raises only on a bug: a framer whose frames exceed the limit, whose buffer grows
past it, or whose output depends on how the stream was cut into reads; a parser that raises or
builds an entry the schema refuses; a codec decode that fails with anything but SchemaError.

    python tests/fuzz_targets.py -max_total_time=60 -artifact_prefix=/tmp/   # atheris (libFuzzer flags)

A crashing input goes into tests/fuzz_regressions/ (test_fuzz.py replays every file there).
"""

from __future__ import annotations

import contextlib
import sys

if __name__ == "__main__":  # the atheris run: coverage-instrument logferry's modules (only) as they load
    import atheris

    instrumented = atheris.instrument_imports(include=["logferry"])
else:
    instrumented = contextlib.nullcontext()
with instrumented:
    from logferry.collectors.config import ParserSettings
    from logferry.collectors.framing import LineFramer, OctetFramer
    from logferry.collectors.parsers import make_parser
    from logferry.errors import SchemaError
    from logferry.schemas import default_codec

MAX_FRAME = 64  # small, so fuzzed inputs reach the truncation paths
RECEIVED_AT = 1_700_000_000_000_000
REGEX = r"(?P<level>\w+) (?P<service>\w+): (?P<message>.*)"
PARSERS = {
    kind: make_parser(ParserSettings(kind=kind, pattern=REGEX if kind == "regex" else None))
    for kind in ("raw", "json", "logfmt", "syslog", "regex")
}
CODEC = default_codec()


def frames_of(framer: LineFramer | OctetFramer, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out += framer.feed(chunk)
        pending = len(framer._buf)
        assert pending <= MAX_FRAME + 16, f"{type(framer).__name__} holds {pending} bytes"
    return out + framer.flush()


def check(data: bytes) -> None:
    if not data:
        return
    step, body = data[0] % 23 + 1, data[1:]
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    for make in (LineFramer, OctetFramer):
        whole = frames_of(make(MAX_FRAME), [body])
        assert all(0 < len(f) <= MAX_FRAME for f in whole), whole
        assert frames_of(make(MAX_FRAME), chunks) == whole, f"{make.__name__}: output depends on read sizes"
    for parse in PARSERS.values():
        entry = parse(body, RECEIVED_AT)  # never raises
        entry["host"] = "fuzz-host"  # enrichment's part (pipeline.py); the rest must fit the schema as parsed
        CODEC.encode(entry)
    for headers in (None, CODEC.headers):
        with contextlib.suppress(SchemaError):
            CODEC.decode(body, headers)


if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
