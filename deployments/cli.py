"""The ``prompt-capture`` command line (typer). Heavy modules are imported inside each command."""

from __future__ import annotations

import logging
import os

import typer
from rich.console import Console

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Prompt Capture: the learning loop of an intent classifier.",
)
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
app.add_typer(db_app, name="db")
console = Console()


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations (to the database in PROMPT_CAPTURE_DATABASE_URL, SQLite by default)."""
    from capture import db

    db.upgrade(revision=revision)
    console.print(f"database at revision [bold]{db.current_revision()}[/bold]")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. base.")) -> None:
    """Revert migrations down to REVISION."""
    from capture import db

    db.downgrade(revision=revision)
    console.print(f"database at revision [bold]{db.current_revision() or 'base'}[/bold]")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database and the one this code needs."""
    from capture import db

    console.print(f"current: {db.current_revision() or 'none'}; head: {db.head_revision()}")


def main() -> None:
    app()
