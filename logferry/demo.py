"""`logferry demo`: the README's main job, on the local broker or --bootstrap-servers."""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Iterator

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import NewTopic
from rich.console import Console

from logferry.broker import ephemeral_cluster
from logferry.kafka import KafkaSettings, wait_reachable
from logferry.schemas import default_codec


@contextlib.contextmanager
def kafka(bootstrap: str | None, console: Console) -> Iterator[KafkaSettings]:
    if bootstrap:
        settings = KafkaSettings(bootstrap_servers=bootstrap)
        wait_reachable(settings, timeout=30)
        yield settings
        return
    with console.status("starting a local Apache Kafka (first run fetches its jars from Maven Central)…"):
        cm = ephemeral_cluster()
        cluster = cm.__enter__()
    console.print(f"local Kafka ready at {cluster.bootstrap_servers}")
    try:
        yield KafkaSettings(bootstrap_servers=cluster.bootstrap_servers)
    finally:
        with console.status("stopping the local Kafka…"):
            cm.__exit__(None, None, None)


def run_demo(bootstrap: str | None, console: Console, entries: int = 10_000, keys: int = 20) -> int:
    codec = default_codec()
    with kafka(bootstrap, console) as settings:
        topic = f"logferry.demo.{uuid.uuid4().hex[:8]}"
        admin = settings.admin()
        admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)
        producer = Producer(settings.client_config(**{"enable.idempotence": True, "acks": "all"}))
        host = socket.gethostname()
        t0 = time.monotonic()
        for i in range(entries):
            service = f"svc-{i % keys}"
            now = int(time.time() * 1_000_000)
            value = codec.encode({
                "timestamp": now, "received_at": now, "host": host, "source": "demo", "service": service,
                "level": "info", "message": f"demo entry {i}", "attributes": {"seq": str(i // keys)},
            })  # fmt: skip
            producer.produce(topic, value, key=service, headers=codec.headers)
            producer.poll(0)
        left = producer.flush(30)
        produced_s = time.monotonic() - t0
        consumer = Consumer(settings.client_config(**{
            "group.id": f"logferry-demo-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
        }))  # fmt: skip
        consumer.subscribe([topic])
        last_seq: dict[str, int] = {}
        out_of_order = read = 0
        deadline = time.monotonic() + 60
        while read < entries and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=1.0):
                if msg.error():
                    continue
                entry = codec.decode(msg.value(), msg.headers())
                seq = int(entry["attributes"]["seq"])
                if seq <= last_seq.get(entry["service"], -1):
                    out_of_order += 1
                last_seq[entry["service"]] = seq
                read += 1
        consumer.close()
        admin.delete_topics([topic])
    console.print(
        f"produced {entries - left} entries in {produced_s:.2f}s, read back {read}, "
        f"per-key order violations: {out_of_order}"
    )
    return 0 if read == entries and not left and not out_of_order else 1
