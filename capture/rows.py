"""Typed rows of ``nlu_prompt_logs`` and the monitoring statistics, and the mappers that build
them from result rows of :mod:`capture.statements` (the same on SQLite and PostgreSQL), and
what writers write: the validated row to insert (:func:`prompt_log_values`) and the two
updates, :class:`Outcome` and :class:`Correction` (named fields, shared by the repository, the
capture logger and its spool)::

    rows = [map_prompt_log(row) for row in session.execute(statements.select_low_confidence())]

Datetimes are timezone-aware UTC; confidences are the shortest decimal of the stored float4
(:func:`capture.values.from_real`).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, TypedDict, Unpack

from capture.text import check_intent_name
from capture.types import check_confidence
from capture.values import (
    SecondaryIntents,
    as_real,
    as_uuid,
    from_db_datetime,
    from_real,
    non_empty_text,
    optional_text,
    optional_uuid,
    parse_secondary_intents,
    secondary_intents_json,
    to_utc,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PromptLogRow:
    """One ``nlu_prompt_logs`` row, every column; datetimes are timezone-aware UTC."""

    id: uuid.UUID
    user_id: uuid.UUID | None
    prompt: str
    predicted_intent: str
    confidence: float | None
    secondary_intents: tuple[tuple[str, float], ...]
    corrected_intent: str | None
    correction_notes: str | None
    corrected_at: datetime | None
    was_successful: bool | None
    workflow_type: str | None
    execution_error: str | None
    conversation_id: uuid.UUID | None
    message_index: int | None
    model_version: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class RetrainingRow:
    """A prompt selected for retraining: ``label`` is the correction, else the prediction."""

    id: uuid.UUID
    prompt: str
    label: str
    predicted_intent: str
    confidence: float | None
    corrected: bool
    was_successful: bool | None
    model_version: str | None
    created_at: datetime

    def as_export_record(self) -> dict[str, Any]:
        """The design note's retraining JSONL record."""
        return {
            "text": self.prompt,
            "label": self.label,
            "confidence": self.confidence,
            "source": "production",
            "corrected": self.corrected,
        }


@dataclass(frozen=True, slots=True)
class ConfidenceBucket:
    """Rows whose confidence rounds to ``bucket`` (one decimal; ``None`` for NULL confidence)."""

    bucket: float | None
    count: int


@dataclass(frozen=True, slots=True)
class IntentStats:
    predicted_intent: str
    count: int
    avg_confidence: float | None
    corrections: int


@dataclass(frozen=True, slots=True)
class IntentSuccessRate:
    """``success_rate`` is a percentage with one decimal (rounded half up)."""

    predicted_intent: str
    total: int
    successes: int
    success_rate: float


def map_prompt_log(row: Any) -> PromptLogRow:
    m = row._mapping
    created_at = from_db_datetime(m["created_at"])
    updated_at = from_db_datetime(m["updated_at"])
    assert created_at is not None and updated_at is not None  # NOT NULL columns
    return PromptLogRow(
        id=m["id"],
        user_id=m["user_id"],
        prompt=m["prompt"],
        predicted_intent=m["predicted_intent"],
        confidence=None if m["confidence"] is None else from_real(m["confidence"]),
        secondary_intents=parse_secondary_intents(m["secondary_intents"]),
        corrected_intent=m["corrected_intent"],
        correction_notes=m["correction_notes"],
        corrected_at=from_db_datetime(m["corrected_at"]),
        was_successful=m["was_successful"],
        workflow_type=m["workflow_type"],
        execution_error=m["execution_error"],
        conversation_id=m["conversation_id"],
        message_index=m["message_index"],
        model_version=m["model_version"],
        created_at=created_at,
        updated_at=updated_at,
    )


def map_retraining_row(row: Any) -> RetrainingRow:
    m = row._mapping
    created_at = from_db_datetime(m["created_at"])
    assert created_at is not None
    corrected = m["corrected_intent"]
    return RetrainingRow(
        id=m["id"],
        prompt=m["prompt"],
        label=corrected if corrected is not None else m["predicted_intent"],
        predicted_intent=m["predicted_intent"],
        confidence=None if m["confidence"] is None else from_real(m["confidence"]),
        corrected=corrected is not None,
        was_successful=m["was_successful"],
        model_version=m["model_version"],
        created_at=created_at,
    )


def map_confidence_bucket(row: Any) -> ConfidenceBucket:
    tenths, count = row._mapping["conf_tenths"], row._mapping["count"]
    return ConfidenceBucket(bucket=None if tenths is None else int(tenths) / 10, count=int(count))


