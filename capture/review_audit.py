"""The review audit row (``review_decisions``, migrations 0005 and 0009): its one shape and its
one insert statement, for every writer of a correction.

Who writes audit rows:

- the review workbench (``tasks.review_queue.audit_row`` → :func:`audit_values`; source ``ui``);
- the corrections-file import (``tasks.corrections``; source ``file`` or ``label_studio``,
  reviewer the importing OS user or ``--reviewer``);
- ``capture.repository.add_prompt_correction`` (source ``api``; reviewer the caller's name,
  else the user id, else ``"api"``).

A row is never updated or deleted: an undo is a new row naming the one it reverses. ``applied``
is True when the row wrote ``corrected_intent`` of the log; ``prior_*`` are the values it
replaced (what an undo restores). ``before_intent`` is what the prompt was labelled before (its
correction, else its prediction); ``after_intent`` what it is labelled now.

The table is described here with ``sqlalchemy.table`` (no metadata): the capture layer cannot
import ``tasks.review_tables``, which owns the full definition.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Boolean, DateTime, Insert, Text, Uuid, column, insert, table

from capture.ids import uuid7

logger = logging.getLogger(__name__)

__all__ = ["AUDIT_SOURCES", "audit_values", "correction_audit", "insert_audit", "prior_of"]

#: Where a decision came from: the workbench, a corrections file, a Label Studio export, the
#: repository API (``add_prompt_correction``).
AUDIT_SOURCES: Final = ("ui", "file", "label_studio", "api")

REVIEW_DECISIONS = table(
    "review_decisions",
    column("id", Uuid()),
    column("round_id", Uuid()),
    column("item_id", Uuid()),
    column("log_id", Uuid()),
    column("reviewer_id", Uuid()),
    column("reviewer", Text()),
    column("action", Text()),
    column("before_intent", Text()),
    column("after_intent", Text()),
    column("notes", Text()),
    column("source", Text()),
    column("group_id", Uuid()),
    column("batch_id", Uuid()),
    column("undoes", Uuid()),
    column("applied", Boolean()),
    column("prior_corrected_intent", Text()),
    column("prior_correction_notes", Text()),
    column("prior_corrected_at", DateTime(timezone=True)),
    column("created_at", DateTime(timezone=True)),
)

Prior = tuple[str | None, str | None, datetime | None]


def prior_of(log: Any) -> Prior:
    """``(corrected_intent, correction_notes, corrected_at)`` of a log row (any object with those
    attributes): what a correction replaces."""
    return (log.corrected_intent, log.correction_notes, log.corrected_at)


def audit_values(
    *,
    log_id: uuid.UUID,
    reviewer: str,
    action: str,
    source: str,
    now: datetime,
    reviewer_id: uuid.UUID | None = None,
    round_id: uuid.UUID | None = None,
    item_id: uuid.UUID | None = None,
    before: str | None = None,
    after: str | None = None,
    notes: str | None = None,
    group_id: uuid.UUID | None = None,
    batch_id: uuid.UUID | None = None,
    undoes: uuid.UUID | None = None,
    applied: bool = False,
    prior: Prior = (None, None, None),
    decision_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """One ``review_decisions`` row as a dict (every column): who (``reviewer`` name, and the
    workbench user id when there is one), when (``now``, aware UTC), ``before`` → ``after``,
    ``source`` (one of :data:`AUDIT_SOURCES`; ``ValueError`` otherwise), ``action`` (the
    workbench's vocabulary: ``confirm``, ``correct``, ...). The id is a new UUIDv7 unless given."""
    if source not in AUDIT_SOURCES:
        raise ValueError(f"audit source: expected one of {AUDIT_SOURCES}, found {source!r}")
    if not reviewer or not reviewer.strip():
        raise ValueError("audit reviewer: expected a name, found nothing")
    return {
        "id": decision_id or uuid7(),
        "round_id": round_id,
        "item_id": item_id,
        "log_id": log_id,
        "reviewer_id": reviewer_id,
        "reviewer": reviewer.strip(),
        "action": action,
        "before_intent": before,
        "after_intent": after,
        "notes": notes,
        "source": source,
        "group_id": group_id,
        "batch_id": batch_id,
        "undoes": undoes,
        "applied": applied,
        "prior_corrected_intent": prior[0],
        "prior_correction_notes": prior[1],
        "prior_corrected_at": prior[2],
        "created_at": now,
    }


def insert_audit(rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Insert:
    """The INSERT of one audit row (a mapping from :func:`audit_values`: values bound) or, for a
    sequence, the bare statement to execute with it as parameters (``conn.execute(insert_audit
    (rows), rows)``: one executemany)."""
    if isinstance(rows, Mapping):
        return insert(REVIEW_DECISIONS).values(dict(rows))
    return insert(REVIEW_DECISIONS)


def correction_action(before: str | None, after: str) -> str:
    """``confirm`` when the correction keeps the label the prompt had, else ``correct``."""
    return "confirm" if before == after else "correct"


def correction_audit(
    log: Any | None,
    log_id: uuid.UUID,
    corrected_intent: str,
    notes: str | None,
    *,
    reviewer: str,
    source: str,
    now: datetime,
) -> dict[str, Any]:
    """The audit row (``applied``) of a correction written to the prompt whose row was ``log``
    before it (any object with the log's columns; None when it could not be read): ``before`` is
    the label the prompt had (its correction, else its prediction), the action that of
    :func:`correction_action`, ``prior`` the correction it replaced."""
    before = None if log is None else (log.corrected_intent or log.predicted_intent)
    return audit_values(
        log_id=log_id,
        reviewer=reviewer,
        action=correction_action(before, corrected_intent),
        source=source,
        now=now,
        before=before,
        after=corrected_intent,
        notes=notes,
        applied=True,
        prior=(None, None, None) if log is None else prior_of(log),
    )
