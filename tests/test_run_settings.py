"""What a flow run works with (home layout, database setting) and the CLI's one error handler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from capture.errors import UserError
from capture.settings import Settings
from tasks.layout import HomeLayout, HomeNotSetUpError, LayoutError
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
    assert run.layout.home == tmp_path / "home"
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


def test_a_home_without_a_registry_is_refused_with_the_fix(tmp_path: Path) -> None:
    missing = HomeLayout(tmp_path / "not-mounted")
    with pytest.raises(HomeNotSetUpError) as raised:
        missing.require_registry()
    message = str(raised.value)
    assert f"{tmp_path / 'not-mounted'} does not exist" in message
    assert "prompt-capture init" in message and "PROMPT_CAPTURE_HOME" in message
    assert isinstance(raised.value, UserError) and not missing.home.exists()  # nothing created
    empty = HomeLayout(tmp_path / "empty")
    empty.home.mkdir()
    with pytest.raises(HomeNotSetUpError, match=r"empty holds no model registry \(models/"):
        empty.require_registry()
    assert empty.create_registry() == empty.models_dir == empty.require_registry()
    assert empty.create_registry() == empty.models_dir  # again: nothing changes
    run = resolve_run_settings(settings(tmp_path), home=str(empty.home))
    assert run.require_registry() == empty.models_dir


REGISTRY_FLOWS = ["weekly-cycle", "retrain", "deploy", "rollback", "ab-check", "stage-candidate"]


def run_registry_flow(name: str, home: Path, url: str) -> Any:
    from flows.ab_check import ab_check_flow, stage_candidate_flow
    from flows.deploy import deploy_flow, rollback_flow
    from flows.retrain import retrain_flow
    from flows.weekly import weekly_cycle

    where = str(home)
    if name == "weekly-cycle":
        return weekly_cycle(home=where, database_url=url, return_state=True)
    if name == "retrain":
        return retrain_flow(home=where, return_state=True)
    if name == "deploy":
        return deploy_flow(home=where, return_state=True)
    if name == "rollback":
        return rollback_flow(home=where, return_state=True)
    if name == "ab-check":
        return ab_check_flow(home=where, database_url=url, return_state=True)
    return stage_candidate_flow("1", home=where, return_state=True)


@pytest.mark.parametrize("name", REGISTRY_FLOWS)
def test_a_flow_on_a_home_nobody_set_up_fails_and_creates_nothing(
    name: str, db_url: str, tmp_path: Path, prefect_harness: None
) -> None:
    """A worker whose PROMPT_CAPTURE_HOME is unset or not the shared one: the run fails at its
    entry naming the home and the fix, and no new, empty registry appears there."""
    home = tmp_path / "worker-home"
    state = run_registry_flow(name, home, db_url)
    assert state.is_failed()
    assert f"PROMPT_CAPTURE_HOME: {home} does not exist" in (state.message or "")
    assert "prompt-capture init" in (state.message or "")
    assert not home.exists()
    home.mkdir()
    (home / "data").mkdir()  # a home with files, but no registry
    state = run_registry_flow(name, home, db_url)
    assert state.is_failed() and "holds no model registry" in (state.message or "")
    assert sorted(p.name for p in home.iterdir()) == ["data"]


def test_init_sets_up_the_home_and_the_cycle_refuses_one_without(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from capture.settings import get_settings
    from deployments.cli import app

    home = tmp_path / "shared-home"
    monkeypatch.setenv("PROMPT_CAPTURE_HOME", str(home))
    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    try:
        refused = CliRunner().invoke(app, ["cycle"])
        assert refused.exit_code == 2
        (line,) = refused.output.strip().splitlines()
        assert line.startswith(f"error: PROMPT_CAPTURE_HOME: {home} does not exist")
        assert "prompt-capture init" in line and not home.exists()
        created = CliRunner().invoke(app, ["init"])
        assert created.exit_code == 0, created.output
        first = json.loads(created.output)
        assert (first["home"], first["created"], first["versions"]) == (str(home), True, [])
        assert "base_train.jsonl" in first["next"] and (home / "models").is_dir()
        again = json.loads(CliRunner().invoke(app, ["init", "--home", str(home)]).output)
        assert again["created"] is False
    finally:
        get_settings.cache_clear()
