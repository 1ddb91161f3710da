"""The local development/test Kafka: Apache's jars from Maven Central, run in KRaft mode."""

from logferry.broker.local import ClusterState, LocalCluster, Node, default_home, ephemeral_cluster
from logferry.broker.maven import DEFAULT_KAFKA_VERSION

__all__ = [
    "DEFAULT_KAFKA_VERSION",
    "ClusterState",
    "LocalCluster",
    "Node",
    "default_home",
    "ephemeral_cluster",
]
