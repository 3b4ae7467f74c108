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


def test_candidate_commands_refuse_a_home_without_a_registry(home: Path) -> None:
    runner = CliRunner()
    for args in (["candidate", "set", "1"], ["candidate", "clear"]):
        result = runner.invoke(app(), args)
        assert result.exit_code == 2, result.output
        line = result.output.strip()
        assert "\n" not in line
        assert f"{args[0]} {args[1]}: there is no registry at {home / 'models'}" in line
        assert "`prompt-capture init`" in line
    assert not home.exists()  # nothing created: deploy and the flows still refuse this home


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--mode", "canary", "--share", "2"],
            "--share: expected the canary's share of users, "
            "a number > 0 and <= 1 (0.1 = 10%), found 2",
        ),
        (["--mode", "canary", "--share", "0"], "--share: expected the canary's share"),
        (["--mode", "shadow", "--share", "0.5"], "--share: applies to --mode canary only"),
        (["--share", "0.5"], "found --share 0.5 with --mode shadow"),
    ],
)
def test_candidate_set_checks_share_first_naming_the_flag(
    home: Path, args: list[str], expected: str
) -> None:
    fake_registry(home)
    result = CliRunner().invoke(app(), ["candidate", "set", "2", *args])
    assert result.exit_code == 2 and expected in result.output, result.output
    assert "models/candidate" not in result.output  # not the pointer file's error
    assert not (home / "models" / "candidate").exists()


def test_candidate_set_help_shows_the_canary_default(home: Path) -> None:
    # typer's help box, wide enough that no option's help is wrapped
    result = CliRunner().invoke(app(), ["candidate", "set", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "(default: 0.1)" in result.output


def test_setting_the_same_candidate_again_keeps_its_test(home: Path) -> None:
    from tasks.ab_readout import ab_tests
    from tasks.registry import history

    fake_registry(home)
    models = home / "models"
    runner = CliRunner()
    first = runner.invoke(app(), ["candidate", "set", "2", "--mode", "canary"])
    assert first.exit_code == 0 and "share 10.0% of users" in first.output, first.output
    (since,) = [t.since for t in ab_tests(models)]
    assert since is not None
    again = runner.invoke(app(), ["candidate", "set", "2", "--mode", "canary", "--share", "0.1"])
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())
    assert (
        "candidate 2 is already under test in canary, share 10.0% of users, "
        f"since {since.isoformat()}; nothing changed"
    ) in said
    assert [h["action"] for h in history(models)].count("candidate-set") == 1
    # a new share keeps the test and its start; shadow -> canary would start a new one
    wider = runner.invoke(app(), ["candidate", "set", "2", "--mode", "canary", "--share", "0.3"])
    assert wider.exit_code == 0 and "share 30.0% of users" in wider.output, wider.output
    assert history(models)[-1]["action"] == "candidate-share"
    (test,) = ab_tests(models)
    assert (test.since, test.share, test.until) == (since, 0.3, None)
    shadow = runner.invoke(app(), ["candidate", "set", "2", "--mode", "shadow"])
    assert shadow.exit_code == 0, shadow.output
    assert [t.mode for t in ab_tests(models)] == ["canary", "shadow"]
