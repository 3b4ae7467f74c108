"""Corrections import: reviewed files (the spec's ``review`` format) back into the database.

A file is validated row by row and applied all or nothing, in one transaction: one bad row and
nothing changes. Rows whose ``corrected_intent`` is empty were not reviewed and are skipped (not
rejected). Importing the same file twice changes nothing the second time (``unchanged``).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Connection, select

from capture import queries
from capture.db import database_url, get_sync_engine
from capture.models import PromptLog
from tasks.registry import current_model_dir, model_labels

logger = logging.getLogger(__name__)

_T = PromptLog.__table__
MAX_NOTES_CHARS = 2_000
_ID_CHUNK = 500


@dataclass(frozen=True, slots=True)
class RowProblem:
    """Why one row of a corrections file was refused. ``row`` is 1-based (0: the whole file)."""

    row: int
    field: str
    message: str
    log_id: str | None = None

    def __str__(self) -> str:
        where = "file" if self.row == 0 else f"row {self.row}"
        ident = f" (id {self.log_id})" if self.log_id else ""
        return f"{where}{ident}, field {self.field!r}: {self.message}"


@dataclass(frozen=True, slots=True)
class Correction:
    row: int
    log_id: uuid.UUID
    corrected_intent: str
    notes: str | None


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
        return {
            "file": self.file,
            "applied": self.applied,
            "unchanged": self.unchanged,
            "not_reviewed": self.not_reviewed,
            "rejected": [str(p) for p in self.rejected],
        }


def parse_corrections(text: str) -> tuple[list[Correction], int, list[RowProblem]]:
    """Parse a review file: a JSON list of objects (or JSON Lines, one object per line).

    Returns the corrections to apply, the number of not-reviewed rows, and the problems found.
    """
    problems: list[RowProblem] = []
    rows: list[tuple[int, Any]] = []
    stripped = text.lstrip()
    if not stripped:
        return [], 0, [RowProblem(0, "-", "the file is empty; expected a JSON list of rows")]
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return (
                [],
                0,
                [
                    RowProblem(
                        0,
                        "-",
                        f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                        "fix the file (it must be the JSON list written by `export --mode review`)",
                    )
                ],
            )
        rows = list(enumerate(data, start=1))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append(
                    RowProblem(lineno, "-", f"malformed JSON ({exc.msg} at column {exc.colno})")
                )

    corrections: list[Correction] = []
    not_reviewed = 0
    for row, item in rows:
        if not isinstance(item, dict):
            problems.append(
                RowProblem(row, "-", f"expected an object, found {type(item).__name__}")
            )
            continue
        raw_id = item.get("id")
        shown_id = str(raw_id) if raw_id is not None else None
        if "corrected_intent" not in item:
            problems.append(
                RowProblem(
                    row,
                    "corrected_intent",
                    'missing; every row needs it (leave it "" for prompts not reviewed)',
                    shown_id,
                )
            )
            continue
        intent = item["corrected_intent"]
        if intent is None or (isinstance(intent, str) and not intent.strip()):
            not_reviewed += 1
            continue
        if not isinstance(intent, str):
            problems.append(
                RowProblem(
                    row,
                    "corrected_intent",
                    f"expected a string, found {type(intent).__name__} {intent!r}",
                    shown_id,
                )
            )
            continue
        try:
            log_id = uuid.UUID(str(raw_id))
        except ValueError:
            problems.append(
                RowProblem(
                    row, "id", f"expected the UUID of a logged prompt, found {raw_id!r}", shown_id
                )
            )
            continue
        notes = item.get("notes", "")
        if notes is not None and not isinstance(notes, str):
            problems.append(
                RowProblem(
                    row, "notes", f"expected a string, found {type(notes).__name__}", shown_id
                )
            )
            continue
        notes = (notes or "").strip()[:MAX_NOTES_CHARS] or None
        corrections.append(Correction(row, log_id, intent.strip(), notes))
    return corrections, not_reviewed, problems


def _fetch_logs(conn: Connection, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Any]:
    found: dict[uuid.UUID, Any] = {}
    unique = list(dict.fromkeys(ids))
    for start in range(0, len(unique), _ID_CHUNK):
        chunk = unique[start : start + _ID_CHUNK]
        stmt = select(_T.c.id, _T.c.prompt, _T.c.corrected_intent, _T.c.correction_notes).where(
            _T.c.id.in_(chunk)
        )
        for row in conn.execute(stmt):
            found[row.id] = row
    return found


def known_intents(conn: Connection) -> set[str]:
    """Every intent the database has seen predicted or corrected."""
    predicted = conn.execute(select(_T.c.predicted_intent).distinct()).scalars()
    corrected = conn.execute(
        select(_T.c.corrected_intent).where(_T.c.corrected_intent.is_not(None)).distinct()
    ).scalars()
    return {x for x in predicted if x} | {x for x in corrected if x}


def intent_catalog(conn: Connection, models_dir: Path | None) -> set[str]:
    """The intents a correction may name: the serving model's labels when a model is deployed,
    otherwise every intent the database knows."""
    model_dir = current_model_dir(models_dir) if models_dir is not None else None
    if model_dir is not None and (model_dir / "metadata.json").exists():
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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        result.rejected.append(RowProblem(0, "-", f"not UTF-8 text ({exc.reason}); save as UTF-8"))
        return result
    corrections, result.not_reviewed, problems = parse_corrections(text)
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
                queries.update_correction(
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
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if not target.exists():
        return target
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return folder / f"{Path(name).stem}.{stamp}{Path(name).suffix}"


def file_away(path: Path, result: ImportResult, inbox: Path) -> Path:
    """Move an imported inbox file to ``processed/``, or a rejected one to ``rejected/`` with a
    ``<name>.reason.txt`` next to it. Returns the new path."""
    folder = inbox / ("processed" if result.ok else "rejected")
    target = _unique_target(folder, path.name)
    shutil.move(str(path), target)
    if not result.ok:
        reason = target.with_name(target.name + ".reason.txt")
        reason.write_text(result.summary() + "\n" + result.reasons() + "\n", encoding="utf-8")
    return target


import_corrections_task = task(
    cache_policy=NO_CACHE, name="import-corrections", retries=2, retry_delay_seconds=2
)(import_corrections)
list_inbox_task = task(cache_policy=NO_CACHE, name="list-inbox")(inbox_files)
file_away_task = task(cache_policy=NO_CACHE, name="file-away", retries=2, retry_delay_seconds=1)(
    file_away
)
