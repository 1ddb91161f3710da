"""Pipeline: enrich, filter (counted), route by template and priority, key, multiline, oversize."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from logferry.collectors.buffer import KEY, TOKEN, TOPIC, VALUE
from logferry.collectors.config import AgentConfig
from logferry.collectors.pipeline import Pipeline
from logferry.collectors.sources.base import Frames, Joined
from logferry.config import validate
from logferry.errors import ConfigError
from logferry.schemas import default_codec


def pipeline(**sections) -> Pipeline:
    return Pipeline(validate(AgentConfig, {"agent": {"host": "h1"}, **sections}))


def js(**fields) -> bytes:
    return json.dumps(fields).encode()


def decode(record) -> dict:
    return default_codec().decode(record[VALUE])


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_enrich_route_and_key():
    p = pipeline(
        parser={"kind": "json"},
        agent={"host": "h1", "attributes": {"dc": "eu1"}},
        route={"topic": "logs.{service}", "priority_topic": "urgent.{service}", "priority_level": "error"},
        key={"field": "tenant"},
    )
    frames = [js(service="api", level="info", msg="a", tenant="t1"), js(service="a/b c", level="error", msg="b"),
              js(level="critical", msg="c")]  # fmt: skip
    records = p.process(Frames(frames, "src1", attributes={"mtype": "4"}, ack_tokens=[10, 11, 12]))
    assert [r[TOPIC] for r in records] == ["logs.api", "urgent.a_b_c", "urgent.unknown"]
    assert [r[KEY] for r in records] == [b"t1", None, None]
    assert [r[TOKEN] for r in records] == [10, 11, 12]
    first = decode(records[0])
    assert (first["host"], first["source"], first["service"]) == ("h1", "src1", "api")
    assert first["attributes"] == {"dc": "eu1", "mtype": "4", "tenant": "t1"}


def test_filters_drop_and_count():
    p = pipeline(
        parser={"kind": "json"},
        filter={"min_level": "info", "drop_regex": "healthcheck", "drop_fields": {"service": "^noisy$"}},
    )
    before = metric("logferry_entries_dropped_total", reason="filtered")
    frames = [js(level="debug", msg="x"), js(level="info", msg="GET /healthcheck"), js(service="noisy", msg="y"),
              js(level="error", msg="kept"), js(msg="no level: kept")]  # fmt: skip
    records = p.process(Frames(frames, "f"))
    assert [decode(r)["message"] for r in records] == ["kept", "no level: kept"]
    assert metric("logferry_entries_dropped_total", reason="filtered") - before == 3


def test_keep_filters():
    p = pipeline(parser={"kind": "logfmt"}, filter={"keep_regex": "^pay", "keep_fields": {"env": "prod"}})
    frames = [b"msg=payment env=prod", b"msg=payment env=dev", b"msg=other env=prod", b"msg=payout"]
    assert [decode(r)["message"] for r in p.process(Frames(frames, "k"))] == ["payment"]


def test_parse_failures_are_counted_per_source_and_parser():
    p = pipeline(parser={"kind": "json"})
    before = metric("logferry_parse_failures_total", source="pf", parser="json")
    records = p.process(Frames([b"{bad", js(msg="ok"), b"\xff\xfe"], "pf"))
    assert len(records) == 3
    assert metric("logferry_parse_failures_total", source="pf", parser="json") - before == 2
    assert decode(records[2])["raw"] == b"\xff\xfe"


def test_multiline_joins_stack_traces_per_stream_with_timeout():
    p = pipeline(multiline={"start_pattern": r"^\d{4}-", "timeout": 0.5, "max_lines": 3})
    a = [b"2026-01-01 boom", b"Traceback:", b"  at x", b"2026-01-01 next"]
    out = p.process(Frames(a, "m", stream="c1", ack_tokens=[1, 2, 3, 4]))
    other = p.process(Frames([b"2026-01-01 other stream", b"  at y"], "m", stream="c2"))
    assert [decode(r)["message"] for r in out] == ["2026-01-01 boom\nTraceback:\n  at x"]
    assert [r[TOKEN] for r in out] == [Joined((1, 2, 3))]  # every joined line settles with the entry
    assert other == []
    # max_lines cuts a runaway trace
    more = p.process(Frames([b"  a", b"  b", b"  c"], "m", stream="c1", ack_tokens=[5, 6, 7]))
    assert [decode(r)["message"] for r in more] == ["2026-01-01 next\n  a\n  b"]
    assert p.expired() == []  # not yet quiet for 0.5 s
    flushed = p.flush()
    assert sorted(decode(r)["message"] for r in flushed) == ["  c", "2026-01-01 other stream\n  at y"]


def test_oversize_entries_are_truncated_with_a_flag_or_dropped():
    big = b"x" * 3000
    p = pipeline(sink={"max_message_bytes": 2048, "oversize": "truncate"})
    before = metric("logferry_entries_truncated_total", source="o")
    (r,) = p.process(Frames([big], "o"))
    e = decode(r)
    assert len(r[VALUE]) <= 2048 - 1024 and e["message"] == "x" * len(e["message"])
    assert int(e["attributes"]["truncated"]) > 3000
    assert metric("logferry_entries_truncated_total", source="o") - before == 1
    p = pipeline(sink={"max_message_bytes": 2048, "oversize": "drop"})
    before = metric("logferry_entries_dropped_total", reason="oversize")
    assert (
        p.process(Frames([big, b"small"], "o"))
        and metric("logferry_entries_dropped_total", reason="oversize") - before == 1
    )


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"sources": [{"kind": "tcpx", "address": "x"}]}, "sources.0.kind"),
        ({"route": {"topic": "logs.{}"}}, "route.topic"),
        ({"filter": {"drop_regex": "("}}, "filter.drop_regex"),
        ({"parser": {"kind": "regex"}}, "parser"),
        ({"buffer": {"polcy": "block"}}, "buffer.polcy"),
        ({"sources": [{"kind": "stdin"}, {"kind": "stdin"}]}, "sources"),
    ],
)
def test_config_problems_name_the_key(sections, key):
    with pytest.raises(ConfigError) as e:
        validate(AgentConfig, sections, "agent.toml")
    assert f"  {key}" in str(e.value)
    if "tcpx" in str(sections):
        assert "known kinds: " in str(e.value) and "unix" in str(e.value)


def test_filtered_and_dropped_entries_settle_their_ack_tokens():
    # A file checkpoint waits for every line's token; an entry that never reaches Kafka must still settle.
    settled: list[tuple[str, list]] = []
    cfg = AgentConfig.model_validate(
        {"filter": {"drop_regex": "noise"}, "sink": {"max_message_bytes": 2048, "oversize": "drop"}}
    )
    p = Pipeline(cfg, settle=lambda source, tokens: settled.append((source, list(tokens))))
    out = p.process(Frames([b"keep 1", b"noise 2", b"x" * 3000, b"keep 4"], "f", ack_tokens=[1, 2, 3, 4]))
    assert [r[TOKEN] for r in out] == [1, 4]
    assert settled == [("f", [2, 3])]


lines = st.lists(st.binary(max_size=300) | st.text(max_size=100).map(str.encode), min_size=1, max_size=20)


@settings(max_examples=150, deadline=None)
@given(frames=lines, attributes=st.none() | st.dictionaries(st.sampled_from("abc"), st.text(max_size=5), max_size=2),
       tokens=st.booleans(), key=st.sampled_from([None, "host", "source", "dc"]))  # fmt: skip
def test_raw_batches_encode_exactly_like_one_entry_at_a_time(frames, attributes, tokens, key):
    """The raw parser's batch fast path (no filter) must produce the very records of the per-entry path,
    which a filter that keeps everything forces; non-UTF-8 and oversize batches fall back to it."""
    sections = {"agent": {"host": "h1", "attributes": {"dc": "eu1"}}, "route": {"topic": "logs.{source}.{dc}"},
                "key": {"field": key}, "sink": {"max_message_bytes": 1300}}  # fmt: skip
    fast = Pipeline(validate(AgentConfig, sections))
    slow = Pipeline(validate(AgentConfig, {**sections, "filter": {"keep_regex": ""}}))
    assert fast.keep is None and slow.keep is not None

    def batch() -> Frames:
        ack = list(range(len(frames))) if tokens else None
        return Frames(frames, "src1", received_at=1_700_000_000_123_456, attributes=attributes, ack_tokens=ack)

    assert fast.process(batch()) == slow.process(batch())
