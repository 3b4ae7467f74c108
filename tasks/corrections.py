"""Corrections import: reviewed files (the spec's ``review`` format) back into the database.

The file format and its row rules are :mod:`tasks.review_file`'s (:func:`read_corrections`);
here the rows are checked against the database — the logged prompt exists, the intent is in the
catalog (the serving model's labels, else the intents the logs know) unless
``allow_new_intent``, one prompt is not corrected to two intents — and applied all or nothing, in
one transaction: one bad row and nothing changes. Rows whose ``corrected_intent`` is empty were
not reviewed and are skipped (not rejected). Importing the same file twice changes nothing the
second time (``unchanged``). The statements are ``capture.offline_statements``'
``select_logs_by_id`` and ``select_known_intents`` and ``capture.statements.update_correction``.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Connection

from capture import statements
from capture.db import database_url, get_sync_engine
from capture.files import make_private_dir, write_text_atomic
from capture.model_dir import METADATA_FILE
from capture.offline_statements import ID_CHUNK, select_known_intents, select_logs_by_id
from tasks.registry import current_model_dir, model_labels
from tasks.retry import retry_on_io
from tasks.review_file import (
    MAX_NOTES_CHARS,
    Correction,
    RowProblem,
    corrections_from_rows,
    parse_corrections,
    read_corrections,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_NOTES_CHARS",
    "Correction",
    "ImportResult",
    "RowProblem",
    "file_away",
    "file_away_task",
    "import_corrections",
    "import_corrections_task",
    "import_table",
    "inbox_files",
    "intent_catalog",
    "known_intents",
    "list_inbox_task",
    "parse_corrections",
    "validate_correction_rows",
]


@dataclass(slots=True)
class ImportResult:
    """What importing one file did. ``applied`` > 0 only when ``rejected`` is empty."""

    file: str
    applied: int = 0
    unchanged: int = 0
    not_reviewed: int = 0
    rejected: list[RowProblem] = field(default_factory=list)
    applied_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejected

    def summary(self) -> str:
        status = "applied" if self.ok else "REJECTED (nothing applied)"
        return (
            f"{self.file}: {status}; applied {self.applied}, unchanged {self.unchanged}, "
            f"not reviewed {self.not_reviewed}, rejected rows {len(self.rejected)}"
        )

    def reasons(self) -> str:
        return "\n".join(str(p) for p in self.rejected)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: ``file``, the three counts, and ``rejected`` (one line per problem)."""
        counts = {name: getattr(self, name) for name in ("applied", "unchanged", "not_reviewed")}
        return {"file": self.file, **counts, "rejected": [str(p) for p in self.rejected]}


def _fetch_logs(conn: Connection, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Any]:
    found: dict[uuid.UUID, Any] = {}
    unique = list(dict.fromkeys(ids))
    for start in range(0, len(unique), ID_CHUNK):
        for row in conn.execute(select_logs_by_id(unique[start : start + ID_CHUNK])):
            found[row.id] = row
    return found


def known_intents(conn: Connection) -> set[str]:
    """Every intent the database has seen predicted or corrected."""
    return {x for x in conn.execute(select_known_intents()).scalars() if x}


def intent_catalog(conn: Connection, models_dir: Path | None) -> set[str]:
    """The intents a correction may name: the serving model's labels when a model is deployed,
    otherwise every intent the database knows."""
    model_dir = current_model_dir(models_dir) if models_dir is not None else None
    if model_dir is not None and (model_dir / METADATA_FILE).exists():
        return set(model_labels(model_dir))
    return known_intents(conn)


def _validate(
    corrections: list[Correction],
    logs: dict[uuid.UUID, Any],
    catalog: set[str],
    allow_new_intent: bool,
) -> list[RowProblem]:
    problems: list[RowProblem] = []
    by_prompt: dict[str, list[Correction]] = {}
    for c in corrections:
        log = logs.get(c.log_id)
        if log is None:
            problems.append(
                RowProblem(
                    c.row,
                    "id",
                    "no logged prompt has this id; was the file exported from this database?",
                    str(c.log_id),
                )
            )
            continue
        if not allow_new_intent and c.corrected_intent not in catalog:
            problems.append(
                RowProblem(
                    c.row,
                    "corrected_intent",
                    f"{c.corrected_intent!r} is not a known intent (catalog: "
                    f"{', '.join(sorted(catalog)) or 'empty'}); fix the spelling, or pass "
                    "--allow-new-intent to add a new intent",
                    str(c.log_id),
                )
            )
        by_prompt.setdefault(" ".join(log.prompt.lower().split()), []).append(c)
    for group in by_prompt.values():
        intents = {c.corrected_intent for c in group}
        if len(intents) > 1:
            rows = ", ".join(str(c.row) for c in group)
            for c in group:
                problems.append(
                    RowProblem(
                        c.row,
                        "corrected_intent",
                        f"the same prompt is corrected to different intents "
                        f"({', '.join(sorted(intents))}) in rows {rows}; keep one",
                        str(c.log_id),
                    )
                )
    return sorted(problems, key=lambda p: p.row)


