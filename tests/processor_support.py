"""Test helpers shared by the processor tests: a logged `logferry` subprocess, an in-process member,
input records and reads of a group's committed offsets. Everything talks to the real broker."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from logferry.processors import Processor
from logferry.schemas import default_codec


class LoggedProcess:
    """A subprocess whose stderr is collected line by line, so tests can await log lines and show them."""

    def __init__(self, cmd: Sequence[str], env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen(list(cmd), env=dict(env), stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> int:
        """Wait for the exit and for the last stderr line; the exit code."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def entry(i: int, message: str = "ok", **attributes: str) -> dict:
    return {"timestamp": 0, "received_at": 0, "host": "h", "source": "t", "service": "s", "level": "info",
            "message": message, "attributes": {"i": str(i), **attributes}}  # fmt: skip


def produce(bootstrap: str, topic: str, entries: Sequence[tuple[bytes | None, dict]], partition: int = -1) -> None:
    """(key, LogEntry) pairs, in order (idempotence keeps per-partition order)."""
    codec = default_codec()
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
    for key, e in entries:
        p.produce(topic, codec.encode(e), key=key, headers=codec.headers, partition=partition)
    assert p.flush(30) == 0


def committed(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    """The group's committed offset per partition (-1: none), read without joining the group."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [tp.offset if tp.offset >= 0 else -1 for tp in tps]
    except KafkaException:
        return [-1] * partitions
    finally:
        c.close()


def log_end(bootstrap: str, topic: str, partitions: int = 1) -> list[int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"ends-{uuid.uuid4().hex[:8]}"})
    try:
        return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)]
    finally:
        c.close()


def run_in_thread(app: Processor) -> tuple[threading.Thread, list[BaseException]]:
    """Start `app.run()` on a daemon thread; the list receives what run() raised, if anything."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            app.run(install_signals=False)
        except BaseException as e:
            raised.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, raised


class Running:
    """`with Running(app) as app:` runs a Processor on a thread until the block ends."""

    def __init__(self, app: Processor, wait_assigned: bool = True) -> None:
        self.app = app
        self.wait_assigned = wait_assigned
        self.thread = threading.Thread(target=app.run, kwargs={"install_signals": False}, daemon=True)

    def __enter__(self) -> Processor:
        self.thread.start()
        if self.wait_assigned:
            assert self.app.wait_assigned(30), "the member got no partitions"
        return self.app

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.app.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the member did not stop"


def read_topic(bootstrap: str, topic: str, partitions: int = 1, timeout: float = 30) -> list:
    """Every record of `topic` up to its current end (no group offsets involved)."""
    ends = log_end(bootstrap, topic, partitions)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "enable.partition.eof": True})  # fmt: skip
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions) if ends[p] > 0])
    out: list = []
    at_end = {p for p in range(partitions) if ends[p] == 0}
    deadline = time.monotonic() + timeout
    try:
        while len(at_end) < partitions:
            assert time.monotonic() < deadline, f"reading {topic} did not reach {ends}"
            for m in c.consume(500, 0.2):
                if m.error() is None:
                    out.append(m)
                    if m.offset() + 1 >= ends[m.partition()]:
                        at_end.add(m.partition())
    finally:
        c.close()
    return out
