"""Shared helpers of the review workbench tests (no tests here): seeded logs, users, a catalogue.

tests/conftest.py builds the fixtures from these (``workbench_db``: the ``db_url`` database,
SQLite and PostgreSQL, with the workbench tables emptied too; ``wb_home``). ``seed_logs`` writes
prompts the review selection picks (low confidence, runners-up, a conversation, exact
duplicates); ``make_home`` writes a registry whose serving model's labels are the catalogue.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select

from capture import db
from capture.models import PromptLog
from capture.pointers import write_pointer
from capture.values import as_real
from review_ui.settings import WorkbenchSettings
from tasks.review_tables import TABLES, decisions
from tasks.review_users import ReviewUser, add_user
from tests.test_registry import stub_metadata

LOGS = cast(Table, PromptLog.__table__)
LABELS = ("banking", "calendar", "music", "weather", "oos")
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"
CONVERSATION = uuid.UUID("00000000-0000-4000-8000-00000000c0c0")


def clean_workbench_tables(url: str) -> None:
    with db.get_sync_engine(url).begin() as conn:
        for table in reversed(TABLES):
            conn.execute(delete(table))


def make_home(root: Path, labels: tuple[str, ...] = LABELS) -> Path:
    """A PROMPT_CAPTURE_HOME whose serving model (version 1) has ``labels``."""
    model = root / "models" / "1"
    model.mkdir(parents=True, exist_ok=True)
    stub_metadata("1", tuple(labels)).write(model)
    write_pointer(root / "models", "1")
    return root


@dataclass(frozen=True)
class Seeded:
    """Ids of the seeded logs by role."""

    ids: list[uuid.UUID]
    duplicates: list[uuid.UUID]  # same normalised text: one group
    conversation: list[uuid.UUID]  # message_index 0, 1, 2 of one conversation


def log_row(
    prompt: str,
    predicted: str,
    confidence: float,
    *,
    secondary: tuple[tuple[str, float], ...] = (),
    created_at: datetime,
    conversation_id: uuid.UUID | None = None,
    message_index: int | None = None,
    was_successful: bool | None = None,
    execution_error: str | None = None,
) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(),
        "user_id": None,
        "prompt": prompt,
        "predicted_intent": predicted,
        "confidence": as_real(confidence),
        "secondary_intents": [{"intent": i, "confidence": c} for i, c in secondary],
        "conversation_id": conversation_id,
        "message_index": message_index,
        "model_version": "1",
        "was_successful": was_successful,
        "workflow_type": None if was_successful is None else "demo",
        "execution_error": execution_error,
        "created_at": created_at,
        "updated_at": created_at,
    }


def seed_logs(url: str, n: int = 20, *, now: datetime = NOW) -> Seeded:
    """``n`` uncertain prompts (confidence 0.30 .. 0.59, each with three runners-up), three
    exact duplicates and a three-message conversation; all within the last day."""
    rows = []
    for i in range(n):
        predicted = LABELS[i % 4]
        alternatives = tuple(
            (name, round(0.3 - 0.08 * k, 2))
            for k, name in enumerate(x for x in LABELS if x != predicted)
        )[:3]
        rows.append(
            log_row(
                f"prompt number {i} about {predicted} call me at +44 20 7946 0958",
                predicted,
                0.30 + i * 0.29 / max(1, n - 1),
                secondary=alternatives,
                created_at=now - timedelta(hours=1, minutes=i),
                was_successful=False if i % 5 == 0 else None,
                execution_error="timeout for bob@example.com" if i % 5 == 0 else None,
            )
        )
    dupes = [
        log_row(text, "music", 0.31, created_at=now - timedelta(hours=2, minutes=k))
        for k, text in enumerate(("Play some jazz!", "play some jazz", "PLAY   some jazz."))
    ]
    conversation = [
        log_row(
            text,
            "calendar",
            conf,
            secondary=(("weather", 0.2),),
            created_at=now - timedelta(hours=3, minutes=10 - k),
            conversation_id=CONVERSATION,
            message_index=k,
        )
        for k, (text, conf) in enumerate(
            (("hi there", 0.95), ("book the dentist friday", 0.33), ("thanks", 0.96))
        )
    ]
    with db.get_sync_engine(url).begin() as conn:
        conn.execute(insert(LOGS), rows + dupes + conversation)
    return Seeded(
        ids=[r["id"] for r in rows],
        duplicates=[r["id"] for r in dupes],
        conversation=[r["id"] for r in conversation],
    )


def make_user(url: str, name: str, role: str = "reviewer") -> ReviewUser:
    with db.get_sync_engine(url).begin() as conn:
        return add_user(conn, name, role=role, password=PASSWORD, now=lambda: NOW)


def make_users(url: str, names: list[str], role: str = "reviewer") -> list[ReviewUser]:
    """Many users at once, sharing one argon2 hash of ``PASSWORD`` (hashing is slow on purpose)."""
    from argon2 import PasswordHasher

    from capture.ids import uuid7
    from tasks.review_tables import users

    hashed = PasswordHasher().hash(PASSWORD)
    made = [ReviewUser(uuid7(), name, role) for name in names]
    with db.get_sync_engine(url).begin() as conn:
        conn.execute(
            insert(users),
            [
                {
                    "id": u.id,
                    "name": u.name,
                    "role": role,
                    "password_hash": hashed,
                    "active": True,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for u in made
            ],
        )
    return made


def corrections(url: str) -> dict[uuid.UUID, tuple[str | None, str | None]]:
    """``{log id: (corrected_intent, correction_notes)}`` of every corrected log."""
    with db.get_sync_engine(url).connect() as conn:
        rows = conn.execute(
            select(LOGS.c.id, LOGS.c.corrected_intent, LOGS.c.correction_notes).where(
                LOGS.c.corrected_intent.is_not(None)
            )
        )
        return {r.id: (r.corrected_intent, r.correction_notes) for r in rows}


def audit(url: str) -> list[Any]:
    """Every audit row, oldest first."""
    with db.get_sync_engine(url).connect() as conn:
        return list(conn.execute(select(decisions).order_by(decisions.c.id)))


def settings_for(url: str, home: Path, **kw: Any) -> WorkbenchSettings:
    return WorkbenchSettings(home=home, database_url=url, secret_key="s" * 40, **kw)
