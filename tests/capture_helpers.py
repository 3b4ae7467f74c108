"""Shared helpers of the capture logger/service tests (classifiers, clocks, reading rows back)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from capture import db
from capture.logger import Sleep
from capture.models import PromptLog
from capture.pointers import write_pointer
from capture.service import NLUService, create_nlu_service
from capture.settings import Settings
from capture.types import Prediction


@dataclass
class FixedClassifier:
    """Answers the same prediction for every prompt; records what it was asked."""

    prediction: Prediction = field(
        default_factory=lambda: Prediction("scheduling", 0.875, (("calendar_event", 0.125),))
    )
    version: str | None = "test-v1"
    seen: list[str] = field(default_factory=list)

    def predict(self, text: str) -> Prediction:
        self.seen.append(text)
        return self.prediction


class StepClock:
    """A clock that advances one millisecond per reading, from a fixed UTC start."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 20, 9, 30, tzinfo=UTC)
        self.readings: list[datetime] = []

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        self.readings.append(self.now)
        return self.now


def capture_settings(url: str, home: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"home": home, "database_url": url, "flush_interval_s": 0.01}
    values.update(overrides)
    return Settings(**values)


def fixed_service(
    url: str,
    home: Path,
    *,
    application_name: str | None = None,
    sleep: Sleep | None = None,
    **overrides: Any,
) -> NLUService:
    """A service answering with a ``FixedClassifier`` that logs to ``url``, with the
    ``capture_settings`` of ``home`` (and ``overrides``); ``application_name`` and ``sleep`` (the
    reconnect backoff) as ``create_nlu_service`` takes them."""
    return create_nlu_service(
        FixedClassifier(),
        url=url,
        settings=capture_settings(url, home, **overrides),
        application_name=application_name,
        sleep=sleep,
    )


def aware(value: datetime | None) -> datetime | None:
    """Timestamps read back from SQLite are naive UTC; make them comparable."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def fetch_rows(url: str, ids: list[uuid.UUID] | None = None) -> dict[uuid.UUID, dict[str, Any]]:
    """Every prompt log row (or those with ``ids``) by id, as plain dicts."""
    table = PromptLog.__table__
    stmt = select(table)
    with db.get_sync_engine(url).connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
    wanted = set(ids) if ids is not None else None
    return {r["id"]: r for r in rows if wanted is None or r["id"] in wanted}


def count_rows(url: str) -> tuple[int, int]:
    """(rows, distinct ids) of nlu_prompt_logs."""
    from sqlalchemy import func

    table = PromptLog.__table__
    with db.get_sync_engine(url).connect() as conn:
        total, distinct = conn.execute(
            select(func.count(), func.count(func.distinct(table.c.id)))
        ).one()
    return int(total), int(distinct)


def fake_registry(root: Path, versions: tuple[str, ...] = ("1", "2")) -> Path:
    """``root/models`` with version dirs that look deployable (empty files; loaders are fake),
    serving the first of ``versions``; returns the models directory."""
    models = root / "models"
    for version in versions:
        (models / version).mkdir(parents=True)
        for name in ("metadata.json", "model.onnx", "tokenizer.json"):
            (models / version / name).write_text("{}")
    write_pointer(models, versions[0])
    return models


@contextmanager
def scratch_database(server_url: str, prefix: str, *, migrated: bool = False) -> Iterator[str]:
    """A new PostgreSQL database on ``server_url`` (named ``prefix`` plus a random suffix) for
    the ``with`` block, empty or ``migrated`` to head; its URL. Dropped afterwards, engines
    first."""
    url = db.create_database(server_url, prefix)
    try:
        if migrated:
            db.upgrade(url)
        yield url
    finally:
        db.clear_engine_cache()
        db.drop_database(server_url, url)
