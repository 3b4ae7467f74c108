"""The review file (the spec's ``review`` format) and the corrections file (the same, reviewed).

**Review file** — written by ``tasks.review_export`` (:func:`write_review_file`): a UTF-8 JSON
list, indented by 2, one object per selected prompt with exactly these fields in this order
(:data:`REVIEW_FIELDS`, one :class:`ReviewRow`)::

    [{"id": "<uuid>", "prompt": "can you help me with my schedule",
      "predicted_intent": "scheduling", "confidence": 0.65,
      "created_at": "2025-10-25T10:00:00+00:00", "corrected_intent": "", "notes": ""}]

``confidence`` is rounded to 4 decimals, ``created_at`` is ISO 8601 UTC. The file is private
(0600): it holds raw prompts. :func:`read_review_file` reads one back strictly (every field, its
type) — for tools that fill it in, like the stand-in reviewer.

**Corrections file** — the review file after a person filled in ``corrected_intent`` (and maybe
``notes``), as a JSON list or JSON Lines, dropped in the inbox or passed to
``import-corrections``. Only ``id``, ``corrected_intent`` and ``notes`` are read
(:func:`read_corrections`, :func:`parse_corrections`, :func:`corrections_from_rows`):

- every row must have ``corrected_intent``; ``""`` or ``null`` means "not reviewed" (skipped);
- a reviewed row needs ``id``, the UUID of a logged prompt, and a string ``corrected_intent``
  (surrounding whitespace removed here; its form and whether it is known are checked against
  the catalogue by ``tasks.corrections`` through ``capture.text.IntentCatalogue``);
- ``notes`` is optional text, cleaned by ``capture.text.clean_notes`` (NUL and other control
  characters removed, a lone surrogate replaced by U+FFFD, NFC, surrounding whitespace
  stripped: the same stored value on SQLite and PostgreSQL), cut at :data:`MAX_NOTES_CHARS`;
  empty means none.

A Label Studio JSON export (a list of tasks with ``annotations``) is recognised here too
(:func:`read_corrections_file`, the one place that tells the formats apart) and turned into
these rows by ``tasks.label_studio`` first.

Rows that break a rule become :class:`RowProblem`\\ s (row number, field, what is wrong and the
fix); a file that cannot be read at all is one problem on row 0. What the database must confirm
(the id exists, the intent is known, one prompt is not corrected two ways) is
``tasks.corrections``'s to check.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

from capture.errors import UserError
from capture.files import write_text_atomic
from capture.text import clean_notes, visible
from tasks.input_files import InputFileError, read_json_rows
from tasks.label_studio import is_label_studio_export, label_studio_rows

logger = logging.getLogger(__name__)

MAX_NOTES_CHARS = 2_000
_EXPECTED = "the JSON list written by `prompt-capture export --mode review` (or JSON Lines)"


class ReviewFileError(UserError, ValueError):
    """A review file cannot be used; the message names the file, the row, the field and the fix."""


# --------------------------------------------------------------------------- the review file


@dataclass(frozen=True, slots=True)
class ReviewRow:
    """One row of the review file; ``corrected_intent`` and ``notes`` are "" until reviewed."""

    id: str
    prompt: str
    predicted_intent: str
    confidence: float
    created_at: str | None
    corrected_intent: str = ""
    notes: str = ""

    def as_json(self) -> dict[str, Any]:
        """The row's object, :data:`REVIEW_FIELDS` in order (``confidence`` to 4 decimals)."""
        row = {name: getattr(self, name) for name in REVIEW_FIELDS}
        row["confidence"] = round(float(self.confidence), 4)
        return row

    def reviewed(self, corrected_intent: str, notes: str = "") -> ReviewRow:
        """This row with a reviewer's answer filled in."""
        return replace(self, corrected_intent=corrected_intent, notes=notes)


#: The fields of one review row, in the spec's order; nothing else is written.
REVIEW_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ReviewRow))


def write_review_file(path: Path, rows: Iterable[ReviewRow]) -> int:
    """Write the review JSON list atomically and privately (0600); return the row count."""
    data = [row.as_json() for row in rows]
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", private=True)
    return len(data)


