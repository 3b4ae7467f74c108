"""``prompt-capture spool ...``: what the capture spool holds, per database, and what to do with
it (a thin layer over the typed API of :mod:`capture.spool`). Added by :func:`register`:

- ``prompt-capture spool list [--json]`` — the segments under ``PROMPT_CAPTURE_HOME/spool``,
  grouped by the database they were written for: group id, rows, updates, time range, database
- ``prompt-capture spool replay ID --database-url URL [--force]`` — write group ID into the
  database URL names (refused unless it is the group's database, or with ``--force``; the
  group ``unknown``, written before spools recorded their database, always needs ``--force``)
- ``prompt-capture spool discard ID --yes`` — delete group ID's segments (their rows are lost)

A mistake (unknown group, wrong database, missing ``--yes``, unmigrated database) is a
``capture.errors.UserError``: the app's handler prints one line and exits 2. A database that
cannot be reached is one line and exit 1 (nothing is lost: unreplayed segments stay).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from deployments.cli_support import (
    AsJson,
    command_group,
    print_error,
    print_json,
    require_home,
)

spool_app = command_group(
    "The capture spool: rows kept while a database was unreachable, per database."
)

UNREACHABLE_EXIT_CODE = 1


def _group_record(group: Any, current: Any) -> dict[str, Any]:
    identity = group.identity
    return {
        "id": group.key,
        "database": None if identity is None else identity.as_record(),
        "database_text": group.database(),
        "this_database": identity is not None and identity.matches(current),
        "rows": group.inserts,
        "updates": group.updates,
        "segments": [str(s.path) for s in group.segments],
        "in_use": group.in_use,
        "first_at": group.first_at,
        "last_at": group.last_at,
    }


@spool_app.command("list")
def spool_list(as_json: AsJson = False) -> None:
    """List the spool's segments grouped by the database they were written for."""
    from capture.db_identity import identity_from_url
    from capture.settings import get_settings
    from capture.spool import list_spool

    settings = get_settings()
    require_home(settings)
    groups = list_spool(settings.spool_dir)
    current = identity_from_url(settings.resolved_database_url)
    if as_json:
        print_json([_group_record(g, current) for g in groups])
        return
    if not groups:
        typer.echo(f"the spool {settings.spool_dir} is empty")
        return
    typer.echo(f"spool {settings.spool_dir}: {len(groups)} group(s)")
    for group in groups:
        mark = (
            "  <- the configured database"
            if group.identity is not None and group.identity.matches(current)
            else ""
        )
        typer.echo(f"  {group.summary()}{mark}")
    typer.echo(
        "replay a group with `prompt-capture spool replay ID --database-url URL`, delete it "
        "with `prompt-capture spool discard ID --yes`"
    )


@spool_app.command("replay")
def spool_replay(
    group_id: Annotated[str, typer.Argument(help="The group id `spool list` shows.")],
    database_url: Annotated[
        str,
        typer.Option(
            "--database-url",
            help="The database to write the group into (named explicitly, never implied).",
        ),
    ],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Write the group even though it was not written for this database."
        ),
    ] = False,
) -> None:
    """Replay one group's segments into the database URL names (idempotent)."""
    import psycopg

    from capture.settings import get_settings
    from capture.spool import REJECTED_FILE, replay_spool
    from capture.spool_replay import ConnectionLostError

    settings = get_settings()
    try:
        done = asyncio.run(
            replay_spool(
                settings.spool_dir,
                group_id,
                database_url,
                force=force,
                rejected_path=settings.home / REJECTED_FILE,
                batch_size=settings.batch_size,
            )
        )
    except (ConnectionLostError, psycopg.OperationalError, OSError) as exc:
        print_error(
            f"cannot reach the database ({type(exc).__name__}: {exc}); nothing was "
            "lost, the segments not yet replayed stay in the spool: run the replay again"
        )
        raise typer.Exit(code=UNREACHABLE_EXIT_CODE) from None
    typer.echo(
        f"replayed group {done.key} into {done.target.describe()}: {done.segments} segment(s), "
        f"{done.applied} operations applied, {done.rejected} rejected"
        + (f" (see {settings.home / REJECTED_FILE})" if done.rejected else "")
    )
    if done.in_use:
        typer.echo(
            f"{len(done.in_use)} segment(s) are held by a running process and were left: "
            + ", ".join(p.name for p in done.in_use)
        )


@spool_app.command("discard")
def spool_discard(
    group_id: Annotated[str, typer.Argument(help="The group id `spool list` shows.")],
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: the group's rows are deleted for good.")
    ] = False,
) -> None:
    """Delete one group's segments (their rows never reach any database)."""
    from capture.settings import get_settings
    from capture.spool import SpoolError, discard_spool, find_group, list_spool

    settings = get_settings()
    if not yes:
        group = find_group(list_spool(settings.spool_dir), group_id)
        raise SpoolError(
            f"discarding group {group.key} deletes {group.inserts} rows and {group.updates} "
            f"updates for {group.database()} for good; add --yes to confirm"
        )
    done = discard_spool(settings.spool_dir, group_id)
    typer.echo(
        f"discarded group {done.key}: {done.segments} segment(s), {done.inserts} rows and "
        f"{done.updates} updates deleted"
    )
    if done.in_use:
        typer.echo(
            f"{len(done.in_use)} segment(s) are held by a running process and were kept: "
            + ", ".join(p.name for p in done.in_use)
        )


def register(app: typer.Typer) -> None:
    """Add the ``spool`` command group to ``app`` (the ``prompt-capture`` app, whose handler
    turns a ``UserError`` into one line and exit code 2)."""
    app.add_typer(spool_app, name="spool")
