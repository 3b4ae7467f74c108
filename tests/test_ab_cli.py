"""``prompt-capture candidate set|clear|show`` and ``ab [--json]`` (deployments.commands_ab),
on an app built like deployments.cli's (the same UserError handler: one line, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from deployments import commands_ab
from deployments.cli import UserErrorGroup
from tests.capture_helpers import fake_registry


def app() -> typer.Typer:
    cli = typer.Typer(cls=UserErrorGroup)
    commands_ab.register(cli)
    return cli


def test_candidate_commands_and_readout(
    home: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from capture.settings import get_settings

    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    fake_registry(home)
    runner = CliRunner()
    result = runner.invoke(app(), ["candidate", "set", "2", "--mode", "canary", "--share", "0.2"])
    assert result.exit_code == 0, result.output
    assert "canary, share 20.0% of users" in result.output
    shown = runner.invoke(app(), ["candidate", "show"])
    assert json.loads(shown.output) == {"version": "2", "mode": "canary", "share": 0.2}
    readout = runner.invoke(app(), ["ab", "--json"])
    assert readout.exit_code == 0, readout.output
    data = json.loads(readout.output)
    assert (data["candidate"], data["champion"], data["decision"]) == ("2", "1", "keep-testing")
    bad = runner.invoke(app(), ["candidate", "set", "1", "--mode", "shadow"])
    assert bad.exit_code == 2 and "is the serving champion" in bad.output
    bad = runner.invoke(app(), ["candidate", "set", "2", "--mode", "blue"])
    assert bad.exit_code == 2 and "--mode: expected one of shadow, canary" in bad.output
    cleared = runner.invoke(app(), ["candidate", "clear", "--reason", "done"])
    assert cleared.exit_code == 0 and "candidate 2 (canary) cleared" in cleared.output
    assert "No candidate under test." in runner.invoke(app(), ["ab"]).output
    get_settings.cache_clear()
