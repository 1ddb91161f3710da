"""Config files: unknown keys, wrong types and missing secrets give errors that name the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from logferry.collectors.config import AgentConfig
from logferry.config import check_file, load
from logferry.errors import ConfigError
from logferry.kafka import KafkaSettings, redact


def write(tmp_path, text: str):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_unknown_key_is_named(tmp_path):
    p = write(tmp_path, '[kafka]\nbootstrap_server = "x:9092"\n')
    with pytest.raises(ConfigError) as e:
        load(AgentConfig, p)
    assert "kafka.bootstrap_server: unknown key" in str(e.value)


def test_wrong_type_is_named_with_the_value(tmp_path):
    p = write(tmp_path, '[metrics]\nenabled = "sometimes"\n')
    with pytest.raises(ConfigError) as e:
        load(AgentConfig, p)
    assert "metrics.enabled" in str(e.value) and "'sometimes'" in str(e.value)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(AgentConfig, write(tmp_path, "[kafka\n"))
    with pytest.raises(ConfigError, match="not found"):
        load(AgentConfig, tmp_path / "nope.toml")


def test_overrides_from_flags_win(tmp_path):
    p = write(tmp_path, '[kafka]\nbootstrap_servers = "a:1"\nclient_id = "x"\n')
    cfg = load(AgentConfig, p, {"kafka": {"bootstrap_servers": "b:2", "client_id": None}})
    assert (cfg.kafka.bootstrap_servers, cfg.kafka.client_id) == ("b:2", "x")


def test_unset_flags_in_a_missing_section_do_not_override_defaults(tmp_path):
    p = write(tmp_path, "[kafka]\n")
    cfg = load(AgentConfig, p, {"metrics": {"address": None}, "kafka": {"client_id": None}})
    assert cfg.metrics.address == AgentConfig().metrics.address
    assert cfg.kafka.client_id == "logferry"


def test_bootstrap_from_environment(monkeypatch):
    monkeypatch.setenv("LOGFERRY_BOOTSTRAP_SERVERS", "env-host:9093")
    assert KafkaSettings().bootstrap_servers == "env-host:9093"


def test_sasl_password_comes_from_env_and_is_never_printed(monkeypatch):
    canary = "canary-Pa55w0rd-7f3e"
    monkeypatch.setenv("LOGFERRY_SASL_PASSWORD", canary)
    s = KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256", sasl_username="u")
    conf = s.client_config()
    assert conf["sasl.password"] == canary
    assert canary not in repr(s) and canary not in str(redact(conf))


def test_sasl_without_password_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("LOGFERRY_SASL_PASSWORD", raising=False)
    s = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u")
    with pytest.raises(ConfigError, match="LOGFERRY_SASL_PASSWORD"):
        s.client_config()


def test_sasl_needs_mechanism_and_user(tmp_path):
    p = write(tmp_path, '[kafka]\nsecurity_protocol = "SASL_SSL"\n')
    with pytest.raises(ConfigError, match="sasl_mechanism and sasl_username"):
        load(AgentConfig, p)


def test_check_file_guesses_the_kind(tmp_path):
    p = write(tmp_path, '[processor]\ngroup = "g"\ntopics = ["t"]\n')
    assert type(check_file(p)).__name__ == "ProcessorConfig"
    with pytest.raises(ConfigError, match="pass --kind"):
        check_file(write(tmp_path, "[kafka]\n"))


def test_cli_config_check_exits_2_naming_the_key(tmp_path):
    p = write(tmp_path, '[processor]\ngroup = "g"\ntopics = ["t"]\nconcurency = 4\n')
    proc = subprocess.run([sys.executable, "-m", "logferry", "config", "check", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "processor.concurency: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
