"""Where done offsets go. The Kafka group commit today; an exactly-once runtime swaps in a
transactional producer's send_offsets_to_transaction behind the same two methods."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from logferry.log import LogOnce
from logferry.metrics import COMMITTED_OFFSET

log = logging.getLogger("logferry.processors.commits")
once = LogOnce(log)


class OffsetCommitter(Protocol):
    def commit(self, offsets: list[TopicPartition], sync: bool) -> bool:
        """Record `offsets` (next offset to consume) for the group; False when they were not accepted."""
        ...


class KafkaCommitter:
    def __init__(self, consumer: Consumer, group: str, on_failed: Callable[[list[TopicPartition]], None]) -> None:
        self.consumer = consumer
        self.group = group
        # Told which offsets an asynchronous commit lost, so the next tick sends them again.
        self.on_failed = on_failed

    def commit(self, offsets: list[TopicPartition], sync: bool) -> bool:
        try:
            result = self.consumer.commit(offsets=offsets, asynchronous=not sync)
        except KafkaException as e:
            err: KafkaError = e.args[0]
            # NO_OFFSET: nothing new; a rebalance in progress: the next timer tick or revoke retries.
            if err.code() != KafkaError._NO_OFFSET:
                once.warning(f"commit:{err.name()}", "commit of %d offsets failed: %s", len(offsets), err)
            return False
        if sync:
            for tp in result or offsets:
                if tp.error is None:
                    COMMITTED_OFFSET.labels(self.group, tp.topic, str(tp.partition)).set(tp.offset)
        return True

    def on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's callback for asynchronous commits (served from the poll thread)."""
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            once.warning(f"commit:{err.name()}", "asynchronous commit failed: %s", err)
            self.on_failed(partitions)
            return
        self.on_failed([tp for tp in partitions if tp.error is not None])
        for tp in partitions:
            if tp.error is None and tp.offset >= 0:
                COMMITTED_OFFSET.labels(self.group, tp.topic, str(tp.partition)).set(tp.offset)