def map_intent_stats(row: Any) -> IntentStats:
    m = row._mapping
    avg = m["avg_conf"]
    return IntentStats(
        predicted_intent=m["predicted_intent"],
        count=int(m["count"]),
        avg_confidence=None if avg is None else round(float(avg), 6),
        corrections=int(m["corrections"]),
    )


def map_success_rate(row: Any) -> IntentSuccessRate:
    m = row._mapping
    return IntentSuccessRate(
        predicted_intent=m["predicted_intent"],
        total=int(m["total"]),
        successes=int(m["successes"]),
        success_rate=int(m["success_rate_tenths"]) / 10,
    )


class PromptContext(TypedDict, total=False):
    """The optional context of a logged prompt (keyword arguments of ``log_prompt``)."""

    user_id: uuid.UUID | str | None
    conversation_id: uuid.UUID | str | None
    message_index: int | None
    model_version: str | None


def prompt_log_values(
    *,
    log_id: uuid.UUID,
    prompt: str,
    predicted_intent: str,
    confidence: float,
    secondary_intents: SecondaryIntents = (),
    created_at: datetime,
    **context: Unpack[PromptContext],
) -> dict[str, Any]:
    """A validated row for :func:`capture.statements.insert_prompt_logs` (``ValueError`` names
    the bad field). Text as stored (:mod:`capture.text`): ``prompt`` cleaned
    (``clean_prompt``; empty after cleaning is refused), intent names checked
    (``check_intent_name``), ``model_version`` cleaned (blank -> ``None``)."""
    unknown = context.keys() - PromptContext.__optional_keys__
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    message_index = context.get("message_index")
    stored_prompt = non_empty_text(prompt, "prompt")
    intent = check_intent_name(predicted_intent, field="predicted_intent")
    check_confidence(confidence, "confidence")
    if message_index is not None and (
        isinstance(message_index, bool) or not isinstance(message_index, int) or message_index < 0
    ):
        raise ValueError(
            f"message_index: expected a non-negative integer or None, found {message_index!r}"
        )
    created = to_utc(created_at, "created_at")
    return {
        "id": as_uuid(log_id, "log_id"),
        "user_id": optional_uuid(context.get("user_id"), "user_id"),
        "prompt": stored_prompt,
        "predicted_intent": intent,
        "confidence": as_real(float(confidence)),
        "secondary_intents": secondary_intents_json(secondary_intents),
        "conversation_id": optional_uuid(context.get("conversation_id"), "conversation_id"),
        "message_index": message_index,
        "model_version": optional_text(context.get("model_version"), "model_version"),
        "created_at": created,
        "updated_at": created,
    }


# --------------------------------------------------------------------------- updates


class Outcome(NamedTuple):
    """A workflow outcome for the prompt log ``log_id``, made at ``at`` (timezone-aware UTC).

    What the capture logger queues and spools and what the repository writes; the columns it
    sets are :data:`capture.statements.OUTCOME_SET`."""

    log_id: uuid.UUID
    was_successful: bool
    workflow_type: str | None
    execution_error: str | None
    at: datetime

    @classmethod
    def checked(
        cls,
        log_id: uuid.UUID | str,
        *,
        was_successful: bool,
        workflow_type: str | None,
        execution_error: str | None = None,
        at: datetime,
    ) -> Outcome:
        """A validated outcome (``ValueError`` names the bad field); ``workflow_type`` and
        ``execution_error`` as stored (``capture.text.clean_notes``: blank -> ``None``)."""
        uid = as_uuid(log_id, "log_id")
        if not isinstance(was_successful, bool):
            raise ValueError(f"was_successful: expected True or False, found {was_successful!r}")
        return cls(
            uid,
            was_successful,
            optional_text(workflow_type, "workflow_type"),
            optional_text(execution_error, "execution_error"),
            to_utc(at, "at"),
        )


class Correction(NamedTuple):
    """A human correction of the prompt log ``log_id``, made at ``at`` (timezone-aware UTC);
    the columns it sets are :data:`capture.statements.CORRECTION_SET`."""

    log_id: uuid.UUID
    corrected_intent: str
    correction_notes: str | None
    at: datetime

    @classmethod
    def checked(
        cls,
        log_id: uuid.UUID | str,
        *,
        corrected_intent: str,
        correction_notes: str | None = None,
        at: datetime,
    ) -> Correction:
        """A validated correction (``ValueError`` names the bad field): ``corrected_intent``
        in the allowed form (``capture.text.check_intent_name``, an ``IntentNameError``
        otherwise), ``correction_notes`` as stored (``capture.text.clean_notes``)."""
        return cls(
            as_uuid(log_id, "log_id"),
            check_intent_name(corrected_intent, field="corrected_intent"),
            optional_text(correction_notes, "correction_notes"),
            to_utc(at, "corrected_at"),
        )


#: An update of one prompt log.
Change = Outcome | Correction
