"""Corrections import: reviewed files (the spec's ``review`` format) back into the database.

The file format and its row rules are :mod:`tasks.review_file`'s (:func:`read_corrections`: read
by ``tasks.input_files``, notes cleaned by ``capture.text.clean_notes``); here the rows are
checked against the database and applied all or nothing, in one transaction: one bad row and
nothing changes. Checked per row:

- the logged prompt exists;
- the intent, through ``capture.text.IntentCatalogue`` over the catalog (the serving model's
  labels, else the intents the logs know): a known intent is taken as the catalog names it; a
  new one needs ``allow_new_intent`` AND the documented form (snake_case: ``a-z``, ``0-9``,
  single ``_``), and is refused, naming the existing intent, when it differs from one only by
  case, spacing or invisible characters (``Music_Play`` beside ``music_play``);
- one id is given one answer: the same id twice with a different intent or different notes is
  reported on each of its rows (nothing is chosen silently); the same answer twice is applied
  once and counted ``unchanged``;
- one prompt is not corrected to two intents.

Rows whose ``corrected_intent`` is empty were not reviewed and are skipped (not rejected).
Importing the same file twice changes nothing the second time (``unchanged``). A file the
reader cannot use at all is one problem on row 0; in the inbox it goes to ``rejected/`` with its
reason and the other files are still imported. The statements are
``capture.offline_statements``' ``select_logs_by_id`` and ``select_known_intents`` and
``capture.statements.update_correction``.
"""

from __future__ import annotations

import getpass
import logging
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DataError

