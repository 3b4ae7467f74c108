"""``prompt-capture db ...``: the database schema (Alembic migrations) and the stats rollup."""

from __future__ import annotations

from typing import Annotated

import typer

from deployments.cli_support import console

db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")


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

    db.ensure_migrated()
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
