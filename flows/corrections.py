"""Corrections import flow: one file, or every file waiting in ``PROMPT_CAPTURE_HOME/inbox``.

Inbox files are moved to ``inbox/processed/`` when applied and to ``inbox/rejected/`` (with a
``<name>.reason.txt``) when any row is refused; a rejected file changes nothing in the database.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from capture.settings import get_settings
from flows.common import models_dir
from tasks.corrections import (
    ImportResult,
    file_away_task,
    import_corrections_task,
    list_inbox_task,
)

logger = logging.getLogger(__name__)


def _table(results: list[ImportResult]) -> list[dict[str, Any]]:
    return [
        {
            "file": Path(r.file).name,
            "status": "applied" if r.ok else "rejected",
            "applied": r.applied,
            "unchanged": r.unchanged,
            "not_reviewed": r.not_reviewed,
            "rejected_rows": len(r.rejected),
            "first_reason": str(r.rejected[0]) if r.rejected else "",
        }
        for r in results
    ]


@flow(name="import-corrections")
def corrections_flow(
    file: str | None = None,
    allow_new_intent: bool = False,
    inbox: str | None = None,
    database_url: str | None = None,
) -> list[dict[str, Any]]:
    """Import ``file`` (left where it is), or drain the inbox when no file is given.

    Returns one summary per file: applied, unchanged, not_reviewed, rejected (reasons).
    """
    run_logger = get_run_logger()
    inbox_dir = Path(inbox) if inbox else get_settings().inbox_dir
    files = [Path(file)] if file else list_inbox_task(inbox_dir)
    results: list[ImportResult] = []
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such corrections file")
        result = import_corrections_task(
            path,
            url=database_url,
            allow_new_intent=allow_new_intent,
            models_dir=models_dir(),
        )
        results.append(result)
        if not file:
            moved = file_away_task(path, result, inbox_dir)
            run_logger.info("%s -> %s", path.name, moved)
        if result.ok:
            run_logger.info(result.summary())
        else:
            run_logger.warning("%s\n%s", result.summary(), result.reasons())
    if results:
        create_table_artifact(
            key="corrections-import",
            table=_table(results),
            description=f"{len(results)} corrections file(s) imported",
        )
    else:
        run_logger.info("no corrections files in %s", inbox_dir)
    return [r.as_dict() for r in results]
