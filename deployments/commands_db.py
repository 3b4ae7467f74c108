"""``prompt-capture db ...``: the database schema (Alembic migrations) and the stats rollup."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deployments.cli_support import (
    OptionError,
    command_group,
    console,
    require_database,
    require_database_home,
)

db_app = command_group("Database schema (Alembic migrations).")


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

    missing = _missing_database_file()
    if missing is not None:
        raise OptionError(
            f"database file {missing} does not exist, so there is nothing to downgrade; check "
            "PROMPT_CAPTURE_HOME and PROMPT_CAPTURE_DATABASE_URL"
        )
    db.downgrade(revision=revision)
    console.print(f"database at revision [bold]{db.current_revision() or 'base'}[/bold]")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database and the one this code needs (an SQLite file
    that does not exist is revision none; it is not created)."""
    from capture import db

    missing = _missing_database_file()
    if missing is not None:
        console.print(
            f"current: none (no database file {missing} yet: `prompt-capture db upgrade` "
            f"creates it); head: {db.head_revision()}"
        )
        return
    console.print(f"current: {db.current_revision() or 'none'}; head: {db.head_revision()}")


def _missing_database_file() -> Path | None:
    """The settings' SQLite file when it does not exist (opening it would create it), else
    None. A home that does not exist is refused (``require_database_home``)."""
    from capture import db
    from capture.settings import get_settings

    path = db.sqlite_path(require_database_home(get_settings()))
    return path if path is not None and not path.exists() else None


@db_app.command("refresh-stats")
def db_refresh_stats(
    wait_timeout: Annotated[
        float,
        typer.Option(
            "--wait-timeout",
            min=0,
            help="Seconds to wait for transactions writing the logs (PostgreSQL).",
        ),
    ] = 30.0,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Drop the rollup and recompute every hour.")
    ] = False,
) -> None:
    """Bring the monitoring rollup up to date (the hourly monitor flow does it every run).

    The confidence / intent / success-rate statistics read it for closed hours and the raw
    table for the rest; they are exact either way, the rollup keeps them fast.
    """
    from sqlalchemy.orm import Session

    from capture import db, stats_rollup
    from capture.settings import get_settings

    require_database(get_settings())
    with Session(db.get_sync_engine()) as session:
        if rebuild:
            stats_rollup.reset_prompt_stats(session)
        result = stats_rollup.refresh_prompt_stats(session=session, wait_timeout=wait_timeout)
        session.commit()
    if result.writers_left:
        console.print(
            f"[yellow]{result.writers_left} transaction(s) were still writing the logs after "
            f"{wait_timeout:g} s: the watermark did not advance; run it again later[/yellow]"
        )
    watermark = "none" if result.watermark is None else result.watermark.isoformat()
    console.print(
        f"statistics rollup: hours before [bold]{watermark}[/bold] rolled up "
        f"({'full' if result.full else 'incremental'}: {result.dirty_hours} dirty hours, "
        f"{result.hourly_rows} hourly rows, {result.daily_rows} daily rows written)"
    )


def register(app: typer.Typer) -> None:
    """Add the ``db`` command group to ``app``."""
    app.add_typer(db_app, name="db")
