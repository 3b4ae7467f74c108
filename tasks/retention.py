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

The two statements are ``capture.offline_statements.delete_expired_logs`` and
``insert_training_examples``. A bad ``retention_days`` or ``batch_size`` raises
``ParameterError`` (a ``UserError``) before the database is touched.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Connection

from capture.db import database_url, get_sync_engine, is_postgres
from capture.ids import uuid7
from capture.offline_statements import (
    check_count,
    check_positive,
    delete_expired_logs,
    insert_training_examples,
)
from capture.rows import RetrainingRow, map_retraining_row
from capture.values import to_utc, utc_now
from tasks.anonymise import scrub_pii

logger = logging.getLogger(__name__)

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


def training_values(row: RetrainingRow) -> dict[str, Any]:
    """The anonymised training-store row for one removed raw log."""
    return {
        "id": uuid7(),
        "source_key": source_key(row.id),
        "prompt": scrub_pii(row.prompt),
        "label": row.label,
        "source": SOURCE_PRODUCTION,
        "corrected": row.corrected,
        "confidence": row.confidence,
        "was_successful": row.was_successful,
        "model_version": row.model_version,
        "week": iso_week_monday(row.created_at),
    }


def _move_batch(
    conn: Connection, *, postgres: bool, cutoff: datetime, batch_size: int
) -> tuple[int, int]:
    """Delete up to ``batch_size`` expired logs and copy them; returns (copied, deleted)."""
    removed = conn.execute(
        delete_expired_logs(cutoff=cutoff, batch_size=batch_size, postgres=postgres)
    ).all()
    if not removed:
        return 0, 0
    values = [training_values(map_retraining_row(row)) for row in removed]
    copied = conn.execute(insert_training_examples(postgres=postgres), values).all()
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
    check_positive(retention_days, "retention_days")
    check_count(batch_size, "batch_size")
    url = database_url(url)
    postgres = is_postgres(url)
    cutoff = to_utc(now if now is not None else clock(), "now") - timedelta(days=retention_days)
    engine = get_sync_engine(url)
    copied = deleted = batches = 0
    while True:
        with engine.begin() as conn:
            batch_copied, batch_deleted = _move_batch(
                conn, postgres=postgres, cutoff=cutoff, batch_size=batch_size
            )
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
