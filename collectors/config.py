"""The agent's config file (`logferry collect --config agent.toml`)."""

from __future__ import annotations

from pydantic import Field

from logferry.config import StrictModel
from logferry.kafka import KafkaSettings


class MetricsSettings(StrictModel):
    address: str = "127.0.0.1:9464"
    enabled: bool = True


class AgentConfig(StrictModel):
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
