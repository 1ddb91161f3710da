"""Replay by time when starting a processor: `logferry process --replay-from ISO | --replay-by PT30M`.

The replay is claimed through Kafka's own group arbitration: before joining, the member moves
the group's committed offsets to the first entry at or after the replay time (ListOffsets by
timestamp, the log end when there is none; the same as `logferry offsets reset --to-datetime`).
Kafka accepts that only while the group has no members, so the replay happens once for the
group: replicas started together find the group running (their reset is refused) and simply
join it, and a partition handed over later continues from the replay's progress.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from logferry.config import validate
from logferry.errors import ConfigError
from logferry.kafka import KafkaSettings
from logferry.metrics import REPLAYS
from logferry.processors.config import ProcessorSection
from logferry.processors.offsets import (
    ActiveGroupError,
    GroupOffsetsAdmin,
    ResetPlan,
    ResetTarget,
    iso_ms,
    parse_datetime,
    parse_duration,
)

log = logging.getLogger("logferry.processors.replay")


def replay_time_ms(replay_from: str | None, replay_by: str | None) -> int | None:
    """Epoch ms from --replay-from (ISO date-time) or --replay-by (ISO duration back from now)."""
    if replay_from is not None and replay_by is not None:
        raise ConfigError("give --replay-from or --replay-by, not both")
    if replay_from is not None:
        return parse_datetime(replay_from, "--replay-from")
    if replay_by is not None:
        return int((datetime.now(UTC) - parse_duration(replay_by, "--replay-by")).timestamp() * 1000)
    return None


def claim_replay(kafka: KafkaSettings, group: str, topics: list[str], since_ms: int) -> ResetPlan | None:
    """Move `group` to `since_ms` on every partition of `topics`; None when the group is already running."""
    admin = GroupOffsetsAdmin(kafka)
    plan = admin.plan(group, ResetTarget("to_datetime", since_ms), [(t, None) for t in topics])
    try:
        admin.execute(plan)
    except ActiveGroupError:
        log.warning(
            "replay: group %s is already running, so the member that started it did the replay from %s; "
            "joining without replaying (to replay a running group, stop it first)", group, iso_ms(since_ms),
        )  # fmt: skip
        return None
    for r in plan.resets:
        log.info("replay: %s[%d] %s → %d%s", r.topic, r.partition, "-" if r.old is None else r.old, r.new,
                 f" ({r.note})" if r.note else "")  # fmt: skip
    REPLAYS.labels(group, "startup").inc(len(plan.resets))
    return plan


def apply_replay_options(
    kafka: KafkaSettings,
    section: ProcessorSection,
    replay_from: str | None,
    replay_by: str | None,
    as_group: str | None,
) -> ProcessorSection:
    """`logferry process --replay-from/--replay-by/--as-group`: the section to run, replay claimed."""
    if as_group is not None:
        if as_group == section.group:
            raise ConfigError(f"--as-group {as_group!r} is the processor's own group; name a different group")
        # A side group rebuilds beside the live one: its failures get their own dead-letter topic too.
        # Validated again: names derived from the group (its dead-letter topic) must be legal too.
        section = validate(ProcessorSection, {**section.model_dump(), "group": as_group}, f"--as-group {as_group!r}")
    since = replay_time_ms(replay_from, replay_by)
    if since is not None:
        claim_replay(kafka, section.group, [*section.topics, *section.low_priority_topics], since)
    return section
