"""Settings: defaults at localhost, TROPICAL_* variables over them, CLI flags over those."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from tropical.cli import app
from tropical.settings import Settings


def test_defaults_point_at_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TROPICAL_BROKER_URL", "TROPICAL_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert "127.0.0.1:5672" in settings.broker_url
    assert "127.0.0.1:6379" in settings.redis_url


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROPICAL_BROKER_URL", "memory://")
    monkeypatch.setenv("TROPICAL_PREFETCH", "4")
    monkeypatch.setenv("TROPICAL_DEFAULT_TPOT_SLO_MS", "75.5")
    settings = Settings()
    assert (settings.broker_url, settings.prefetch, settings.default_tpot_slo_ms) == ("memory://", 4, 75.5)


def test_overrides_win_and_unset_flags_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROPICAL_NAMESPACE", "from-env")
    monkeypatch.setenv("TROPICAL_PREFETCH", "4")
    settings = Settings().with_overrides(namespace="from-flag", prefetch=None)
    assert (settings.namespace, settings.prefetch) == ("from-flag", 4)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("TROPICAL_BROKER_URL", "http://127.0.0.1", "broker_url"),
        ("TROPICAL_REDIS_URL", "postgres://x", "redis_url"),
        ("TROPICAL_PREFETCH", "0", "prefetch"),
        ("TROPICAL_PREFETCH", "many", "prefetch"),
        ("TROPICAL_NAMESPACE", "has space", "namespace"),
        ("TROPICAL_LOG_LEVEL", "LOUD", "log_level"),
    ],
)
def test_bad_values_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=says):
        Settings()


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValidationError, match="prefech"):
        Settings(prefech=3)  # type: ignore[call-arg]


def test_cli_flags_override_environment_and_mask_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROPICAL_REDIS_URL", "redis://:hunter2@cache:6379/1")
    monkeypatch.setenv("TROPICAL_NAMESPACE", "env-ns")
    result = CliRunner().invoke(app, ["--namespace", "flag-ns", "--broker-url", "amqp://u:s3cret@mq:5672/", "settings"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["namespace"] == "flag-ns"
    assert shown["broker_url"] == "amqp://u:***@mq:5672/"
    assert shown["redis_url"] == "redis://:***@cache:6379/1"
    assert "s3cret" not in result.output and "hunter2" not in result.output


def test_cli_reports_bad_settings_without_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TROPICAL_PREFETCH", "-1")
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 2
    assert "prefetch" in result.output
    assert "Traceback" not in result.output


def test_queue_names_live_in_the_namespace() -> None:
    assert Settings(namespace="staging").queue("requests") == "staging.requests"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE"),
        ({"MASTER_ADDR": "h", "MASTER_PORT": "29500", "RANK": "one", "WORLD_SIZE": "2"}, "must be integers"),
        ({"MASTER_ADDR": "h", "MASTER_PORT": "29500", "RANK": "2", "WORLD_SIZE": "2"}, "no rank 2 in a group of 2"),
    ],
)
def test_an_nccl_worker_without_its_process_group_is_refused(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], message: str) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["serve", "prefill", "--engine", "tiny", "--kv-transport", "nccl"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and message in result.output, result.output


def test_an_unknown_kv_transport_is_refused() -> None:
    result = CliRunner().invoke(app, ["serve", "decode", "--kv-transport", "carrier-pigeon"], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "is not host, redis, cuda_ipc or nccl" in result.output, result.output


def test_secrets_files_fill_what_the_environment_does_not(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TROPICAL_BROKER_URL", raising=False)
    monkeypatch.delenv("TROPICAL_API_KEYS", raising=False)
    (tmp_path / "TROPICAL_BROKER_URL").write_text("amqp://svc:s3cret@broker:5672/")
    (tmp_path / "TROPICAL_API_KEYS").write_text("k1, k2,")
    settings = Settings(_secrets_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.broker_url == "amqp://svc:s3cret@broker:5672/"
    assert settings.api_key_set() == {"k1", "k2"}
    assert "s3cret" not in str(settings.redacted()) and "k1" not in str(settings.redacted())
    monkeypatch.setenv("TROPICAL_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
    assert Settings(_secrets_dir=tmp_path).broker_url == "amqp://guest:guest@127.0.0.1:5672/"  # type: ignore[call-arg]
