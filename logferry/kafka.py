"""Kafka client settings, built in one place for producers, consumers and admin clients.

Secrets come from the environment or a file and are held as SecretStr, so they never
appear in a repr, a log line, an error message or a metric.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient
from pydantic import Field, SecretStr, model_validator

from logferry.config import StrictModel
from logferry.errors import ConfigError, KafkaUnavailableError

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
BOOTSTRAP_ENV = "LOGFERRY_BOOTSTRAP_SERVERS"
PASSWORD_ENV = "LOGFERRY_SASL_PASSWORD"

log = logging.getLogger("logferry.kafka")


def default_bootstrap() -> str:
    return os.environ.get(BOOTSTRAP_ENV) or DEFAULT_BOOTSTRAP


class KafkaSettings(StrictModel):
    """The `[kafka]` table of every config file."""

    bootstrap_servers: str = Field(default_factory=default_bootstrap)
    client_id: str = "logferry"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    # Never put the password itself in a config file: name an env var or a file.
    sasl_password_env: str = PASSWORD_ENV
    sasl_password_file: Path | None = None
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password_env: str | None = None
    # Any other librdkafka property, passed through as-is (e.g. "socket.keepalive.enable").
    extra: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sasl_needs_user(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not (self.sasl_mechanism and self.sasl_username):
            raise ValueError("security_protocol SASL_* needs sasl_mechanism and sasl_username")
        return self

    def sasl_password(self) -> SecretStr | None:
        if self.sasl_password_file is not None:
            try:
                return SecretStr(self.sasl_password_file.read_text().strip())
            except OSError as e:
                raise ConfigError(f"kafka.sasl_password_file: cannot read ({e.strerror})") from None
        value = os.environ.get(self.sasl_password_env)
        return SecretStr(value) if value is not None else None

    def client_config(self, **overrides: Any) -> dict[str, Any]:
        """librdkafka properties for any client; `overrides` use librdkafka names."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
            # librdkafka's own stderr lines would duplicate what our error callbacks report.
            "log_level": 3,
        }
        if self.security_protocol.startswith("SASL"):
            password = self.sasl_password()
            if password is None:
                raise ConfigError(
                    f"kafka: SASL needs a password: set ${self.sasl_password_env} or kafka.sasl_password_file"
                )
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = password.get_secret_value()
        for key, path in (
            ("ssl.ca.location", self.ssl_ca_location),
            ("ssl.certificate.location", self.ssl_certificate_location),
            ("ssl.key.location", self.ssl_key_location),
        ):
            if path is not None:
                conf[key] = str(path)
        if self.ssl_key_password_env and (kp := os.environ.get(self.ssl_key_password_env)):
            conf["ssl.key.password"] = kp
        conf.update(self.extra)
        conf.update(overrides)
        return conf

    def admin(self) -> AdminClient:
        return AdminClient(self.client_config())


def redact(conf: dict[str, Any]) -> dict[str, Any]:
    """A client config safe to print."""
    return {k: ("***" if "password" in k or "secret" in k else v) for k, v in conf.items()}


def wait_reachable(settings: KafkaSettings, timeout: float = 30.0) -> dict[int, str]:
    """Block until a metadata request succeeds; return {broker id: host:port}.

    Bounded: after `timeout` seconds raise KafkaUnavailableError naming the servers tried.
    """
    admin = settings.admin()
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            md = admin.list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            if md.brokers:
                return {b.id: f"{b.host}:{b.port}" for b in md.brokers.values()}
        except Exception as e:  # KafkaException: transport not up yet
            last = e
        time.sleep(0.2)
    reason = f" (last error: {last})" if last else ""
    raise KafkaUnavailableError(
        f"Kafka at {settings.bootstrap_servers} did not answer within {timeout:.0f}s{reason}. "
        f"Is it running? Start a local one with `logferry broker start`, or pass --bootstrap-servers."
    )


def close_producer(producer: Producer, timeout: float) -> int:
    """Deliver what the producer holds for up to `timeout` seconds, then close it; returns how many
    records were left undelivered. confluent-kafka's close() flushes without a time limit, so what
    is left is purged first (its delivery reports say _PURGE_QUEUE): closing never hangs on a
    Kafka that went away."""
    fenced = False
    try:
        left = producer.flush(timeout)
    except KafkaException:  # a transactional producer in a fatal state (fenced) refuses even to flush
        left, fenced = len(producer), True
    with warnings.catch_warnings():
        if fenced:  # close() then warns that it cannot abort: the caller reports the fence itself
            warnings.simplefilter("ignore", RuntimeWarning)
        if left:
            producer.purge()
        producer.close()
    return left
