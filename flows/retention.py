"""The daily retention flow: raw logs past the retention period move to the training store."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger

from flows.entry import open_run
from tasks.retention import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_RETENTION_DAYS,
    apply_retention,
)


@flow(name="retention", log_prints=False)
def retention_flow(
    retention_days: float = DEFAULT_RETENTION_DAYS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    home: str | None = None,
    database_url: str | None = None,
    database_secret: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Copy raw logs older than ``retention_days`` (anonymised) into ``nlu_training_examples``
    and delete them, ``batch_size`` rows per transaction. ``now`` defaults to the current time.

    ``home`` defaults to PROMPT_CAPTURE_HOME; the database to ``database_url`` (no password),
    the Secret block ``database_secret``, PROMPT_CAPTURE_DATABASE_URL, or the home's SQLite file.
    Returns ``{"cutoff", "copied", "deleted", "batches", "partitions_dropped",
    "partitions_created", "moved_from_default"}`` (a standalone flow: the CLI prints it). On
    PostgreSQL, run as the table owner: it drops expired partitions and creates the next ones
    (``PROMPT_CAPTURE_PARTITION_INTERVAL``).
    """
    run = open_run(home, database_url, database_secret)
    result = apply_retention(
        run.require_database(),
        retention_days=retention_days,
        batch_size=batch_size,
        now=now,
        partition_interval=run.settings.partition_interval,
    )
    get_run_logger().info(
        "retention: deleted %d raw logs older than %s, copied %d to the training store "
        "(%d batches)",
        result.deleted,
        result.cutoff.isoformat(),
        result.copied,
        result.batches,
    )
    return result.as_dict()
