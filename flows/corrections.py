"""Corrections import flow: one file, or every file waiting in ``PROMPT_CAPTURE_HOME/inbox``.

Inbox files are moved to ``inbox/processed/`` when applied and to ``inbox/rejected/`` (with a
``<name>.reason.txt``) when any row is refused; a rejected file changes nothing in the database.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.entry import open_run
from tasks.corrections import (
    ImportResult,
    file_away_task,
    import_corrections_task,
    import_table,
    list_inbox_task,
)

CORRECTIONS_ARTIFACT_KEY = "corrections-import"


@flow(name="import-corrections")
def corrections_flow(
    file: str | None = None,
    allow_new_intent: bool = False,
    inbox: str | None = None,
    *,
    reviewer: str | None = None,
    home: str | None = None,
    database_url: str | None = None,
    database_secret: str | None = None,
) -> list[ImportResult]:
    """Import ``file`` (left where it is), or drain the inbox (default ``home/inbox``) when no
    file is given. Returns one result per file: applied, unchanged, not_reviewed, rejected.
    ``reviewer``: recorded in the review audit of every applied correction (default: the OS
    user running the import).

    ``home`` defaults to PROMPT_CAPTURE_HOME; the database to ``database_url`` (no password),
    the Secret block ``database_secret``, PROMPT_CAPTURE_DATABASE_URL, or the home's SQLite file.
    """
    run_logger = get_run_logger()
    run = open_run(home, database_url, database_secret)
    inbox_dir = Path(inbox) if inbox else run.layout.inbox_dir
    single = run.layout.optional_file(file)
    url = run.require_database()
    results: list[ImportResult] = []
    for path in [single] if single else list_inbox_task(inbox_dir):
        result = import_corrections_task(
            path,
            url=url,
            allow_new_intent=allow_new_intent,
            models_dir=run.layout.models_dir,
            reviewer=reviewer,
        )
        results.append(result)
        if single is None:
            run_logger.info("%s -> %s", path.name, file_away_task(path, result, inbox_dir))
        if result.ok:
            run_logger.info(result.summary())
        else:
            run_logger.warning("%s\n%s", result.summary(), result.reasons())
    if results:
        create_table_artifact(
            key=CORRECTIONS_ARTIFACT_KEY,
            table=import_table(results),
            description=f"{len(results)} corrections file(s) imported",
        )
    else:
        run_logger.info("no corrections files in %s", inbox_dir)
    return results
