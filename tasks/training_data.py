"""Training data export: the spec's ``retraining`` JSONL (``text, label, confidence, source,
corrected``; the format is :mod:`tasks.training_file`'s) and a held-out slice of corrected
prompts for evaluation, plus the export's ``.meta.json`` summary sidecar.

What goes in:

- corrections from the prompt logs (``corrected: true``, the reviewer's label);
- high-confidence predictions whose workflow did not fail (``corrected: false``);
- the anonymised training store ``nlu_training_examples`` (rows kept past raw-log retention);
- the base training set (``source: "base"``), so the model does not forget what it knew.

Every text is scrubbed of PII (``tasks.anonymise.scrub_pii``); no user or conversation id is
written. Texts are deduplicated on a normalised form: a corrected label wins over the base set,
which wins over a predicted label; among equals the newest wins.

The hold-out: a corrected prompt is held out when the sha256 of its normalised, scrubbed text
falls below ``holdout_fraction`` — a property of the text, so the same prompt is held out every
week and never leaks into training later. Held-out texts are removed from the training file
whatever their source.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from capture import statements
from capture.db import database_url, get_sync_engine
from capture.errors import UserError
from capture.offline_statements import (
    ParameterError,
    check_fraction,
    select_training_store,
    window_start,
)
from capture.rows import map_retraining_row
from capture.text import clean_prompt, intent_key, intent_name_problem
from capture.values import to_utc
from tasks.anonymise import scrub_pii
from tasks.retry import io_task
from tasks.training_file import (
    SOURCE_BASE,
    SOURCE_PRODUCTION,
    TrainingRow,
    holdout_path_for,
    write_training_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "NoTrainingDataError",
    "TrainingDataExport",
    "TrainingRow",
    "export_label",
    "export_training_data",
    "export_training_data_task",
    "holdout_path_for",
    "is_held_out",
    "merge_rows",
    "read_summary",
    "summary_path",
    "write_summary",
]

# Dedup priority: higher wins for the same normalised text.
_PRIORITY = {"corrected": 3, SOURCE_BASE: 2, "predicted": 1}


class NoTrainingDataError(UserError, ValueError):
    """The window and the base set hold nothing to train on; the message says what to widen."""


@dataclass(slots=True)
class TrainingDataExport:
    """What :func:`export_training_data` wrote."""

    path: Path
    holdout_path: Path
    sha256: str
    n_train: int
    n_holdout: int
    counts: dict[str, int] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    corrected_ids: list[str] = field(default_factory=list)
    holdout_ids: list[str] = field(default_factory=list)
    dropped_duplicates: int = 0

    def summary(self) -> dict[str, Any]:
        """The part that goes into a model's training.json."""
        return {
            "training_data": str(self.path),
            "training_data_sha256": self.sha256,
            "holdout_data": str(self.holdout_path),
            "n_train": self.n_train,
            "n_holdout": self.n_holdout,
            "counts": dict(self.counts),
            "labels": list(self.labels),
            "dropped_duplicates": self.dropped_duplicates,
            "corrected_ids": list(self.corrected_ids),
            "holdout_ids": list(self.holdout_ids),
        }


def normalise_text(text: str) -> str:
    """The form two texts share to count as the same training example."""
    return " ".join(text.casefold().split())


