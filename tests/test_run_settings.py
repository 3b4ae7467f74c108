"""What a flow run works with (home layout, database setting) and the CLI's one error handler."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from capture.errors import UserError
from capture.settings import Settings
from tasks.layout import HomeLayout, LayoutError
from tasks.run_settings import (
    DatabaseSettingError,
    configured_database_url,
    has_password,
    resolve_run_settings,
)


def settings(tmp_path: Path, database_url: str = "") -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url)


def test_a_run_defaults_to_the_environments_home_and_its_sqlite_file(tmp_path: Path) -> None:
    run = resolve_run_settings(settings(tmp_path))
    assert run.home == tmp_path / "home"
    assert run.database_url == f"sqlite:///{(tmp_path / 'home' / 'prompt_capture.db').resolve()}"
    other = resolve_run_settings(settings(tmp_path), home=str(tmp_path / "other"))
    assert other.layout.models_dir == tmp_path / "other" / "models"
    assert other.settings.home == tmp_path / "other"  # what the service would spool under
    assert other.settings.resolved_database_url == other.database_url
    env_db = resolve_run_settings(settings(tmp_path, "postgresql://u:secret@db/x"))
    assert env_db.database_url == "postgresql+psycopg://u:secret@db/x"  # the environment may


def test_a_url_with_a_password_is_refused_as_a_parameter(tmp_path: Path) -> None:
    assert has_password("postgresql://u:secret@db/x") and not has_password("sqlite:///a.db")
    with pytest.raises(DatabaseSettingError, match="carries a password") as raised:
        resolve_run_settings(settings(tmp_path), database_url="postgresql://u:s3cr3t@db/x")
    assert "s3cr3t" not in str(raised.value) and "***" in str(raised.value)
    assert isinstance(raised.value, UserError)
    ok = resolve_run_settings(settings(tmp_path), database_url="postgresql://u@db/x")
    assert ok.database_url == "postgresql+psycopg://u@db/x"
    with pytest.raises(DatabaseSettingError, match="at most one"):
        configured_database_url(settings(tmp_path), database_url="sqlite://", database_secret="s")


def test_a_secret_block_names_the_database(tmp_path: Path, prefect_harness: None) -> None:
    from prefect.blocks.system import Secret
    from pydantic import SecretStr

    Secret(value=SecretStr("postgresql://u:secret@db/x")).save("pc-test-db", overwrite=True)
    try:
        run = resolve_run_settings(settings(tmp_path), database_secret="pc-test-db")
        assert run.database_url == "postgresql+psycopg://u:secret@db/x"
    finally:
        Secret.delete("pc-test-db")
    with pytest.raises(DatabaseSettingError, match="no Prefect Secret block named 'nope'"):
        resolve_run_settings(settings(tmp_path), database_secret="nope")


def test_the_layout_names_every_place_and_the_missing_export(tmp_path: Path) -> None:
    layout = HomeLayout(tmp_path)
    assert layout.base_file("val") == tmp_path / "data" / "base_val.jsonl"
    assert layout.optional_file(None, "val") is None
    layout.base_file("val").parent.mkdir(parents=True)
    layout.base_file("val").write_text("", encoding="utf-8")
    assert layout.optional_file(None, "val") == layout.base_file("val")
    with pytest.raises(LayoutError, match="not found; pass an existing file"):
        layout.optional_file(tmp_path / "missing.jsonl")
    with pytest.raises(LayoutError, match="no retraining export"):
        layout.latest_training_export()
    layout.exports_dir.mkdir()
    for name in ("retraining-1.jsonl", "retraining-2.jsonl", "retraining-2.holdout.jsonl"):
        (layout.exports_dir / name).write_text("", encoding="utf-8")
    assert layout.latest_training_export().name == "retraining-2.jsonl"


def test_the_cli_turns_a_user_error_into_one_line_and_exit_code_2() -> None:
    from deployments.cli import UserErrorGroup, app

    result = CliRunner().invoke(app, ["export", "--mode", "bogus"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --mode: expected 'retraining' or 'review', found 'bogus'"
    ]
    bad_json = CliRunner().invoke(app, ["cycle", "--hyperparameters", "{"])
    assert bad_json.exit_code == 2
    assert "--hyperparameters: expected a JSON object" in bad_json.output

    other = typer.Typer(cls=UserErrorGroup)

    @other.command("fail")
    def fail(kind: str) -> None:
        if kind == "user":
            raise UserError("data.jsonl:3: field 'label': expected a string; fix the line")
        raise RuntimeError("a bug")

    @other.command("ok")
    def ok() -> None:
        pass

    user = CliRunner().invoke(other, ["fail", "user"])
    assert (user.exit_code, user.output.strip()) == (
        2,
        "error: data.jsonl:3: field 'label': expected a string; fix the line",
    )
    bug = CliRunner().invoke(other, ["fail", "bug"])
    assert bug.exit_code == 1 and isinstance(bug.exception, RuntimeError)  # keeps its traceback
