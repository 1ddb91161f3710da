"""A processor's config file (`logferry process --config processor.toml`)."""

from __future__ import annotations

from pydantic import Field

from logferry.config import StrictModel
from logferry.kafka import KafkaSettings


class MetricsSettings(StrictModel):
    address: str = "127.0.0.1:9465"
    enabled: bool = True


class ProcessorSection(StrictModel):
    group: str
    topics: list[str]


class ProcessorConfig(StrictModel):
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    processor: ProcessorSection
