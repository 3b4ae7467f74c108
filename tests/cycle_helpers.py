"""Helpers of the weekly-cycle tests: prompt log rows written straight to the database."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from capture import db, statements
from capture.ids import uuid7
from capture.models import PromptLog
from capture.rows import prompt_log_values

T = PromptLog.__table__
NOW = datetime.now(UTC)


@dataclass
class Log:
    prompt: str
    predicted: str
    confidence: float
    secondary: tuple[tuple[str, float], ...] = ()
    was_successful: bool | None = None
    corrected: str | None = None
    age_days: float = 1.0
    user_id: uuid.UUID | None = None


def insert_logs(url: str, logs: list[Log]) -> list[uuid.UUID]:
    """Insert ``logs`` (oldest first by ``age_days``), outcomes and corrections; return ids."""
    ids = []
    rows = []
    for log in logs:
        log_id = uuid7()
        ids.append(log_id)
        rows.append(
            prompt_log_values(
                log_id=log_id,
                prompt=log.prompt,
                predicted_intent=log.predicted,
                confidence=log.confidence,
                secondary_intents=log.secondary,
                user_id=log.user_id or uuid.uuid4(),
                conversation_id=uuid.uuid4(),
                message_index=0,
                model_version="1",
                created_at=NOW - timedelta(days=log.age_days),
            )
        )
    with db.get_sync_engine(url).begin() as conn:
        conn.execute(statements.insert_prompt_logs(), rows)
        for log_id, log in zip(ids, logs, strict=True):
            values: dict[str, Any] = {}
            if log.was_successful is not None:
                values["was_successful"] = log.was_successful
            if log.corrected is not None:
                values["corrected_intent"] = log.corrected
                values["corrected_at"] = NOW
            if values:
                conn.execute(update(PromptLog).where(PromptLog.id == log_id).values(**values))
    return ids


def corrections_in_db(url: str) -> dict[uuid.UUID, tuple[str | None, str | None]]:
    """{id: (corrected_intent, correction_notes)} of every row."""
    with db.get_sync_engine(url).connect() as conn:
        rows = conn.execute(select(T.c.id, T.c.corrected_intent, T.c.correction_notes))
        return {r.id: (r.corrected_intent, r.correction_notes) for r in rows}