def holdout_score(text: str) -> float:
    """A number in [0, 1) fixed by the text alone (sha256 of its normalised form)."""
    digest = hashlib.sha256(normalise_text(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(text: str, fraction: float) -> bool:
    return holdout_score(text) < fraction


def production_rows(
    conn: Connection,
    *,
    since: datetime | None,
    min_confidence: float,
    until: datetime | None = None,
) -> Iterator[TrainingRow]:
    """Corrections and high-confidence predictions whose workflow did not fail, created in
    ``(since, until]``, oldest first (``capture.statements.select_for_retraining``)."""
    stmt = statements.select_for_retraining(min_confidence=min_confidence, since=since, until=until)
    for raw in conn.execution_options(yield_per=5_000).execute(stmt):
        row = map_retraining_row(raw)
        yield TrainingRow(
            text=row.prompt,
            label=row.label,
            confidence=row.confidence,
            source=SOURCE_PRODUCTION,
            corrected=row.corrected,
            log_id=str(row.id),
        )


def store_rows(
    conn: Connection, *, since: datetime | None, until: datetime | None = None
) -> Iterator[TrainingRow]:
    """Rows of the anonymised training store from the week of ``since`` to the week of
    ``until``, oldest first (``capture.offline_statements.select_training_store``)."""
    stmt = select_training_store(since=since, until=until)
    for row in conn.execute(stmt):
        yield TrainingRow(
            text=row.prompt,
            label=row.label,
            confidence=row.confidence,
            source=row.source,
            corrected=bool(row.corrected),
        )


def base_rows(path: Path) -> list[TrainingRow]:
    """The base training set: a ``{"text", "label"}`` JSONL file (strictly validated)."""
    from tasks.records import load_records

    return [
        TrainingRow(
            text=r.text, label=r.label, confidence=None, source=SOURCE_BASE, corrected=False
        )
        for r in load_records(path)
    ]


def export_label(label: str) -> str | None:
    """The label a training row is exported with: ``label`` (surrounding whitespace removed)
    when it is an intent name in the documented form (``capture.text``); else its
    ``capture.text.intent_key`` when that is in the form (``Music_Play`` and ``weather`` + a
    zero-width space, written before names were checked, join ``music_play`` and ``weather``
    instead of becoming separate labels); else None (the row cannot be exported)."""
    if intent_name_problem(label) is None:
        return label.strip()
    key = intent_key(label)
    return key if intent_name_problem(key) is None else None


def merge_rows(
    rows: Iterable[TrainingRow], *, holdout_fraction: float
) -> tuple[list[TrainingRow], list[TrainingRow], int]:
    """Clean (``capture.text.clean_prompt``), scrub, relabel (:func:`export_label`),
    deduplicate and split ``rows`` into (train, holdout, rows dropped: duplicates, empty texts
    and labels that cannot be exported)."""
    best: dict[str, TrainingRow] = {}
    seen = 0
    relabelled: dict[str, str] = {}
    unusable: set[str] = set()
    for row in rows:
        seen += 1
        text = clean_prompt(scrub_pii(clean_prompt(row.text)))
        if not text:
            continue
        label = export_label(row.label)
        if label is None:
            unusable.add(row.label)
            continue
        if label != row.label.strip():
            relabelled[row.label] = label
        scrubbed = TrainingRow(text, label, row.confidence, row.source, row.corrected, row.log_id)
        key = normalise_text(text)
        kept = best.get(key)
        if kept is None or _PRIORITY[scrubbed.kind] >= _PRIORITY[kept.kind]:
            best[key] = scrubbed
    held_keys = {
        key for key, row in best.items() if row.corrected and is_held_out(key, holdout_fraction)
    }
    train = [row for key, row in best.items() if key not in held_keys]
    holdout = [row for key, row in best.items() if key in held_keys]
    dropped = seen - len(best)
    for old, new in sorted(relabelled.items()):
        logger.warning("training data: label %r exported as %r (its canonical form)", old, new)
    if unusable:
        logger.warning(
            "training data: rows labelled %s left out: not an intent name (snake_case)",
            ", ".join(sorted(map(repr, unusable))),
        )
    return train, holdout, dropped


_BASE_DEFAULT = "PROMPT_CAPTURE_HOME/data/base_train.jsonl"


def export_training_data(
    output: Path,
    *,
    url: str | None = None,
    days: int | None = None,
    min_confidence: float = 0.9,
    base_data: Path | None = None,
    include_store: bool = True,
    holdout_fraction: float = 0.2,
    holdout_output: Path | None = None,
    now: datetime | None = None,
    base_default: Path | None = None,
) -> TrainingDataExport:
    """Write the retraining JSONL to ``output`` and the held-out corrected prompts next to it
    (:mod:`tasks.training_file`'s format; both 0600).

    The window is the last ``days`` days ending at ``now`` (default: the current time); rows
    dated after ``now`` are left out. None: all time up to ``now``.

    Raises ``ParameterError`` for ``days``, ``min_confidence`` or ``holdout_fraction`` out of
    range and ``RecordsError`` for a bad ``base_data`` file, before the database is read;
    :class:`NoTrainingDataError` when nothing is left to train on, naming ``base_default`` (the
    base file the flow reads when ``base_data`` is not given). All are ``UserError``s.
    """
    if check_fraction(holdout_fraction, "holdout_fraction") == 1.0:
        raise ParameterError(
            f"holdout_fraction: expected a number in [0, 1), found {holdout_fraction!r}; "
            "something must be left to train on"
        )
    check_fraction(min_confidence, "min_confidence")
    until = to_utc(now or datetime.now(UTC), "now")
    since = window_start(until, days)
    rows: list[TrainingRow] = base_rows(base_data) if base_data is not None else []
    with get_sync_engine(database_url(url)).connect() as conn:
        if include_store:
            rows.extend(store_rows(conn, since=since, until=until))
        rows.extend(production_rows(conn, since=since, min_confidence=min_confidence, until=until))
    train, holdout, dropped = merge_rows(rows, holdout_fraction=holdout_fraction)
    if not train:
        raise NoTrainingDataError(
            "no training data: the logs hold no corrections or high-confidence predictions "
            f"(min_confidence {min_confidence}) in the window and no base set was given; "
            f"put the base training set at {base_default or _BASE_DEFAULT} (read by default), "
            "or name another file with the flow parameter base_data, or widen --days"
        )
    holdout_output = holdout_output or holdout_path_for(output)
    sha = write_training_file(output, train)
    write_training_file(holdout_output, holdout)
    counts: dict[str, int] = {}
    for row in train:
        counts[row.kind] = counts.get(row.kind, 0) + 1
    counts["holdout"] = len(holdout)
    result = TrainingDataExport(
        path=output,
        holdout_path=holdout_output,
        sha256=sha,
        n_train=len(train),
        n_holdout=len(holdout),
        counts=counts,
        labels=sorted({row.label for row in train}),
        corrected_ids=sorted(r.log_id for r in train if r.corrected and r.log_id),
        holdout_ids=sorted(r.log_id for r in holdout if r.log_id),
        dropped_duplicates=dropped,
    )
    logger.info(
        "training data: %d rows (%s) to %s, %d held out to %s",
        result.n_train,
        ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        output,
        result.n_holdout,
        holdout_output,
    )
    return result


export_training_data_task = io_task(export_training_data, name="export-training-data")


# --------------------------------------------------------------------------- the .meta.json sidecar


def summary_path(training_file: Path) -> Path:
    """The sidecar with the export's summary (hash, counts, corrected ids): ``<file>.meta.json``."""
    return training_file.with_name(training_file.name + ".meta.json")


def read_summary(training_file: Path) -> dict[str, Any] | None:
    """The summary :func:`write_summary` stored next to ``training_file`` (the keys of
    :meth:`TrainingDataExport.summary`), or None when there is no sidecar."""
    path = summary_path(training_file)
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@io_task(name="write-training-summary", retry_delay_seconds=1)
def write_summary(export: TrainingDataExport) -> Path:
    """Write ``export.summary()`` to the sidecar of ``export.path``; returns the sidecar."""
    from capture.files import write_json_atomic

    path = summary_path(export.path)
    write_json_atomic(path, export.summary())
    return path