def _row_error(where: str, field: str, expected: str, value: object) -> ReviewFileError:
    return ReviewFileError(
        f"{where}, field {field!r}: expected {expected}, found {value!r}; fix the row or "
        "export the review file again"
    )


def parse_review_row(item: object, where: str) -> ReviewRow:
    """Validate one decoded row of a review file (``where`` names it in messages: "<file>,
    row 3"). Every field of :data:`REVIEW_FIELDS` must be present with its type."""
    if not isinstance(item, dict):
        raise ReviewFileError(f"{where}: expected an object, found {type(item).__name__}")
    missing = [name for name in REVIEW_FIELDS if name not in item]
    if missing:
        raise ReviewFileError(
            f"{where}: missing field(s) {', '.join(missing)}; every row has "
            f"{', '.join(REVIEW_FIELDS)}"
        )
    for name in ("id", "prompt", "predicted_intent", "corrected_intent", "notes"):
        if not isinstance(item[name], str):
            raise _row_error(where, name, "a string", item[name])
    confidence = item["confidence"]
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not math.isfinite(confidence)
    ):
        raise _row_error(where, "confidence", "a number", confidence)
    if item["created_at"] is not None and not isinstance(item["created_at"], str):
        raise _row_error(where, "created_at", "an ISO 8601 time or null", item["created_at"])
    return ReviewRow(
        **{**{name: item[name] for name in REVIEW_FIELDS}, "confidence": float(confidence)}
    )


def read_review_file(path: Path) -> list[ReviewRow]:
    """Every row of a review file, validated (:func:`parse_review_row`).

    Raises ``InputFileError`` for a file that cannot be read as JSON rows and
    :class:`ReviewFileError` for a bad row (both ``UserError``\\ s naming file and row).
    """
    found = read_json_rows(path, what="review file", expected=_EXPECTED)
    found.raise_for_bad_rows()
    return [parse_review_row(item, found.where(row)) for row, item in found.rows]


# --------------------------------------------------------------------------- corrections


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
    """A reviewed row: the logged prompt ``log_id`` is really ``corrected_intent``."""

    row: int
    log_id: uuid.UUID
    corrected_intent: str
    notes: str | None


def _shown_id(raw_id: object) -> str | None:
    """``raw_id`` as messages and reason files show it: a UUID as is, anything else quoted
    with invisible characters and lone surrogates escapes (``capture.text.visible``)."""
    if raw_id is None:
        return None
    if isinstance(raw_id, str):
        try:
            return str(uuid.UUID(raw_id))
        except ValueError:
            return visible(raw_id, 60)
    return visible(repr(raw_id), 60)


def parse_correction(row: int, item: object) -> Correction | RowProblem | None:
    """One decoded row of a corrections file: a :class:`Correction`, a :class:`RowProblem`, or
    None when the row was not reviewed (``corrected_intent`` empty or null)."""
    if not isinstance(item, dict):
        return RowProblem(row, "-", f"expected an object, found {type(item).__name__}")
    raw_id = item.get("id")
    shown_id = _shown_id(raw_id)
    if "corrected_intent" not in item:
        return RowProblem(
            row,
            "corrected_intent",
            'missing; every row needs it (leave it "" for prompts not reviewed)',
            shown_id,
        )
    intent = item["corrected_intent"]
    if intent is None or (isinstance(intent, str) and not intent.strip()):
        return None
    if not isinstance(intent, str):
        return RowProblem(
            row,
            "corrected_intent",
            f"expected a string, found {type(intent).__name__} {intent!r}",
            shown_id,
        )
    try:
        log_id = uuid.UUID(str(raw_id))
    except ValueError:
        return RowProblem(
            row, "id", f"expected the UUID of a logged prompt, found {shown_id}", shown_id
        )
    notes = item.get("notes", "")
    if notes is not None and not isinstance(notes, str):
        return RowProblem(
            row, "notes", f"expected a string, found {type(notes).__name__}", shown_id
        )
    cleaned = clean_notes(notes)
    if cleaned is not None and len(cleaned) > MAX_NOTES_CHARS:
        cleaned = clean_notes(cleaned[:MAX_NOTES_CHARS])
    return Correction(row, log_id, intent.strip(), cleaned)


