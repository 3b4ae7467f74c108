"""Helpers of the weekly-cycle tests: prompt log rows written straight to the database, and
corrections files as reviewers' tools write them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from capture import db, statements
from capture.ids import uuid7
from capture.models import PromptLog
from capture.rows import prompt_log_values

if TYPE_CHECKING:
    from tasks.corrections import ImportResult

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


#: Three logged prompts whose predictions (``music_play``, ``scheduling``, ``calendar_event``) are
#: the intents the database knows; ``weather`` is new to it (the ``three_logs`` fixture).
THREE_LOGS = [
    Log("play something by queen", "music_play", 0.5),
    Log("will it rain tomorrow", "scheduling", 0.4),
    Log("is it raining", "calendar_event", 0.4),
]
#: The corrections tests' catalog of known intents: those of ``THREE_LOGS`` and ``weather``.
CATALOG = {"music_play", "scheduling", "calendar_event", "weather"}
#: The ``import_rows`` fixture: ``import_rows(rows, **options)`` imports ``rows`` as a file.
Importer = Callable[..., "ImportResult"]


def correction_row(
    log_id: object, corrected: str, notes: str = "", prompt: str = "p"
) -> dict[str, Any]:
    """One row of a reviewed review file: ``log_id`` corrected to ``corrected``."""
    return {
        "id": str(log_id),
        "prompt": prompt,
        "predicted_intent": "scheduling",
        "confidence": 0.5,
        "created_at": "2026-11-20T10:00:00+00:00",
        "corrected_intent": corrected,
        "notes": notes,
    }


def write_list(path: Path, rows: list[Any], *, bom: bool = False, crlf: bool = False) -> Path:
    """``rows`` as a JSON list file (ASCII escapes such as ``"\\u0000"``, as tools write them),
    optionally with a UTF-8 byte-order mark and CRLF line ends."""
    text = json.dumps(rows, indent=2)
    if crlf:
        text = text.replace("\n", "\r\n")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path
