from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import ConfigError
from schemas.settings import load_settings
from tests.support import spotlane


def test_with_no_config_everything_lives_in_the_home_folder(spotlane_home: Path) -> None:
    settings = load_settings()

    assert settings.home == spotlane_home.resolve()
    assert settings.database.url == f"sqlite:///{spotlane_home.resolve() / 'spotlane.db'}"
    assert settings.broker.url == "filesystem://localhost//"
    assert settings.storage.hot == (spotlane_home.resolve() / "storage" / "hot").as_uri()
    assert [p.queue for p in settings.gpu_pools] == ["gpu.local"]


def test_environment_variables_override_the_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "spotlane.toml"
    config.write_text("[worker]\ncheckpoint_rows = 10\n[jobs]\nrows_per_shard = 7\n")
    monkeypatch.setenv("SPOTLANE_WORKER__CHECKPOINT_ROWS", "25")

    settings = load_settings()  # ./spotlane.toml is found in the working folder

    assert settings.worker.checkpoint_rows == 25
    assert settings.jobs.rows_per_shard == 7


def test_an_unknown_key_in_the_file_is_refused_by_name(tmp_path: Path) -> None:
    config = tmp_path / "custom.toml"
    config.write_text("[worker]\ncheckpoint_row = 10\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert "worker.checkpoint_row" in str(caught.value)
    assert str(config) in str(caught.value)


def test_a_bad_value_is_refused_with_the_key(tmp_path: Path) -> None:
    config = tmp_path / "custom.toml"
    config.write_text("[jobs]\nrows_per_shard = 0\n")

    with pytest.raises(ConfigError, match="jobs.rows_per_shard"):
        load_settings(config)


def test_an_unknown_environment_variable_is_ignored_with_a_warning_naming_the_likely_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """First hours 12: any unknown SPOTLANE_* variable (the tests' own, compose's
    SPOTLANE_IMAGE) broke every command."""
    monkeypatch.setenv("SPOTLANE_WORKER__CHEKPOINT_ROWS", "3")
    monkeypatch.setenv("SPOTLANE_IMAGE", "ghcr.io/spotlane/spotlane:0.1.0")

    with caplog.at_level("WARNING"):
        settings = load_settings()

    assert settings.worker.checkpoint_rows == 256  # not read as a setting
    assert (
        "SPOTLANE_WORKER__CHEKPOINT_ROWS" in caplog.text
        and "did you mean SPOTLANE_WORKER__CHECKPOINT_ROWS" in caplog.text
    )
    assert "SPOTLANE_IMAGE" not in caplog.text


def test_the_cli_works_with_unknown_variables_in_the_environment(tmp_path: Path) -> None:
    result = spotlane("config", "show", env={"SPOTLANE_TEST_POSTGRES_URL": "postgresql://x", "SPOTLANE_BOGUS": "1"})

    assert result.returncode == 0 and "ignoring environment variable SPOTLANE_BOGUS" in result.stderr


def test_a_heartbeat_slower_than_half_the_lease_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTLANE_WORKER__LEASE_SECONDS", "10")
    monkeypatch.setenv("SPOTLANE_WORKER__HEARTBEAT_SECONDS", "6")

    with pytest.raises(ConfigError, match="heartbeat_seconds"):
        load_settings()


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml"):
        load_settings(tmp_path / "nope.toml")


def test_config_show_prints_effective_settings_with_passwords_masked() -> None:
    result = spotlane(
        "config",
        "show",
        env={"SPOTLANE_DATABASE__URL": "postgresql://spot:hunter2@db.example:5432/spotlane"},
    )

    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    assert "spot:***@db.example" in result.stdout


def test_the_cli_reports_a_config_error_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "spotlane.toml").write_text("[broker]\nurll = 'redis://x'\n")

    result = spotlane("jobs")

    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "broker.urll" in result.stderr