def corrections_from_rows(
    rows: Iterable[tuple[int, object]],
) -> tuple[list[Correction], int, list[RowProblem]]:
    """``(corrections, rows not reviewed, problems)`` of numbered decoded rows."""
    corrections: list[Correction] = []
    problems: list[RowProblem] = []
    not_reviewed = 0
    for row, item in rows:
        parsed = parse_correction(row, item)
        if parsed is None:
            not_reviewed += 1
        elif isinstance(parsed, RowProblem):
            problems.append(parsed)
        else:
            corrections.append(parsed)
    return corrections, not_reviewed, problems


def parse_corrections(text: str) -> tuple[list[Correction], int, list[RowProblem]]:
    """Parse the text of a corrections file: a JSON list of objects (or JSON Lines, one object
    per line, split only at ``\\n`` so a value holding U+2028 stays on its line). Returns the
    corrections to apply, the number of rows not reviewed, and the problems found (a list that
    does not parse is one problem on row 0). Files are read by :func:`read_corrections`."""
    stripped = text.lstrip()
    if not stripped:
        return [], 0, [RowProblem(0, "-", "the file is empty; expected a JSON list of rows")]
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            message = (
                f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                "fix the file (it must be the JSON list written by `export --mode review`)"
            )
            return [], 0, [RowProblem(0, "-", message)]
        corrections, not_reviewed, problems, _source = _rows_of(list(enumerate(data, start=1)))
        return corrections, not_reviewed, problems
    rows: list[tuple[int, object]] = []
    bad: list[RowProblem] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line.lstrip("\ufeff"))))
        except json.JSONDecodeError as exc:
            bad.append(RowProblem(lineno, "-", f"malformed JSON ({exc.msg} at column {exc.colno})"))
    corrections, not_reviewed, problems = corrections_from_rows(rows)
    return corrections, not_reviewed, sorted(bad + problems, key=lambda p: p.row)


class CorrectionsFile(NamedTuple):
    """A corrections file as read: the corrections, the rows not reviewed (for a Label Studio
    export: the skipped tasks), the problems by row, and the ``source`` format (``file``, or
    ``label_studio`` for a Label Studio JSON export; the audit records it)."""

    corrections: list[Correction]
    not_reviewed: int
    problems: list[RowProblem]
    source: str = "file"


def _rows_of(rows: list[tuple[int, object]]) -> CorrectionsFile:
    """The ONE place a corrections file's format is recognised: Label Studio tasks
    (``tasks.label_studio``) become corrections rows first; then the rows' rules apply."""
    if not is_label_studio_export([item for _, item in rows]):
        return CorrectionsFile(*corrections_from_rows(rows))
    converted, skipped, ls_problems = label_studio_rows(rows)
    corrections, not_reviewed, problems = corrections_from_rows(converted)
    problems += [RowProblem(p.row, p.field, p.message, p.log_id) for p in ls_problems]
    return CorrectionsFile(
        corrections, not_reviewed + skipped, sorted(problems, key=lambda p: p.row), "label_studio"
    )


def read_corrections_file(path: Path) -> CorrectionsFile:
    """:func:`parse_corrections` of a file, read by ``tasks.input_files.read_json_rows`` (UTF-8
    with or without a BOM, a JSON list or JSON Lines), or of a Label Studio JSON export. A file
    that cannot be read at all (empty, not UTF-8, CSV, an HTML page, ...) is one problem on row 0
    that names what was found; a path that is not a file raises ``InputFileError`` (a
    ``UserError``)."""
    try:
        found = read_json_rows(path, what="corrections file", expected=_EXPECTED)
    except InputFileError as exc:
        if not exc.path.is_file():
            raise  # nothing to reject: the caller passed a path that is not a file
        message = str(exc).removeprefix(f"{exc.path}: ")
        return CorrectionsFile([], 0, [RowProblem(0, "-", message)])
    parsed = _rows_of(list(found.rows))
    bad = [RowProblem(b.row, "-", b.message) for b in found.bad_rows]
    return parsed._replace(problems=sorted(bad + parsed.problems, key=lambda p: p.row))


def read_corrections(path: Path) -> tuple[list[Correction], int, list[RowProblem]]:
    """``(corrections, not reviewed, problems)`` of :func:`read_corrections_file`."""
    corrections, not_reviewed, problems, _source = read_corrections_file(path)
    return corrections, not_reviewed, problems
