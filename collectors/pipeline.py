"""Frames → parse → enrich → filter → route → key → Avro: the records the buffer holds.

One `Pipeline` serves every source; sources call `process` from their own threads. The
per-source state (parser, multiline joiner, static attributes) is built once, and the
counters are bumped once per batch, not per entry.
"""

from __future__ import annotations

import logging
import re
import socket
import string
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from logferry.collectors.buffer import Record
from logferry.collectors.config import ENTRY_FIELDS, AgentConfig, FilterSettings, RouteSettings, SourceSettings
from logferry.collectors.encode import Encoder, EntryEncoder, make_encoder
from logferry.collectors.multiline import Joiner
from logferry.collectors.parsers import LEVEL_RANK, ParseFn, make_parser, new_entry, safe
from logferry.collectors.sources.base import Frames, Settle
from logferry.log import LogOnce
from logferry.metrics import ENTRIES_DROPPED, ENTRIES_TRUNCATED, PARSE_FAILURES
from logferry.schemas import LogEntry

log = logging.getLogger("logferry.pipeline")
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def field_getter(name: str) -> Callable[[LogEntry], str | None]:
    """Read an entry field (host, service, ...) or, for any other name, an attribute."""
    if name in ENTRY_FIELDS:
        return lambda e: e[name]
    return lambda e: e["attributes"].get(name)


def template_fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def topic_router(template: str, missing: str) -> Callable[[LogEntry], str]:
    """`logs.{service}` → a function of the entry; values are made topic-safe ([A-Za-z0-9._-])."""
    names = sorted(template_fields(template))
    if not names:
        return lambda _e: template
    getters = {n: field_getter(n) for n in names}
    # Rendered by hand, not str.format: a dotted attribute name ({k8s.namespace}) is one field here.
    parts = [(text, name) for text, name, _, _ in string.Formatter().parse(template)]
    cache: dict[tuple[str | None, ...], str] = {}

    def route(e: LogEntry) -> str:
        values = tuple(g(e) for g in getters.values())
        topic = cache.get(values)
        if topic is None:
            pairs = zip(getters, values, strict=True)
            safe_values = {n: _TOPIC_UNSAFE.sub("_", v or missing) or missing for n, v in pairs}
            topic = "".join(text + (safe_values[name] if name else "") for text, name in parts)[:249]
            if len(cache) < 10_000:
                cache[values] = topic
        return topic

    return route


def make_router(settings: RouteSettings) -> Callable[[LogEntry], str]:
    main = topic_router(settings.topic, settings.default_value)
    if settings.priority_topic is None:
        return main
    priority = topic_router(settings.priority_topic, settings.default_value)
    threshold = LEVEL_RANK[settings.priority_level]
    ranks = LEVEL_RANK

    def route(e: LogEntry) -> str:
        level = e["level"]
        if level is not None and ranks[level] >= threshold:
            return priority(e)
        return main(e)

    return route


def make_filter(settings: FilterSettings) -> Callable[[LogEntry], bool] | None:
    """A predicate (True = keep), or None when nothing is filtered (the fast path)."""
    checks: list[Callable[[LogEntry], bool]] = []
    if settings.min_level is not None:
        floor = LEVEL_RANK[settings.min_level]
        checks.append(lambda e: e["level"] is None or LEVEL_RANK[e["level"]] >= floor)
    if settings.drop_levels:
        dropped = frozenset(settings.drop_levels)
        checks.append(lambda e: e["level"] not in dropped)
    if settings.keep_regex is not None:
        keep = re.compile(settings.keep_regex).search
        checks.append(lambda e: keep(e["message"]) is not None)
    if settings.drop_regex is not None:
        drop = re.compile(settings.drop_regex).search
        checks.append(lambda e: drop(e["message"]) is None)
    for name, pattern in settings.keep_fields.items():
        get, rx = field_getter(name), re.compile(pattern).search
        checks.append(lambda e, get=get, rx=rx: (v := get(e)) is not None and rx(v) is not None)
    for name, pattern in settings.drop_fields.items():
        get, rx = field_getter(name), re.compile(pattern).search
        checks.append(lambda e, get=get, rx=rx: (v := get(e)) is None or rx(v) is None)
    if not checks:
        return None
    return lambda e: all(c(e) for c in checks)