from capture import review_audit, statements
from capture.db import database_url, get_sync_engine
from capture.errors import UserError
from capture.files import make_private_dir, write_text_atomic
from capture.model_dir import METADATA_FILE
from capture.offline_statements import ID_CHUNK, select_known_intents, select_logs_by_id
from capture.text import IntentCatalogue, IntentNameError, visible
from tasks.registry import current_model_dir, model_labels
from tasks.retry import io_task
from tasks.review_file import (
    MAX_NOTES_CHARS,
    Correction,
    ReviewFileError,
    RowProblem,
    corrections_from_rows,
    parse_corrections,
    read_corrections_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_NOTES_CHARS",
    "Correction",
    "ImportResult",
    "RowProblem",
    "check_corrections_file",
    "file_away",
    "file_away_task",
    "import_corrections",
    "import_corrections_task",
    "import_summary_markdown",
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


def fetch_logs(conn: Connection, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Any]:
    """``{id: row}`` of the logs among ``ids`` (``capture.offline_statements.select_logs_by_id``:
    the columns a correction's audit row records as before / prior), in chunks."""
    found: dict[uuid.UUID, Any] = {}
    unique = list(dict.fromkeys(ids))
    for start in range(0, len(unique), ID_CHUNK):
        for row in conn.execute(select_logs_by_id(unique[start : start + ID_CHUNK])):
            found[row.id] = row
    return found


def write_correction(
    conn: Connection, log_id: uuid.UUID, intent: str, notes: str | None, at: datetime
) -> None:
    """Set the correction of the log ``log_id`` (``corrected_intent``, ``correction_notes``,
    ``corrected_at`` and ``updated_at`` = ``at``) with the shared update statement
    (``capture.statements.update_correction``): the one write of a correction, for the file
    import and the review workbench alike."""
    conn.execute(
        statements.update_correction(
            log_id, corrected_intent=intent, correction_notes=notes, corrected_at=at
        )
    )


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


def _id_conflicts(corrections: Sequence[Correction]) -> list[RowProblem]:
    """Rows that give one id two different answers (intent or notes): each is reported, none
    is chosen. The same answer twice is not a conflict (the second is ``unchanged``)."""
    by_id: dict[uuid.UUID, list[Correction]] = {}
    for c in corrections:
        by_id.setdefault(c.log_id, []).append(c)
    problems: list[RowProblem] = []
    for log_id, group in by_id.items():
        if len({(c.corrected_intent, c.notes) for c in group}) < 2:
            continue
        rows = ", ".join(str(c.row) for c in group)
        intents = sorted({c.corrected_intent for c in group})
        if len(intents) > 1:
            field, message = (
                "corrected_intent",
                f"the same prompt (this id) is corrected to different intents "
                f"({', '.join(map(visible, intents))}) in rows {rows}; keep one row per id",
            )
        else:
            field, message = (
                "notes",
                f"this id is in rows {rows} with different notes; keep one row per id (merge "
                "the notes into it)",
            )
        problems.extend(RowProblem(c.row, field, message, str(log_id)) for c in group)
    return problems


def _prompt_conflicts(
    corrections: Sequence[Correction], logs: dict[uuid.UUID, Any], skip: set[int]
) -> list[RowProblem]:
    """Different ids of one prompt (same text up to case and spacing) corrected to different
    intents: each row is reported (rows in ``skip`` already were)."""
    by_prompt: dict[str, dict[uuid.UUID, Correction]] = {}
    for c in corrections:
        if c.row not in skip:
            prompt = " ".join(logs[c.log_id].prompt.lower().split())
            by_prompt.setdefault(prompt, {}).setdefault(c.log_id, c)
    problems: list[RowProblem] = []
    for group in by_prompt.values():
        intents = sorted({c.corrected_intent for c in group.values()})
        if len(intents) > 1:
            rows = ", ".join(str(c.row) for c in group.values())
            message = (
                f"the same prompt is corrected to different intents "
                f"({', '.join(map(visible, intents))}) in rows {rows}; keep one"
            )
            problems.extend(
                RowProblem(c.row, "corrected_intent", message, str(c.log_id))
                for c in group.values()
            )
    return problems


def _validate(
    corrections: list[Correction],
    logs: dict[uuid.UUID, Any],
    catalog: set[str],
    allow_new_intent: bool,
) -> tuple[list[Correction], list[RowProblem]]:
    """The corrections with their intent as the catalogue names it, and the problems: an id no
    log has, an intent the catalogue refuses (``capture.text.IntentCatalogue.check``: unknown
    without ``allow_new_intent``, a new name differing from an existing one only by case,
    spacing or invisible characters, a name outside the documented form), one id given two
    answers, one prompt corrected to two intents (these two also between rows whose intent was
    refused: each problem of a row is reported)."""
    checker = IntentCatalogue(catalog)
    problems: list[RowProblem] = []
    checked: list[Correction] = []
    known: list[Correction] = []  # rows of a logged prompt, intent as resolved (or as given)
    for c in corrections:
        if c.log_id not in logs:
            problems.append(
                RowProblem(
                    c.row,
                    "id",
                    "no logged prompt has this id; was the file exported from this database?",
                    str(c.log_id),
                )
            )
            continue
        try:
            resolved = replace(
                c, corrected_intent=checker.check(c.corrected_intent, allow_new=allow_new_intent)
            )
        except IntentNameError as exc:
            problems.append(RowProblem(c.row, "corrected_intent", exc.detail, str(c.log_id)))
            known.append(c)
            continue
        checked.append(resolved)
        known.append(resolved)
    conflicts = _id_conflicts(known)
    problems.extend(conflicts)
    problems.extend(_prompt_conflicts(known, logs, {p.row for p in conflicts}))
    return checked, sorted(problems, key=lambda p: p.row)


def check_corrections_file(
    path: Path,
    *,
    url: str | None = None,
    allow_new_intent: bool = False,
    models_dir: Path | None = None,
) -> None:
    """Before an import is started: the checks of :func:`import_corrections` that need no write
    (the file reads, its rows parse, each id is a logged prompt, each intent is in the catalogue
    unless ``allow_new_intent``, no id or prompt gets two answers). Raises
    :class:`ReviewFileError` (a ``UserError``: one message naming the file, the first refused
    row and field, how many more, and the fix) when any fails; writes nothing."""
    corrections, _not_reviewed, problems, _source = read_corrections_file(path)
    if not problems:
        with get_sync_engine(database_url(url)).connect() as conn:
            logs = fetch_logs(conn, (c.log_id for c in corrections))
            _checked, problems = _validate(
                corrections, logs, intent_catalog(conn, models_dir), allow_new_intent
            )
    if not problems:
        return
    first = min(problems, key=lambda p: p.row)
    where = f"{path}: {first.message}" if first.row == 0 else f"{path}, {first}"
    more = f" (and {len(problems) - 1} more refused rows)" if len(problems) > 1 else ""
    raise ReviewFileError(f"{where}{more}; nothing was imported: fix the file and import it again")


class _RefusedValueError(Exception):
    """A value of the file that the statement builders refused while applying it."""


def import_corrections(
    path: Path,
    *,
    url: str | None = None,
    allow_new_intent: bool = False,
    catalog: set[str] | None = None,
    models_dir: Path | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    reviewer: str | None = None,
) -> ImportResult:
    """Validate ``path`` and apply its corrections in one transaction, all or nothing.

    ``catalog`` defaults to :func:`intent_catalog` (the serving model's labels under
    ``models_dir``, else the intents in the database). Whatever the file holds, the answer is an
    :class:`ImportResult`: a file that cannot be read is one problem on row 0, bad rows are
    problems by row, and a value the database or the statement layer still refuses
    (``DataError``, a ``UserError`` while applying) rejects the file with that message. Only a
    path that is not a file raises (``InputFileError``, a ``UserError``), and I/O or connection
    failures propagate (the task retries those).

    Every applied correction writes its audit row (``capture.review_audit``: source ``file``,
    or ``label_studio`` for a Label Studio export; ``reviewer`` defaults to the OS user running
    the import), as the review workbench does.
    """
    result = ImportResult(file=str(path))
    corrections, result.not_reviewed, problems, source = read_corrections_file(path)
    who = reviewer or importing_user()
    result.rejected.extend(problems)
    try:
        with get_sync_engine(database_url(url)).begin() as conn:
            logs = fetch_logs(conn, (c.log_id for c in corrections))
            allowed = catalog if catalog is not None else intent_catalog(conn, models_dir)
            checked, problems = _validate(corrections, logs, allowed, allow_new_intent)
            result.rejected.extend(problems)
            if result.rejected:
                result.rejected.sort(key=lambda p: p.row)
                logger.warning("%s", result.summary())
                return result
            try:
                _apply(conn, checked, logs, result, now(), source=source, reviewer=who)
            except UserError as exc:  # the statement layer refused a value: roll back
                raise _RefusedValueError(str(exc)) from exc
    except (DataError, _RefusedValueError) as exc:  # a value of this file: reject the file
        result.applied, result.applied_ids = 0, []
        reason = exc.orig if isinstance(exc, DataError) and exc.orig is not None else exc
        detail = visible(str(reason).split("\n")[0], 200)
        result.rejected.append(
            RowProblem(0, "-", f"the database refused a value of this file ({detail}); fix it")
        )
        logger.warning("%s", result.summary())
        return result
    logger.info("%s", result.summary())
    return result


def _apply(
    conn: Connection,
    corrections: Sequence[Correction],
    logs: dict[uuid.UUID, Any],
    result: ImportResult,
    stamp: datetime,
    *,
    source: str = "file",
    reviewer: str = "file-import",
) -> None:
    """Write the corrections that change something, each with its audit row (``source``,
    ``reviewer``); count the rest as ``unchanged``."""
    seen: set[uuid.UUID] = set()
    changes: list[Correction] = []
    for c in corrections:
        log = logs[c.log_id]
        if c.log_id in seen or (
            log.corrected_intent == c.corrected_intent and log.correction_notes == c.notes
        ):
            result.unchanged += 1
            continue
        seen.add(c.log_id)
        changes.append(c)
    audit: list[dict[str, Any]] = []
    for c in changes:
        write_correction(conn, c.log_id, c.corrected_intent, c.notes, stamp)
        audit.append(
            review_audit.correction_audit(
                logs[c.log_id],
                c.log_id,
                c.corrected_intent,
                c.notes,
                reviewer=reviewer,
                source=source,
                now=stamp,
            )
        )
    if audit:
        conn.execute(review_audit.insert_audit(audit), audit)
    result.applied = len(changes)
    result.applied_ids = [str(c.log_id) for c in changes]


def importing_user() -> str:
    """Who imports when no reviewer is named: the operating-system user of this process."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name in this environment (a bare container)
        return "file-import"


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


import_corrections_task = io_task(import_corrections, name="import-corrections")
list_inbox_task = io_task(inbox_files, name="list-inbox", retry_delay_seconds=1)
file_away_task = io_task(file_away, name="file-away", retry_delay_seconds=1)


def import_summary_markdown(results: Sequence[ImportResult] | None) -> str:
    """Markdown lines of an inbox import for a run's summary artifact: the counts, then one
    line per rejected file (moved to ``inbox/rejected/``) with its first reasons; ``""`` when
    the inbox was not drained (``results`` None)."""
    if not results:
        return "- corrections: no files in the inbox\n" if results is not None else ""
    rejected = [r for r in results if not r.ok]
    applied = sum(r.applied for r in results)
    lines = [
        f"- corrections: {len(results)} file(s), {applied} correction(s) applied, "
        f"{len(rejected)} file(s) rejected\n"
    ]
    for r in rejected:
        first = "; ".join(str(p) for p in r.rejected[:3])
        more = f" (and {len(r.rejected) - 3} more)" if len(r.rejected) > 3 else ""
        lines.append(f"  - REJECTED `{Path(r.file).name}` (moved to `rejected/`): {first}{more}\n")
    return "".join(lines)


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
    logs = fetch_logs(conn, (c.log_id for c in corrections))
    checked, more = _validate(corrections, logs, catalog, allow_new_intent)
    return checked, sorted(problems + more, key=lambda p: p.row)
