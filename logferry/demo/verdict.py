"""From what a demo run observed to its summary: the numbers, the failed checks, the plot and JSON files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from logferry.demo.check import Handle, check_order
from logferry.demo.load import service_name
from logferry.demo.plan import Plan
from logferry.demo.report import plot, rate_series
from logferry.demo.sampler import Sample


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Observed:
    topic: str
    group: str
    sources: dict[str, str]  # kind → address the agent listened on
    samples: list[Sample]
    handles: list[Handle]  # every handler call of both members, in time order
    sent: list[int]  # entries written per service (service i wrote seqs 0..sent[i]-1)
    window: dict[str, list[int]]  # per key, the seqs in Kafka from the replay time on
    replay_ns: int  # wall clock when the replay was issued: later handles belong to it
    burst_ms: int  # wall clock at the burst's start: the replay target
    acks: dict[str, Any]  # `logferry replay --json` output
    agent: dict[str, float]  # the agent's final counters by metric name
    delivered: int  # entries in the topic (sum of log end offsets)
    exits: dict[str, int | None]  # exit status per child (None: had to be killed)
    pre_burst: int  # highest lag before the burst
    drain_threshold: int  # lag at or below this counts as drained
    drain_started_s: float
    drain_s: float | None  # from the burst's end until the lag was back down; None: it never was
    settled: bool  # with the load stopped, everything was delivered and committed
    load_errors: list[str]
    duration_s: float


def summarize(plan: Plan, o: Observed, out: Path) -> dict[str, Any]:
    """The summary (also written to `out`/summary.json, samples to samples.json, the plot to demo.png)."""
    first = check_order([h for h in o.handles if h.t_ns < o.replay_ns],
                        {service_name(i): list(range(n)) for i, n in enumerate(o.sent)})  # fmt: skip
    again = check_order([h for h in o.handles if h.t_ns >= o.replay_ns], o.window)
    written = sum(o.sent)
    # The burst's lag is judged before the replay, which raises the lag again on purpose.
    peak = max((s for s in o.samples if s.phase != "replay"), key=lambda s: s.lag)
    final = o.samples[-1].lag
    drained = o.drain_s is not None and o.settled and final == 0
    lag = {
        "max": peak.lag, "max_at_s": round(peak.t, 2), "pre_burst": o.pre_burst, "drain_threshold": o.drain_threshold,
        "drain_s": None if o.drain_s is None else round(o.drain_s, 2),
        "drained_at_s": None if o.drain_s is None else round(o.drain_started_s + o.drain_s, 2),
        "replay_peak": max((s.lag for s in o.samples if s.phase == "replay"), default=0),
        "final": final, "drained": drained,
    }  # fmt: skip
    accepted = int(o.agent["logferry_source_entries_received_total"])
    summary: dict[str, Any] = {
        "topic": o.topic, "group": o.group, "duration_s": round(o.duration_s, 1), "sources": o.sources,
        "plan": {**{k: getattr(plan, k) for k in ("services", "partitions", "steady_rate", "burst_rate", "burst_s",
                                                  "rate_limit")}, "group_rate_limit": plan.capacity},
        "written": written,
        "accepted_by_agent": accepted,
        "agent_acked": int(o.agent["logferry_entries_delivered_total"]),
        "agent_drops": int(o.agent["logferry_entries_dropped_total"]),
        "delivered_to_kafka": o.delivered,
        "first_pass": first.as_dict(),
        "replay": {"from": iso_ms(o.burst_ms), "partitions_moved": len(o.acks["partitions"]),
                   "silent_members": o.acks["silent_members"], **again.as_dict()},
        "lag": lag,
        "rates": {"peak_ingest": round(max(rate_series(o.samples, "received")), 1),
                  "peak_processing": round(max(rate_series(o.samples, "processed")), 1)},
        "member_exits": o.exits,
        "plot": str(out / "demo.png"),
        "lag_rose_then_drained": peak.lag > o.pre_burst and drained,
    }  # fmt: skip
    failures = [
        *(f"load generator: {e}" for e in o.load_errors),
        *([f"the agent accepted {accepted:,} of {written:,} entries"] if accepted != written else []),
        *([f"Kafka holds {o.delivered:,} entries, {written:,} were written"] if o.delivered != written else []),
        *([f"{first.missing:,} entries never handled"] if first.missing else []),
        *([f"{first.violations:,} per-key order violations"] if first.violations else []),
        *([f"replay: {again.missing:,} of {again.expected:,} entries not re-handled"] if again.missing else []),
        *([f"replay: {again.violations:,} per-key order violations"] if again.violations else []),
        *([f"replay: members did not answer: {o.acks['silent_members']}"] if o.acks["silent_members"] else []),
        *([] if again.expected else ["replay: the window from the burst's start was empty"]),
        *([] if drained else [f"the lag did not drain (final lag {final:,})"]),
        *([] if peak.lag > o.pre_burst else ["the burst did not raise the lag: nothing was shaved"]),
        *(f"{name} exited with status {rc}" for name, rc in o.exits.items() if rc != 0),
    ]  # fmt: skip
    summary["failures"] = failures
    summary["ok"] = not failures
    plot(o.samples, summary, out / "demo.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "samples.json").write_text(json.dumps([s.as_dict() for s in o.samples]) + "\n")
    return summary
