"""Labelled text records (``{"text", "label"}`` JSONL): strict loading and writing.

The format of the base data set and of evaluation files, and the base of the training export
(``tasks.training_file``, which adds fields to the same lines). One decoder for the family:
:func:`json_lines` (UTF-8, an optional BOM, one JSON value per line, blank lines skipped);
one validator of the two shared fields: :func:`parse_record`.

Every problem is reported with the file and line, what was expected, what was found and how to
fix it (:class:`RecordsError`, a ``capture.errors.UserError``); nothing is returned when any line
is bad.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from capture.errors import UserError
from capture.files import write_jsonl_atomic

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Record:
    """One labelled example."""

    text: str
    label: str


class RecordsError(UserError, ValueError):
    """A records file cannot be used; the message names the file, the line and the fix."""


def records_error(path: Path, line: int | None, message: str) -> RecordsError:
    """``RecordsError("<path>:<line>: <message>")`` (``<path>: ...`` for the whole file)."""
    where = f"{path}:{line}" if line is not None else str(path)
    return RecordsError(f"{where}: {message}")


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise records_error(path, None, "file not found; pass an existing JSONL file") from None
    except IsADirectoryError:
        raise records_error(path, None, "is a directory; pass a JSONL file") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise records_error(
            path,
            line,
            f"expected UTF-8 text, found byte {raw[exc.start : exc.start + 1]!r} that is not "
            "valid UTF-8 (unknown encoding); re-encode the file as UTF-8, e.g. "
            "`iconv -f <encoding> -t UTF-8`",
        ) from None


def parse_record(obj: object, path: Path, line: int) -> Record:
    """Validate one decoded JSON value as a record (``text`` and ``label`` non-empty strings)."""
    if not isinstance(obj, dict):
        raise records_error(
            path,
            line,
            f'expected a JSON object {{"text": ..., "label": ...}}, found {type(obj).__name__}',
        )
    for field in ("text", "label"):
        if field not in obj:
            raise records_error(
                path,
                line,
                f"missing field {field!r}: expected keys 'text' and 'label', found "
                f"{sorted(obj)}; add the {field!r} field",
            )
        value = obj[field]
        if not isinstance(value, str):
            raise records_error(
                path,
                line,
                f"field {field!r}: expected a string, found {type(value).__name__} {value!r}",
            )
        if not value.strip():
            raise records_error(
                path,
                line,
                f"field {field!r}: expected non-empty text, found {value!r}; "
                "fill it in or remove the line",
            )
    return Record(text=obj["text"], label=obj["label"].strip())


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, decoded value)`` of each non-blank line of a UTF-8 JSONL file (a BOM is
    allowed). Raises :class:`RecordsError` naming the file (missing, a directory, not UTF-8)
    or the line (malformed JSON)."""
    text = _decode(path)
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        if not raw_line.strip():
            continue
        try:
            yield lineno, json.loads(raw_line)
        except json.JSONDecodeError as exc:
            raise records_error(
                path,
                lineno,
                f"malformed JSON ({exc.msg} at column {exc.colno}): expected one JSON object "
                f"per line, found {raw_line[:80]!r}",
            ) from None


def load_records(path: str | os.PathLike[str], *, min_labels: int = 2) -> list[Record]:
    """Read a JSONL file of ``{"text", "label"}`` objects (extra keys are ignored).

    Blank lines are skipped. Raises :class:`RecordsError` (a ``UserError`` and ``ValueError``)
    naming ``file:line`` for malformed JSON, a missing or non-string field, empty text or label,
    bytes that are not UTF-8, an empty file, or fewer than ``min_labels`` distinct labels.
    """
    p = Path(path)
    records = [parse_record(obj, p, lineno) for lineno, obj in json_lines(p)]
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
