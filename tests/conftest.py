"""Shared fixtures: one real Kafka per test session, unique topics and groups per test.

The broker is Apache Kafka started from Maven Central's jars (logferry.broker), or the
cluster named by LOGFERRY_BOOTSTRAP_SERVERS. Nothing here mocks Kafka.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka.admin import NewTopic

from logferry.broker import ephemeral_cluster
from logferry.kafka import KafkaSettings


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("LOGFERRY_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    with ephemeral_cluster() as cluster:
        yield cluster.bootstrap_servers


@pytest.fixture
def kafka_settings(kafka_bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=kafka_bootstrap)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def group_id() -> str:
    return unique("test-group")


@pytest.fixture
def make_topic(kafka_settings: KafkaSettings) -> Iterator[Callable[..., str]]:
    """Create uniquely named topics; they are deleted when the test ends."""
    admin = kafka_settings.admin()
    created: list[str] = []

    def make(partitions: int = 1, prefix: str = "test", config: dict[str, str] | None = None) -> str:
        name = unique(prefix)
        fut = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})]
        )[name]
        fut.result(30)
        created.append(name)
        return name

    yield make
    if created:
        for fut in admin.delete_topics(created).values():
            fut.result(30)
