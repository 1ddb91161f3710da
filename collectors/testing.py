"""Driving an agent from tests and benchmarks: run it on a thread, wait for conditions, read back what it delivered."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from logferry.collectors.agent import Agent
from logferry.collectors.config import AgentConfig
from logferry.config import validate
from logferry.kafka import KafkaSettings
from logferry.schemas import LogEntry, default_codec


@dataclass
class Delivered:
    key: bytes | None
    partition: int
    offset: int
    entry: LogEntry


def read_topic(
    settings: KafkaSettings, topic: str, expect: int, timeout: float = 60.0, settle: float = 0.0
) -> list[Delivered]:
    """Consume `topic` from the start until `expect` records arrived (or `timeout`), then `settle` s more.

    `settle` > 0 catches records beyond `expect` (a duplicate would show up there).
    """
    codec = default_codec()
    consumer = Consumer(
        settings.client_config(**{"group.id": f"readback-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
                                  "enable.auto.commit": False})
    )  # fmt: skip
    # assign() rather than subscribe(): no group join to wait for on a busy broker
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    out: list[Delivered] = []
    deadline = time.monotonic() + timeout
    settling = False
    try:
        while time.monotonic() < deadline:
            if len(out) >= expect and not settling:
                if settle <= 0:
                    break
                deadline, settling = time.monotonic() + settle, True
            for msg in consumer.consume(1000, 0.2):
                if msg.error():
                    continue
                out.append(
                    Delivered(msg.key(), msg.partition(), msg.offset(), codec.decode(msg.value(), msg.headers()))
                )
    finally:
        consumer.close()
    return out


def wait_until(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll `predicate` until true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class RunningAgent:
    """An Agent on a thread, as a context manager; leaving it is a SIGTERM (drain) that must exit 0.

    Signal handlers belong to the main thread, so `agent.request(signal.SIG...)` stands in for kill.
    """

    def __init__(self, config: dict) -> None:
        config.setdefault("metrics", {"address": "127.0.0.1:0"})
        self.agent = Agent(validate(AgentConfig, config))
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.rc = self.agent.run()

    def __enter__(self) -> Agent:
        self.thread.start()
        agent = self.agent
        wait_until(lambda: agent.sink is not None and len(agent._threads) == len(agent.config.sources),
                   what="agent start")  # fmt: skip
        return agent

    def __exit__(self, *exc: object) -> None:
        self.agent.request(signal.SIGTERM)
        self.thread.join(60)
        assert self.rc == 0, f"agent exited with {self.rc}"
