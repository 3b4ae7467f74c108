"""Labelled text records (``{"text", "label"}`` JSONL): strict loading and writing.

The format of the base data set and of evaluation files, and the base of the training export
(``tasks.training_file``, which adds fields to the same lines). One decoder for the family:
:func:`json_lines`, which reads through ``tasks.input_files.read_json_rows`` (UTF-8 with or
without a BOM, LF or CRLF, JSON Lines or a JSON list; lines split only at ``\\n``, so a text
holding U+2028, U+2029 or U+0085 stays one line); one validator of the two shared fields:
:func:`parse_record`, which passes them through ``capture.text`` (``text``: ``clean_prompt``
— NUL and other controls removed, lone surrogates replaced, NFC, surrounding whitespace
stripped; ``label``: an intent name in the documented snake_case form, ``check_intent_name``).

Every problem is reported with the file and line (``<path>:<line>: ...``; for a JSON list
``<path>, row <n>: ...``), what was expected, what was found and how to fix it
(:class:`RecordsError`, a ``capture.errors.UserError``); a file that cannot be read at all (not
UTF-8, UTF-16, CSV, an HTML page, empty) gets one file-level message. Nothing is returned when
any line is bad.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from capture.errors import UserError
from capture.files import write_jsonl_atomic
from capture.text import clean_prompt, intent_name_problem, visible
from tasks.input_files import InputFileError, read_json_rows

logger = logging.getLogger(__name__)

#: What a records file is, as file-level messages say it.
RECORDS_EXPECTED = 'UTF-8 JSON Lines, one {"text": ..., "label": ...} object per line'

Unit = Literal["line", "row"]


@dataclass(frozen=True, slots=True)
class Record:
    """One labelled example."""

    text: str
    label: str


class RecordsError(UserError, ValueError):
    """A records file cannot be used; the message names the file, the line and the fix."""


def records_error(path: Path, line: int | None, message: str, unit: Unit = "line") -> RecordsError:
    """``RecordsError("<path>:<line>: <message>")`` (``<path>, row <n>: ...`` for an element of
    a JSON list; ``<path>: ...`` for the whole file)."""
    if line is None:
        where = str(path)
    elif unit == "row":
        where = f"{path}, row {line}"
    else:
        where = f"{path}:{line}"
    return RecordsError(f"{where}: {message}")


def parse_record(obj: object, path: Path, line: int, unit: Unit = "line") -> Record:
    """Validate one decoded JSON value as a record: ``text`` a string that is not empty once
    cleaned (``capture.text.clean_prompt``, which the returned text is), ``label`` an intent
    name in the documented form (surrounding whitespace removed)."""
    if not isinstance(obj, dict):
        raise records_error(
            path,
            line,
            f'expected a JSON object {{"text": ..., "label": ...}}, found {type(obj).__name__}',
            unit,
        )
    for field in ("text", "label"):
        if field not in obj:
            raise records_error(
                path,
                line,
                f"missing field {field!r}: expected keys 'text' and 'label', found "
                f"{sorted(obj)}; add the {field!r} field",
                unit,
            )
        value = obj[field]
        if not isinstance(value, str):
            raise records_error(
                path,
                line,
                f"field {field!r}: expected a string, found {type(value).__name__} {value!r}",
                unit,
            )
    text = clean_prompt(obj["text"])
    for field, value in (("text", text), ("label", obj["label"].strip())):
        if not value:
            raise records_error(
                path,
                line,
                f"field {field!r}: expected non-empty text, found {visible(obj[field])}; "
                "fill it in or remove the line",
                unit,
            )
    problem = intent_name_problem(obj["label"])
    if problem is not None:
        raise records_error(path, line, f"field 'label': {problem}", unit)
    return Record(text=text, label=obj["label"].strip())


def json_lines(
    path: Path, *, what: str = "records file", expected: str = RECORDS_EXPECTED
) -> Iterator[tuple[int, object, Unit]]:
    """``(row, decoded value, unit)`` of each row of a records file, read by
    ``tasks.input_files.read_json_rows``: ``row`` is the line number (``unit`` ``"line"``) of
    JSON Lines, the element position (``"row"``) of a JSON list.

    Raises :class:`RecordsError` once for a file that cannot be read (missing, a directory,
    empty, not UTF-8, UTF-16, CSV, HTML, ...) and naming the line of the first malformed one
    (with how many more there are)."""
    try:
        found = read_json_rows(path, what=what, expected=expected)
    except InputFileError as exc:
        raise RecordsError(str(exc)) from None
    if found.bad_rows:
        first = found.bad_rows[0]
        more = len(found.bad_rows) - 1
        raise records_error(
            path,
            first.row,
            first.message + (f" (and {more} more bad {found.unit}s)" if more else ""),
            found.unit,
        )
    for row, value in found.rows:
        yield row, value, found.unit


def load_records(path: str | os.PathLike[str], *, min_labels: int = 2) -> list[Record]:
    """Read a JSONL file of ``{"text", "label"}`` objects (extra keys are ignored).

    Blank lines are skipped. Raises :class:`RecordsError` (a ``UserError`` and ``ValueError``)
    naming ``file:line`` for malformed JSON, a missing or non-string field, empty text or label,
    a label outside the intent-name form; naming the file for bytes that are not UTF-8, an
    empty file, a file that is not JSON rows, or fewer than ``min_labels`` distinct labels.
    """
    p = Path(path)
    records = [parse_record(obj, p, row, unit) for row, obj, unit in json_lines(p)]
    if not records:
        raise records_error(p, None, "no records found; expected one JSON object per line")
    labels = {r.label for r in records}
    if len(labels) < min_labels:
        raise records_error(
            p,
            None,
            f"expected at least {min_labels} distinct labels, found {len(labels)} "
            f"({sorted(labels)}); a classifier needs examples of several intents",
        )
    logger.debug("loaded %d records with %d labels from %s", len(records), len(labels), p)
    return records


def write_records(path: str | os.PathLike[str], records: Iterable[Record]) -> int:
    """Write records as UTF-8 JSONL, ``{"text", "label"}`` per line, atomically and privately
    (0600: the texts may be raw prompts); return the count."""
    rows = [{"text": r.text, "label": r.label} for r in records]
    write_jsonl_atomic(Path(path), rows, private=True)
    return len(rows)