@dataclass(slots=True)
class _PerSource:
    parse: ParseFn
    parser_name: str
    joiner: Joiner | None
    attributes: dict[str, str]


class Pipeline:
    def __init__(
        self, config: AgentConfig, default_parsers: dict[str, str] | None = None, settle: Settle | None = None
    ) -> None:
        """`default_parsers`: source kind → parser kind when neither the source nor [parser] says.
        `settle`: receives the ack tokens of entries dropped here (filtered, oversize)."""
        self.config = config
        self.settle = settle
        self.host = config.agent.host or socket.gethostname()
        self.route = make_router(config.route)
        self.keep = make_filter(config.filter)
        key_field = config.key.field
        self.key = field_getter(key_field) if key_field else None
        # Raw entries differ only in their message: unless the key or the topic is taken from the
        # message, a whole batch of them is routed, keyed and encoded at once (`_raw_records`).
        routed_by = template_fields(config.route.topic) | template_fields(config.route.priority_topic or "")
        self._batchable = "message" not in routed_by and key_field != "message"
        self._sources: dict[str, _PerSource] = {}
        self._default_parsers = default_parsers or {}
        self._encoders: dict[int, Encoder] = {}
        self._dropped = ENTRIES_DROPPED.labels(reason="filtered")
        self._oversize_dropped = ENTRIES_DROPPED.labels(reason="oversize")
        # Room for the key, headers and Kafka's record framing inside the max message size.
        self.max_value_bytes = config.sink.max_message_bytes - 1024
        self._log_once = LogOnce(log)
        for s in config.sources:
            self._sources[s.name or s.kind] = self._per_source(s)

    def _per_source(self, s: SourceSettings | None) -> _PerSource:
        cfg = self.config
        parser = s.parser if s is not None and s.parser is not None else cfg.parser
        if s is not None and s.parser is None and "parser" not in cfg.model_fields_set:
            kind = self._default_parsers.get(s.kind)
            if kind is not None:
                parser = parser.model_copy(update={"kind": kind})
        multiline = s.multiline if s is not None and s.multiline is not None else cfg.multiline
        attributes = {**cfg.agent.attributes, **(s.attributes if s is not None else {})}
        return _PerSource(
            parse=safe(make_parser(parser), parser.kind),
            parser_name=parser.kind,
            joiner=Joiner(multiline) if multiline.start_pattern else None,
            attributes=attributes,
        )

    def _state(self, source: str) -> _PerSource:
        st = self._sources.get(source)
        if st is None:  # a source not in the config (tests, ad-hoc): the agent-wide settings
            st = self._sources[source] = self._per_source(None)
        return st

    def _encoder(self) -> Encoder:
        ident = threading.get_ident()
        enc = self._encoders.get(ident)
        if enc is None:
            enc = self._encoders[ident] = make_encoder()
        return enc

    # ---- the hot path -------------------------------------------------------------------
    def process(self, batch: Frames) -> list[Record]:
        st = self._state(batch.source)
        if st.joiner is not None:
            batch = st.joiner.feed(batch)
        return self._records(batch, st)

    def _records(self, batch: Frames, st: _PerSource) -> list[Record]:
        if st.parser_name == "raw" and self.keep is None and self._batchable:
            records = self._raw_records(batch, st)
            if records is not None:
                return records
        received_at = batch.received_at
        timestamp_ms = received_at // 1000
        source, host = batch.source, self.host
        parse, keep, route, key, encode = st.parse, self.keep, self.route, self.key, self._encoder()
        extra = {**st.attributes, **batch.attributes} if batch.attributes else st.attributes
        tokens = batch.ack_tokens
        limit = self.max_value_bytes
        out: list[Record] = []
        failed = dropped = 0
        settled: list[Any] = []
        for i, frame in enumerate(batch.frames):
            e = parse(frame, received_at)
            if e["parse_error"] is not None:
                failed += 1
            e["source"] = source
            if e["host"] is None:
                e["host"] = host
            if extra:
                attributes = e["attributes"]
                e["attributes"] = {**extra, **attributes} if attributes else dict(extra)
            if keep is not None and not keep(e):
                dropped += 1
                if tokens:
                    settled.append(tokens[i])
                continue
            k = key(e) if key is not None else None
            value = encode(e)
            if len(value) > limit:
                value = self._oversize(e, value, encode)
                if value is None:
                    if tokens:
                        settled.append(tokens[i])
                    continue
            token = tokens[i] if tokens else None
            out.append((route(e), k.encode() if k else None, value, timestamp_ms, source, token))
        if failed:
            PARSE_FAILURES.labels(source=source, parser=st.parser_name).inc(failed)
            self._log_once.warning(
                f"parse:{source}", "source %s: %d entr(y/ies) did not parse as %s; kept raw with parse_error",
                source, failed, st.parser_name,
            )  # fmt: skip
        if dropped:
            self._dropped.inc(dropped)
        if settled and self.settle is not None:
            self.settle(source, settled)
        return out

    def _raw_records(self, batch: Frames, st: _PerSource) -> list[Record] | None:
        """The raw parser's fast path: a batch of valid UTF-8 lines, none oversize, encoded in one
        pass. None sends the batch down the general path (which handles every exception)."""
        encoder = self._encoder()
        frames = batch.frames
        if not isinstance(encoder, EntryEncoder) or not frames:
            return None
        joined = b"\n".join(frames)  # '\n' between lines: one line's bytes cannot complete another's
        if not joined.isascii():
            try:
                joined.decode()
            except UnicodeDecodeError:
                return None
        template = new_entry("", None, batch.received_at)
        template["source"], template["host"] = batch.source, self.host
        extra = {**st.attributes, **batch.attributes} if batch.attributes else st.attributes
        if extra:
            template["attributes"] = dict(extra)
        values = encoder.messages(template, frames)
        if max(map(len, values)) > self.max_value_bytes:
            return None
        topic, source, timestamp_ms = self.route(template), batch.source, batch.received_at // 1000
        k = self.key(template) if self.key is not None else None
        key = k.encode() if k else None
        tokens = batch.ack_tokens
        if not tokens:
            return [(topic, key, value, timestamp_ms, source, None) for value in values]
        return [(topic, key, v, timestamp_ms, source, t) for v, t in zip(values, tokens, strict=True)]

    def _oversize(self, e: LogEntry, value: bytes, encode: Encoder) -> bytes | None:
        """An entry too large for Kafka: cut its message (attribute `truncated` = original size) or drop it."""
        limit = self.max_value_bytes
        if self.config.sink.oversize == "truncate":
            e["raw"] = None  # the message still holds the text of the original bytes
            e["attributes"] = {**e["attributes"], "truncated": str(len(value))}
            value = encode(e)
            if len(value) > limit:
                message = e["message"].encode()
                keep = max(0, len(message) - (len(value) - limit) - 8)
                e["message"] = message[:keep].decode(errors="ignore")
                value = encode(e)
            if len(value) <= limit:
                ENTRIES_TRUNCATED.labels(source=e["source"]).inc()
                return value
        self._oversize_dropped.inc()
        self._log_once.warning("oversize", "an entry of %d bytes exceeds sink.max_message_bytes; dropped", len(value))
        return None

    def expired(self) -> list[Record]:
        """Multiline entries whose stream went quiet (called periodically by the agent)."""
        return self._drain(st.joiner.expired() for st in self._sources.values() if st.joiner is not None)

    def flush(self) -> list[Record]:
        """Every pending multiline entry (at shutdown)."""
        return self._drain(st.joiner.flush() for st in self._sources.values() if st.joiner is not None)

    def _drain(self, groups: Iterable[list[Frames]]) -> list[Record]:
        out: list[Record] = []
        for group in groups:
            for batch in group:
                out += self._records(batch, self._state(batch.source))
        return out
