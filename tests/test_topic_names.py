"""Topic names Kafka would refuse are refused by the config, naming the key, before any client is
made or any entry accepted; the rule itself is checked against a real broker."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import NewTopic
from conftest import unique

from logferry.collectors.config import AgentConfig
from logferry.collectors.pipeline import make_router
from logferry.config import TOPIC_MAX, topic_problem, validate
from logferry.errors import ConfigError
from logferry.kafka import KafkaSettings
from logferry.processors import Processor
from logferry.processors.config import ProcessorConfig
from logferry.processors.replay import apply_replay_options


def _padded(prefix: str, length: int) -> str:
    name = unique(prefix)
    return name + "x" * (length - len(name))


def test_the_rule_is_the_brokers(kafka_settings):
    """Every candidate the broker accepts passes topic_problem; every one it refuses does not."""
    candidates = [
        unique("plain"), unique("dots.under_scores-and-Digits09"), _padded("longest", TOPIC_MAX),
        _padded("too-long", TOPIC_MAX + 1), unique("a space"), unique("slash/"), unique("colon:"),
        unique("plus+"), unique("accent-é"), ".", "..",
    ]  # fmt: skip
    admin = kafka_settings.admin()
    futures = admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in candidates])
    broker_accepts: dict[str, bool] = {}
    for topic, fut in futures.items():
        try:
            fut.result(30)
            broker_accepts[topic] = True
        except Exception:
            broker_accepts[topic] = False
    created = [t for t, ok in broker_accepts.items() if ok]
    if created:
        for fut in admin.delete_topics(created).values():
            fut.result(30)
    assert set(broker_accepts) == set(candidates)
    assert any(broker_accepts.values()) and not all(broker_accepts.values())  # both kinds were tried
    ours = {t: topic_problem(t) is None for t in candidates}
    assert ours == broker_accepts


@pytest.mark.parametrize(
    ("processor", "key", "said"),
    [
        ({"topics": ["app logs"]}, "processor.topics.0", "' '"),
        ({"topics": ["ok"], "low_priority_topics": ["bulk/2"]}, "processor.low_priority_topics.0", "'/'"),
        ({"topics": ["ok"], "dead_letter_topic": ".."}, "processor.dead_letter_topic", "'..'"),
        ({"topics": ["ok"], "exactly_once": True, "output_topic": "out:put"}, "processor.output_topic", "':'"),
        ({"topics": ["ok"], "control_topic": ""}, "processor.control_topic", "empty"),
        ({"topics": ["ok"], "group": "night shift"}, "processor", "set dead_letter_topic"),
        ({"topics": ["x" * (TOPIC_MAX - 5)], "retry_delays": [5]}, "processor", "retry topic"),
    ],
)
def test_processor_config_refuses_a_topic_kafka_would(processor, key, said):
    data = {"processor": {"group": "g", **processor}}
    with pytest.raises(ConfigError) as e:
        validate(ProcessorConfig, data, "p.toml")
    line = next(ln for ln in str(e.value).splitlines() if ln.strip().startswith(f"{key}:"))
    assert said in line


def test_forward_topic_is_checked_too():
    data = {"processor": {"group": "g", "topics": ["t"], "builtin": "forward"}, "forward": {"topic": "a b"}}
    with pytest.raises(ConfigError, match=r"forward\.topic"):
        validate(ProcessorConfig, data, "p.toml")


def test_processor_api_refuses_before_making_a_client():
    """No broker here: the refusal comes from the settings, not from Kafka."""
    with pytest.raises(ConfigError, match="dead_letter_topic"):
        Processor("g", ["t"], bootstrap_servers="127.0.0.1:1", dead_letter_topic="dead letters")


@pytest.mark.parametrize(
    ("route", "said"),
    [
        ({"topic": "app logs"}, "' '"),
        ({"topic": "logs/{service}"}, "'/'"),
        ({"topic": "logs", "priority_topic": "alerts!"}, "'!'"),
        ({"topic": "x" * (TOPIC_MAX + 1)}, "characters"),
        ({"topic": "logs.{service!r}"}, "bare field names"),  # would render logs.'api'
        ({"topic": "logs.{service:>20}"}, "bare field names"),  # would pad with spaces
        ({"topic": "logs.{{service}}"}, "'{}'"),  # escaped braces are literal braces
        ({"topic": "{service}", "default_value": ""}, "default_value"),  # an entry without service: topic ''
        ({"topic": "{service}{host}", "default_value": "."}, "dots only"),  # would render '..'
    ],
)
def test_agent_route_refuses_a_topic_kafka_would(route, said):
    data = {"sources": [{"kind": "stdin"}], "route": route}
    with pytest.raises(ConfigError) as e:
        validate(AgentConfig, data, "a.toml")
    assert said in str(e.value) and "route." in str(e.value)


@pytest.mark.parametrize(
    "route",
    [
        {"topic": "logs.{service}"}, {"topic": "{service}" + "x" * TOPIC_MAX}, {"topic": "app-logs_2.raw"},
        {"topic": "logs.{service}", "default_value": "n/a"},  # made topic-safe like any value
    ],
)  # fmt: skip
def test_agent_route_accepts_legal_templates(route):
    """Placeholders are made topic-safe and a rendered topic is cut to the limit, so these are fine."""
    config = validate(AgentConfig, {"sources": [{"kind": "stdin"}], "route": route}, "a.toml")
    assert config.route.topic == route["topic"]


def test_a_template_renders_dotted_attributes_and_safe_defaults():
    """An attribute name with dots is one field (str.format would read `k8s.namespace` as k8s's
    attribute), and a missing value becomes the default, made topic-safe like any value."""
    config = validate(AgentConfig, {"sources": [{"kind": "stdin"}], "route": {
        "topic": "logs.{k8s.namespace}.{service}", "default_value": "n/a"}}, "a.toml")  # fmt: skip
    route = make_router(config.route)
    entry = {"service": "api gw", "level": "info", "attributes": {"k8s.namespace": "prod"}}
    assert route(entry) == "logs.prod.api_gw"
    assert route({"service": None, "level": "info", "attributes": {}}) == "logs.n_a.n_a"
    assert topic_problem(route(entry)) is None


def test_retry_delays_must_be_finite():
    for delay in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ConfigError, match=r"processor\.retry_delays\.0"):
            validate(ProcessorConfig, {"processor": {"group": "g", "topics": ["t"], "retry_delays": [delay]}}, "p")


def test_a_side_group_is_checked_before_its_replay_is_claimed():
    """`--as-group` names the dead-letter topic too; refused before any offset of that group is
    touched (no broker at this address: a claim would fail differently)."""
    section = validate(ProcessorConfig, {"processor": {"group": "g", "topics": ["t"]}}, "p").processor
    with pytest.raises(ConfigError, match="--as-group 'night shift'"):
        apply_replay_options(KafkaSettings(bootstrap_servers="127.0.0.1:1"), section, None, "PT30M", "night shift")