def import_corrections(
    path: Path,
    *,
    url: str | None = None,
    allow_new_intent: bool = False,
    catalog: set[str] | None = None,
    models_dir: Path | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> ImportResult:
    """Validate ``path`` and apply its corrections in one transaction, all or nothing.

    ``catalog`` defaults to :func:`intent_catalog` (the serving model's labels under
    ``models_dir``, else the intents in the database).
    """
    result = ImportResult(file=str(path))
    corrections, result.not_reviewed, problems = read_corrections(path)
    result.rejected.extend(problems)
    with get_sync_engine(database_url(url)).begin() as conn:
        logs = _fetch_logs(conn, (c.log_id for c in corrections))
        allowed = catalog if catalog is not None else intent_catalog(conn, models_dir)
        result.rejected.extend(_validate(corrections, logs, allowed, allow_new_intent))
        if result.rejected:
            result.rejected.sort(key=lambda p: p.row)
            logger.warning("%s", result.summary())
            return result
        seen: set[uuid.UUID] = set()
        changes: list[dict[str, Any]] = []
        for c in corrections:
            if c.log_id in seen:
                result.unchanged += 1
                continue
            seen.add(c.log_id)
            log = logs[c.log_id]
            if log.corrected_intent == c.corrected_intent and log.correction_notes == c.notes:
                result.unchanged += 1
                continue
            changes.append({"id": c.log_id, "intent": c.corrected_intent, "notes": c.notes})
        stamp = now()
        for change in changes:
            conn.execute(
                statements.update_correction(
                    change["id"],
                    corrected_intent=change["intent"],
                    correction_notes=change["notes"],
                    corrected_at=stamp,
                )
            )
        result.applied = len(changes)
        result.applied_ids = [str(c["id"]) for c in changes]
    logger.info("%s", result.summary())
    return result


def inbox_files(inbox: Path) -> list[Path]:
    """The files waiting in the inbox (``*.json`` and ``*.jsonl``), oldest name first."""
    if not inbox.is_dir():
        return []
    return sorted(p for p in inbox.iterdir() if p.is_file() and p.suffix in {".json", ".jsonl"})


def _unique_target(folder: Path, name: str) -> Path:
    make_private_dir(folder)  # reviewed files hold raw prompts
    target = folder / name
    if not target.exists():
        return target
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return folder / f"{Path(name).stem}.{stamp}{Path(name).suffix}"


def file_away(path: Path, result: ImportResult, inbox: Path) -> Path:
    """Move an imported inbox file to ``processed/``, or a rejected one to ``rejected/`` with a
    ``<name>.reason.txt`` next to it (both folders and the reason are private: 0700/0600).
    Returns the new path."""
    folder = inbox / ("processed" if result.ok else "rejected")
    target = _unique_target(folder, path.name)
    shutil.move(str(path), target)
    if not result.ok:
        reason = target.with_name(target.name + ".reason.txt")
        write_text_atomic(reason, result.summary() + "\n" + result.reasons() + "\n", private=True)
    return target


def import_table(results: Sequence[ImportResult]) -> list[dict[str, Any]]:
    """Rows for the Prefect table artifact of a corrections import: one per file."""
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


import_corrections_task = task(
    cache_policy=NO_CACHE,
    name="import-corrections",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
)(import_corrections)
list_inbox_task = task(cache_policy=NO_CACHE, name="list-inbox")(inbox_files)
file_away_task = task(
    cache_policy=NO_CACHE,
    name="file-away",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_on_io,
)(file_away)


def validate_correction_rows(
    conn: Connection,
    rows: Sequence[dict[str, Any]],
    *,
    catalog: set[str],
    allow_new_intent: bool = False,
) -> tuple[list[Correction], list[RowProblem]]:
    """Validate corrections made outside a file (the review workbench) with the import's rules.

    ``rows`` are review-file objects ``{"id", "corrected_intent", "notes"}``; they go through
    exactly :func:`parse_corrections` and the checks of :func:`import_corrections` (the logged
    prompt exists, the intent is in ``catalog`` unless ``allow_new_intent``, one prompt is not
    corrected to two intents). Returns the parsed corrections (an empty ``corrected_intent`` is
    "not reviewed" and dropped) and the problems by row (1-based); writes nothing.
    """
    corrections, _not_reviewed, problems = corrections_from_rows(enumerate(rows, start=1))
    logs = _fetch_logs(conn, (c.log_id for c in corrections))
    problems.extend(_validate(corrections, logs, catalog, allow_new_intent))
    return corrections, sorted(problems, key=lambda p: p.row)
