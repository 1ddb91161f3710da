"""TOML config loading, validated by pydantic models that forbid unknown keys.

Each side owns its model (logferry.collectors.config.AgentConfig,
logferry.processors.config.ProcessorConfig); this module holds what they share: the
strict base model, the loader, and error messages that name the key and the problem.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from logferry.affinity import check_cpu
from logferry.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: a typo in a key is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=False)


def _allowed_cpu(cpu: int | None) -> int | None:
    if cpu is not None:
        check_cpu(cpu)
    return cpu


# `pin_to_cpu` of the agent and the processor: a CPU this process may run on (logferry/affinity.py).
PinToCpu = Annotated[int | None, Field(ge=0), AfterValidator(_allowed_cpu)]


# Kafka's own rule (org.apache.kafka.common.internals.Topic): 1 to 249 ASCII letters, digits, '.', '_', '-'.
_TOPIC_CHARS = re.compile(r"[a-zA-Z0-9._-]+")
TOPIC_MAX = 249


def topic_problem(name: str) -> str | None:
    """Why Kafka would refuse `name` as a topic name, or None: said at config time, not at the first send."""
    if not name:
        return "a topic name cannot be empty"
    if name in (".", ".."):
        return f"{name!r} is not a topic name Kafka allows"
    if len(name) > TOPIC_MAX:
        return f"topic name {name[:40]!r}… is {len(name)} characters; Kafka allows {TOPIC_MAX}"
    if not _TOPIC_CHARS.fullmatch(name):
        bad = "".join(sorted({c for c in name if not _TOPIC_CHARS.fullmatch(c)}))
        return f"topic name {name!r} has {bad!r}; Kafka allows only ASCII letters, digits, '.', '_' and '-'"
    return None


def _legal_topic(name: str) -> str:
    if (problem := topic_problem(name)) is not None:
        raise ValueError(problem)
    return name


# A topic name as Kafka accepts it (a template with placeholders is checked where it is rendered).
TopicName = Annotated[str, AfterValidator(_legal_topic)]


def describe_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            problem = "unknown key (check the spelling; see `logferry config check --help`)"
        elif e["type"] == "missing":
            problem = "required key is missing"
        else:
            problem = e["msg"]
            if "input" in e and not isinstance(e["input"], dict | list):
                problem += f" (got {e['input']!r})"
        lines.append(f"  {key}: {problem}")
    return "\n".join(lines)


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def validate(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, source)) from None


def load(model: type[M], path: str | Path, overrides: dict[str, Any] | None = None) -> M:
    """Read a TOML file into `model`; `overrides` (from CLI flags) are merged over it, deeply."""
    data = read_toml(path)
    if overrides:
        data = deep_merge(data, overrides)
    return validate(model, data, str(path))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins key by key; None in `over` means "flag not given" and never overrides."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            continue
        if isinstance(v, dict):
            v = deep_merge(out[k] if isinstance(out.get(k), dict) else {}, v)
            if not v and k not in out:
                continue
        out[k] = v
    return out


# Config kinds `logferry config check` knows, imported lazily so the CLI starts fast.
KINDS = {
    "agent": ("logferry.collectors.config", "AgentConfig"),
    "processor": ("logferry.processors.config", "ProcessorConfig"),
}


def guess_kind(data: dict[str, Any]) -> str:
    if "sources" in data or "agent" in data:
        return "agent"
    if "processor" in data or "handler" in data:
        return "processor"
    raise ConfigError(
        "cannot tell whether this is an agent or a processor config "
        "(an agent has [[sources]], a processor has [processor]); pass --kind"
    )


def check_file(path: str | Path, kind: str | None = None) -> BaseModel:
    import importlib

    data = read_toml(path)
    kind = kind or guess_kind(data)
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    module, name = KINDS[kind]
    model = getattr(importlib.import_module(module), name)
    return validate(model, data, str(path))
