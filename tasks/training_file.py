"""The training export (the spec's ``retraining`` JSONL): its one schema, writer and reader.

One UTF-8 JSON object per line, fields in this order (:data:`TRAINING_FIELDS`)::

    {"text": "schedule time for math homework", "label": "scheduling", "confidence": 0.92,
     "source": "production", "corrected": false}

- ``text``, ``label``: non-empty strings (the ``{"text", "label"}`` records of
  :mod:`tasks.records`, so every records reader can read an export too);
- ``confidence``: the prediction's confidence rounded to 4 decimals, or ``null`` (base set);
- ``source``: ``"production"`` (the logs or the anonymised store) or ``"base"`` (the base
  training set);
- ``corrected``: ``true`` when ``label`` is a reviewer's correction.

The held-out slice of an export (:func:`holdout_path_for`) has the same format. Files are
written atomically and privately (0600: texts come from users' prompts, PII scrubbed).

:func:`read_training_file` validates every line (:func:`parse_training_row`); a line may leave
out ``confidence`` (``null``), ``source`` (:data:`UNKNOWN_SOURCE`) and ``corrected``
(``false``), so a plain records file reads too; a field that is present must have its type.
Errors are :class:`TrainingFileError` (a ``RecordsError``, so a ``UserError``) naming
``file:line``, the field, what was expected and found, and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capture.files import write_bytes_atomic
from tasks.records import RecordsError, Unit, json_lines, parse_record

logger = logging.getLogger(__name__)

#: The fields of one line, in the order they are written.
TRAINING_FIELDS: tuple[str, ...] = ("text", "label", "confidence", "source", "corrected")
SOURCE_PRODUCTION = "production"
SOURCE_BASE = "base"
#: ``source`` of a line read without one.
UNKNOWN_SOURCE = "unknown"
_EXPECTED = (
    "UTF-8 JSON Lines written by `prompt-capture export --mode retraining`, one "
    '{"text", "label", ...} object per line'
)


class TrainingFileError(RecordsError):
    """A training export line cannot be used; the message names ``file:line``, field and fix."""


@dataclass(frozen=True, slots=True)
class TrainingRow:
    """One line of the training export (``log_id`` is internal and never written)."""

    text: str
    label: str
    confidence: float | None
    source: str
    corrected: bool
    log_id: str | None = None

    @property
    def kind(self) -> str:
        """``corrected``, ``base`` or ``predicted``: what the label rests on."""
        if self.corrected:
            return "corrected"
        return SOURCE_BASE if self.source == SOURCE_BASE else "predicted"

    def as_json(self) -> dict[str, Any]:
        """The line's object, :data:`TRAINING_FIELDS` in order."""
        return {
            "text": self.text,
            "label": self.label,
            "confidence": None if self.confidence is None else round(float(self.confidence), 4),
            "source": self.source,
            "corrected": self.corrected,
        }


def _field_error(
    path: Path, line: int, field: str, expected: str, value: object, *, unit: Unit
) -> RecordsError:
    where = f"{path}:{line}" if unit == "line" else f"{path}, row {line}"
    return TrainingFileError(
        f"{where}: field {field!r}: expected {expected}, found "
        f"{type(value).__name__} {value!r}; fix the line or export the training data again"
    )


def parse_training_row(obj: object, path: Path, line: int, unit: Unit = "line") -> TrainingRow:
    """Validate one decoded line: ``text`` and ``label`` as :func:`tasks.records.parse_record`
    checks and cleans them (``capture.text``), then the optional ``confidence`` (a number in
    [0, 1] or null), ``source`` (a non-empty string) and ``corrected`` (true or false)."""
    record = parse_record(obj, path, line, unit)
    assert isinstance(obj, dict)  # parse_record refused anything else
    confidence = obj.get("confidence")
    if confidence is not None and (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not math.isfinite(confidence)
        or not 0.0 <= confidence <= 1.0
    ):
        raise _field_error(
            path, line, "confidence", "a number in [0, 1] or null", confidence, unit=unit
        )
    source = obj.get("source", UNKNOWN_SOURCE)
    if not isinstance(source, str) or not source.strip():
        raise _field_error(
            path, line, "source", 'a name such as "production" or "base"', source, unit=unit
        )
    corrected = obj.get("corrected", False)
    if not isinstance(corrected, bool):
        raise _field_error(path, line, "corrected", "true or false", corrected, unit=unit)
    return TrainingRow(
        text=record.text,
        label=record.label,
        confidence=None if confidence is None else float(confidence),
        source=source,
        corrected=corrected,
    )


def read_training_file(path: str | os.PathLike[str]) -> list[TrainingRow]:
    """Every line of a training export (or its held-out slice), validated, in file order.

    Read by ``tasks.records.json_lines`` (``tasks.input_files``: lines split only at ``\\n``, so
    a text holding U+2028 reads back as written). Raises :class:`TrainingFileError` /
    ``RecordsError`` naming the file and line for malformed JSON or a bad field, and the file
    for a missing or unreadable one. An empty (0-byte) file is no rows: an export may hold
    nothing, e.g. an empty held-out slice.
    """
    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        return []
    rows = [
        parse_training_row(obj, p, line, unit)
        for line, obj, unit in json_lines(p, what="training file", expected=_EXPECTED)
    ]
    logger.debug("read %d training rows from %s", len(rows), p)
    return rows


def write_training_file(path: Path, rows: Iterable[TrainingRow]) -> str:
    """Write ``rows`` (atomically, 0600); return the sha256 (hex) of the file's bytes."""
    data = "".join(json.dumps(row.as_json(), ensure_ascii=False) + "\n" for row in rows).encode(
        "utf-8"
    )
    write_bytes_atomic(path, data, private=True)
    return hashlib.sha256(data).hexdigest()


def holdout_path_for(output: Path) -> Path:
    """Where the held-out slice goes for a training file at ``output``:
    ``retraining-X.jsonl`` -> ``retraining-X.holdout.jsonl``."""
    return output.with_name(f"{output.stem}.holdout{output.suffix or '.jsonl'}")
