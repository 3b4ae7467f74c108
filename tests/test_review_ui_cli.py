"""The workbench's commands (deployments/review_commands.py) through a typer app: users with the
password from standard input only, opening and listing rounds."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from capture import db
from capture.settings import get_settings
from deployments.cli import UserErrorGroup
from deployments.review_commands import register
from tasks.review_users import login
from tests.test_review_ui_support import NOW, clean_workbench_tables, seed_logs


@pytest.fixture
def cli(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[typer.Typer]:
    clean_workbench_tables(sqlite_url)
    with db.get_sync_engine(sqlite_url).begin() as conn:
        conn.exec_driver_sql("DELETE FROM nlu_prompt_logs")
    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("PROMPT_CAPTURE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    app = typer.Typer(cls=UserErrorGroup)  # the app's handler: a UserError is one line, exit 2

    @app.callback()
    def _root() -> None:
        """prompt-capture"""

    register(app)
    yield app
    get_settings.cache_clear()


def test_review_user_add_reads_the_password_from_stdin(cli: typer.Typer, sqlite_url: str) -> None:
    runner = CliRunner()
    refused = runner.invoke(cli, ["review-user", "add", "alice", "--role", "reviewer"])
    assert refused.exit_code == 2 and "--password-stdin" in refused.output
    added = runner.invoke(
        cli,
        ["review-user", "add", "alice", "--role", "admin", "--password-stdin"],
        input="s3cret pass phrase\n",
    )
    assert added.exit_code == 0, added.output
    again = runner.invoke(
        cli, ["review-user", "add", "alice", "--password-stdin"], input="another one\n"
    )
    assert again.exit_code == 2 and "exists already" in again.output
    with db.get_sync_engine(sqlite_url).begin() as conn:
        user = login(conn, "alice", "s3cret pass phrase", client="cli-test", now=lambda: NOW)
    assert user is not None and user.role == "admin"
    listed = runner.invoke(cli, ["review-user", "list"])
    assert listed.output.split() == ["alice", "admin", "active"]


def test_review_round_open_and_list(cli: typer.Typer, sqlite_url: str) -> None:
    seed_logs(sqlite_url, 5, now=datetime.now(UTC))
    runner = CliRunner()
    opened = runner.invoke(cli, ["review-round", "open", "--name", "week 48", "--limit", "4"])
    assert opened.exit_code == 0, opened.output
    assert "4 prompts to review" in opened.output
    listed = runner.invoke(cli, ["review-round", "list"])
    assert "week 48" in listed.output and "left 4" in listed.output


def test_serve_review_ui_starts_the_workbench_beside_the_schedules(
    cli: typer.Typer, sqlite_url: str, tmp_path: Path
) -> None:
    """`prompt-capture serve --review-ui --review-host H --review-port P` starts the workbench
    (in a thread) before serving the deployments; the thread really serves the login page."""
    import time
    import urllib.request

    import deployments.serve
    import review_ui.server
    from deployments.cli import app
    from review_ui.server import free_port, serve_in_background
    from tests.test_review_ui_support import settings_for

    started: list[tuple[str, int]] = []
    served: list[object] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            review_ui.server,
            "serve_in_background",
            lambda settings, *, host, port: started.append((host, port)),
        )
        mp.setattr(deployments.serve, "serve_all", lambda only=None: served.append(only))
        result = CliRunner().invoke(
            app, ["serve", "--review-ui", "--review-host", "127.0.0.2", "--review-port", "8799"]
        )
    assert result.exit_code == 0, result.output
    assert started == [("127.0.0.2", 8799)] and served == [None]

    port = free_port()
    server = serve_in_background(settings_for(sqlite_url, tmp_path / "home"), port=port)
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login") as page:
            assert page.status == 200 and b"password" in page.read().lower()
    finally:
        server.should_exit = True
