"""`broker start --runtime docker`: Kafka from testcontainers' Kafka module, where a Docker engine exists."""

from __future__ import annotations

from logferry.errors import BrokerError


def docker_available() -> str | None:
    """None when a Docker engine answers, else the reason it does not."""
    try:
        import docker  # type: ignore[import-not-found]
    except ImportError:
        return "the Python package 'docker' is missing (pip install 'logferry[docker]')"
    try:
        docker.from_env().ping()
    except Exception as e:
        return f"no Docker engine reachable ({type(e).__name__}: {e})"
    return None


def start_container(version: str) -> tuple[str, str]:
    """Start apache/kafka:<version> in KRaft mode; return (container id, bootstrap servers)."""
    reason = docker_available()
    if reason:
        raise BrokerError(f"--runtime docker: {reason}; use the default --runtime jars instead")
    from testcontainers.kafka import KafkaContainer  # type: ignore[import-not-found]

    container = KafkaContainer(f"apache/kafka:{version}").with_kraft()
    container.start()
    return container.get_wrapped_container().id, container.get_bootstrap_server()


def stop_container(container_id: str) -> None:
    import docker  # type: ignore[import-not-found]

    docker.from_env().containers.get(container_id).remove(force=True)
