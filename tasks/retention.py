"""Raw-log retention: old prompt logs move, scrubbed, into the anonymised training store.

Rows of ``nlu_prompt_logs`` created before ``now - retention_days`` are, batch by batch and each
batch in ONE transaction:

1. deleted with ``DELETE ... RETURNING`` (so the copy is made from exactly the row version that
   was removed, even if a correction landed a moment before), then
2. inserted into ``nlu_training_examples`` with the prompt scrubbed (:func:`scrub_pii`), no user
   or conversation id, ``source_key = sha256(log id)`` and ``ON CONFLICT (source_key) DO
   NOTHING``.

A crash at any point rolls back the batch in progress (nothing lost: the raw rows are still
there) and keeps the committed ones (nothing duplicated: their raw rows are gone, and a copy
that already exists is skipped by the unique ``source_key``). Rerunning finishes the job.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import Any, cast

from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Connection, Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from capture.db import database_url, get_sync_engine, is_postgres
from capture.ids import uuid7
from capture.models import PromptLog, TrainingExample
from capture.queries import from_db_datetime, to_utc, utc_now
from tasks.anonymise import scrub_pii

logger = logging.getLogger(__name__)

LOGS = cast(Table, PromptLog.__table__)
EXAMPLES = cast(Table, TrainingExample.__table__)
SOURCE_PRODUCTION = "production"
DEFAULT_RETENTION_DAYS = 90
DEFAULT_BATCH_SIZE = 1_000

BeforeCommit = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class RetentionResult:
    """What one retention run did. ``deleted - copied`` rows already had their copy."""

    cutoff: datetime
    copied: int
    deleted: int
    batches: int

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cutoff"] = self.cutoff.isoformat()
        return data


def source_key(log_id: uuid.UUID) -> str:
    """The training row's link to its raw log: sha256 of the log id (hex), not the id itself."""
    return hashlib.sha256(str(log_id).encode("ascii")).hexdigest()


def iso_week_monday(moment: datetime) -> date:
    """The Monday (UTC) of the ISO week ``moment`` falls in."""
    day = to_utc(moment, "created_at").date()
    return day - timedelta(days=day.weekday())


def training_values(row: Any) -> dict[str, Any]:
    """The anonymised training-store row for one raw log row (a mapping of log columns)."""
    created_at = from_db_datetime(row["created_at"])
    assert created_at is not None  # NOT NULL column
    corrected = row["corrected_intent"]
    return {
        "id": uuid7(),
        "source_key": source_key(row["id"]),
        "prompt": scrub_pii(row["prompt"]),
        "label": corrected if corrected is not None else row["predicted_intent"],
        "source": SOURCE_PRODUCTION,
        "corrected": corrected is not None,
        "confidence": row["confidence"],
        "was_successful": row["was_successful"],
        "model_version": row["model_version"],
        "week": iso_week_monday(created_at),
    }


def _insert_ignoring_duplicates(url: str) -> Any:
    dialect_insert = postgresql.insert if is_postgres(url) else sqlite.insert
    return (
        dialect_insert(EXAMPLES)
        .on_conflict_do_nothing(index_elements=[EXAMPLES.c.source_key])
        .returning(EXAMPLES.c.source_key)
    )


def _move_batch(conn: Connection, url: str, cutoff: datetime, batch_size: int) -> tuple[int, int]:
    """Delete up to ``batch_size`` expired logs and copy them; returns (copied, deleted)."""
    oldest = (
        select(LOGS.c.id)
        .where(LOGS.c.created_at < cutoff)
        .order_by(LOGS.c.created_at, LOGS.c.id)
        .limit(batch_size)
    )
    if is_postgres(url):
        oldest = oldest.with_for_update(skip_locked=True)
    removed = conn.execute(
        delete(LOGS)
        .where(LOGS.c.id.in_(oldest.scalar_subquery()))
        .returning(
            LOGS.c.id,
            LOGS.c.prompt,
            LOGS.c.predicted_intent,
            LOGS.c.corrected_intent,
            LOGS.c.confidence,
            LOGS.c.was_successful,
            LOGS.c.model_version,
            LOGS.c.created_at,
        )
    ).all()
    if not removed:
        return 0, 0
    values = [training_values(row._mapping) for row in removed]
    copied = conn.execute(_insert_ignoring_duplicates(url), values).all()
    return len(copied), len(removed)


def run_retention(
    url: str | None = None,
    *,
    retention_days: float = DEFAULT_RETENTION_DAYS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    now: datetime | None = None,
    clock: Callable[[], datetime] = utc_now,
    before_commit: BeforeCommit | None = None,
) -> RetentionResult:
    """Move every raw log older than ``retention_days`` into the training store, in batches.

    ``now`` (or ``clock()``) fixes the cutoff; ``before_commit(batch_number)`` runs inside each
    batch's transaction just before it commits (tests inject a crash there).
    """
    if isinstance(retention_days, bool) or not retention_days > 0:
        raise ValueError(
            f"retention_days: expected a positive number of days, found {retention_days!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, found {batch_size!r}")
    url = database_url(url)
    cutoff = to_utc(now if now is not None else clock(), "now") - timedelta(days=retention_days)
    engine = get_sync_engine(url)
    copied = deleted = batches = 0
    while True:
        with engine.begin() as conn:
            batch_copied, batch_deleted = _move_batch(conn, url, cutoff, batch_size)
            if batch_deleted == 0:
                break
            if before_commit is not None:
                before_commit(batches + 1)
        batches += 1
        copied += batch_copied
        deleted += batch_deleted
        logger.info(
            "retention batch %d: deleted %d raw logs older than %s, copied %d",
            batches,
            batch_deleted,
            cutoff.isoformat(),
            batch_copied,
        )
        if batch_deleted < batch_size:
            break
    result = RetentionResult(cutoff=cutoff, copied=copied, deleted=deleted, batches=batches)
    logger.info(
        "retention done: %d raw logs deleted, %d copied to the training store, %d batches",
        deleted,
        copied,
        batches,
    )
    return result


@task(name="apply-retention", cache_policy=NO_CACHE)
def apply_retention(
    url: str | None = None,
    *,
    retention_days: float = DEFAULT_RETENTION_DAYS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    now: datetime | None = None,
) -> RetentionResult:
    """Prefect task: :func:`run_retention` with the flow's parameters."""
    return run_retention(url, retention_days=retention_days, batch_size=batch_size, now=now)
