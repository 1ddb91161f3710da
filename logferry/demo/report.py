"""The demo's outputs: the plot of rates and lag through the burst, and the printed summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from logferry.demo.sampler import Sample

RATE_WINDOW_S = 1.0  # rates are averaged over this much time, so one late scrape is no spike


def rate_series(samples: list[Sample], field: str) -> list[float]:
    """Per-second increase of a cumulative sample field, over the trailing RATE_WINDOW_S."""
    out: list[float] = []
    j = 0
    for i, s in enumerate(samples):
        while j < i and s.t - samples[j + 1].t >= RATE_WINDOW_S:
            j += 1
        dt = s.t - samples[j].t
        out.append(max(0.0, (getattr(s, field) - getattr(samples[j], field)) / dt) if dt > 0 else 0.0)
    return out


def phase_spans(samples: list[Sample]) -> dict[str, tuple[float, float]]:
    """First and last sample time of each phase."""
    spans: dict[str, tuple[float, float]] = {}
    for s in samples:
        start, _ = spans.get(s.phase, (s.t, s.t))
        spans[s.phase] = (start, s.t)
    return spans


def plot(samples: list[Sample], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    t = [s.t for s in samples]
    lags = [s.lag for s in samples]
    limit = summary["plan"]["group_rate_limit"]
    lag = summary["lag"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, height_ratios=[3, 2])
    top.plot(t, rate_series(samples, "written"), color="0.55", lw=1, ls="--", label="written by the load generator")
    top.plot(t, rate_series(samples, "received"), color="tab:blue", lw=2, label="ingested by the agent")
    top.plot(t, rate_series(samples, "processed"), color="tab:green", lw=2, label="processed by the group")
    top.axhline(limit, color="tab:green", ls=":", lw=1, label=f"group rate limit ({limit:,.0f}/s)")
    top.set_ylabel("entries / second")
    top.legend(loc="center right", fontsize=9)
    bottom.plot(t, lags, color="tab:red", lw=2, label="consumer lag: entries in Kafka not yet processed")
    bottom.fill_between(t, lags, color="tab:red", alpha=0.15)
    bottom.set_ylabel("entries waiting")
    bottom.set_xlabel("seconds since the load started")
    if lag["max"]:
        bottom.annotate(f"burst peak {lag['max']:,}", (lag["max_at_s"], lag["max"]), xytext=(8, 0),
                        textcoords="offset points", fontsize=9, va="center")  # fmt: skip
    if lag["drained_at_s"] is not None:
        bottom.axvline(lag["drained_at_s"], color="tab:red", ls=":", lw=1)
        bottom.annotate(f"drained {lag['drain_s']:.0f}s after the burst", (lag["drained_at_s"], 0), xytext=(4, 40),
                        textcoords="offset points", fontsize=9)  # fmt: skip
    if lag["replay_peak"]:
        at = max(samples, key=lambda s: s.lag if s.phase == "replay" else -1)
        bottom.annotate(f"replay: {summary['replay']['handled']:,} entries re-handled, "
                        f"{summary['replay']['violations']} order violations",
                        (at.t, at.lag), xytext=(8, 0), textcoords="offset points", fontsize=9, va="center")  # fmt: skip
    bottom.legend(loc="upper left", fontsize=9)
    spans = phase_spans(samples)
    for phase, color, label in (("burst", "tab:orange", "burst"), ("replay", "tab:purple", "replay from the burst")):
        if phase in spans:
            lo, hi = spans[phase]
            for ax in (top, bottom):
                ax.axvspan(lo, hi, color=color, alpha=0.12)
            top.text((lo + hi) / 2, 0.98, label, transform=top.get_xaxis_transform(), ha="center", va="top",
                     fontsize=9, color=color)  # fmt: skip
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    top.set_ylim(top=max(rate_series(samples, "received"), default=limit) * 1.15)
    fig.suptitle(
        f"logferry demo: a burst of {summary['plan']['burst_rate']:,.0f} entries/s into a key-ordered group "
        f"limited to {limit:,.0f}/s\nthe backlog waits in Kafka as lag and drains; "
        f"{summary['written']:,} entries, {summary['first_pass']['violations']} per-key order violations",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(console: Console, s: dict[str, Any]) -> None:
    first, replay, lag, rates = s["first_pass"], s["replay"], s["lag"], s["rates"]
    drained = "did not drain" if lag["drain_s"] is None else (
        f"back to ≤ {lag['drain_threshold']:,} {lag['drain_s']:.1f}s after the burst")  # fmt: skip
    rows = [
        ("written by the load generator", f"{s['written']:,}", f"{s['plan']['services']} services, 5 IPC sources"),
        ("accepted by the agent", f"{s['accepted_by_agent']:,}", f"dropped {s['agent_drops']:,}"),
        ("delivered to Kafka", f"{s['delivered_to_kafka']:,}", f"topic {s['topic']}"),
        ("handled by the group", f"{first['handled']:,}",
         f"missing {first['missing']:,}, redelivered {first['duplicates']:,}"),
        ("per-key order violations", f"{first['violations']:,}", "must be 0"),
        ("max consumer lag", f"{lag['max']:,}", f"at {lag['max_at_s']:.1f}s; before the burst ≤ {lag['pre_burst']:,}"),
        ("lag drained", "yes" if lag["drained"] else "NO", f"{drained}; final lag {lag['final']:,}"),
        ("peak ingest", f"{rates['peak_ingest']:,.0f}/s",
         f"peak processing {rates['peak_processing']:,.0f}/s, limit {s['plan']['group_rate_limit']:,.0f}/s"),
        ("replayed", f"{replay['partitions_moved']} partitions", f"moved by `logferry replay` to {replay['from']}"),
        ("re-handled by the replay", f"{replay['handled']:,}",
         f"of {replay['expected']:,} in the window; order violations {replay['violations']:,}"),
        ("plot", "PNG", s["plot"]),
    ]  # fmt: skip
    t = Table(title="logferry demo", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right", no_wrap=True)
    t.add_column(overflow="fold")
    for row in rows:
        t.add_row(*row)
    console.print(t)
    if s["ok"]:
        console.print("[bold green]all checks passed[/]: all delivered and handled, key order kept, lag drained")
    for f in s["failures"]:
        console.print(f"[bold red]check failed:[/] {f}")
