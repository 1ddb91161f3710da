"""How big the demo is: rates, phase lengths and the processors' rate limit, in one place."""

from __future__ import annotations

from dataclasses import dataclass

# The demo's ordering keys: service i writes through source i % len(SOURCES), so each key has one
# writer and one path through the agent, and its per-key sequence numbers reach Kafka in order.
SOURCES = ("unix", "fifo", "file", "posix_mq", "sysv_mq")


@dataclass(frozen=True)
class Plan:
    services: int = 50
    partitions: int = 6
    steady_rate: float = 150.0  # entries/s written before and after the burst
    burst_rate: float = 2000.0  # entries/s during the burst: several times what the group may process
    rate_limit: float = 250.0  # entries/s per processor member (peak shaving); the group has two
    warmup_s: float = 6.0  # steady load before the burst
    burst_s: float = 5.0
    drain_max_s: float = 60.0  # steady load after the burst until the lag is back down (at most this long)
    tail_s: float = 3.0  # steady load once drained, so the plot shows the pipeline back at rest
    sample_s: float = 0.5  # how often rates and lag are sampled

    @property
    def capacity(self) -> float:
        return 2 * self.rate_limit


DEFAULT = Plan()
# For tests and a first look: the same shape, a few seconds long.
QUICK = Plan(
    services=20, partitions=4, steady_rate=80.0, burst_rate=1500.0, rate_limit=250.0,
    warmup_s=3.0, burst_s=2.0, drain_max_s=30.0, tail_s=1.5,
)  # fmt: skip
