"""Raw-log retention: old prompt logs move, scrubbed, into the anonymised training store.

Rows of ``nlu_prompt_logs`` created before ``cutoff = now - retention_days`` are copied into
``nlu_training_examples`` with the prompt scrubbed (:func:`scrub_pii`), no user or conversation
id, ``source_key = sha256(log id)`` and ``ON CONFLICT (source_key) DO NOTHING``, and removed.

PostgreSQL, run by the table owner (migration 0007 partitions the table by ``created_at``):

1. partitions that end at or before the cutoff are detached and renamed in ONE short
   transaction (``capture.partitions.detach_expired``, under ``lock_timeout``), which also
   corrects the monitoring rollup for their hours (``stats_rollup.forget_removed_rows``: a
   dropped partition fires no row trigger);
2. each detached table is copied in batches of ``batch_size`` rows (keyset order of its primary
   key, one transaction each), then DROPped: no row-by-row DELETE, no dead tuples;
3. rows before the cutoff that remain (the partition the cutoff falls in, rows the DEFAULT
   partition caught) are removed row-wise as below; run the flow shortly after a partition
   boundary (00:00 UTC for daily partitions) and that is a few minutes of rows;
4. partitions for rows the DEFAULT partition caught (created at or after the cutoff) are created
   and the rows moved into them, and partitions are created ``ahead_days`` ahead of now;
5. the partitioned parent is analyzed (``ANALYZE nlu_prompt_logs``): autovacuum analyzes the
   partitions but never the parent, whose statistics the planner uses above them and which the
   dropped and created partitions just changed (no lock that blocks readers or writers).

Shadow predictions (production A/B, migration 0008; no foreign key to the logs) of logs created
before the cutoff are deleted after the logs, in batches (:func:`delete_expired_shadow`).

Row-wise (SQLite; a non-owner role; step 3), batch by batch and each batch in ONE transaction:
``DELETE ... RETURNING`` (the copy is made from exactly the row version removed), then the insert.

Crash safety: a crash in a row-wise batch rolls it back (nothing lost: the raw rows are still
there) and keeps the committed ones (nothing duplicated: their raw rows are gone, and a copy
that already exists is skipped by the unique ``source_key``). A crash after a detach leaves the
renamed table (``nlu_prompt_logs_expired_*``) with every row, whether its copy was finished or
not; the next run copies it again (existing copies skipped) and only then drops it. Rerunning
finishes the job either way.

The statements are ``capture.offline_statements.delete_expired_logs`` and
``insert_training_examples``, and ``capture.partitions``. A bad ``retention_days`` or
``batch_size`` raises ``ParameterError`` (a ``UserError``) before the database is touched.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from functools import partial
from typing import Any

import sqlalchemy as sa
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError

from capture import partitions, stats_rollup
from capture.db import database_url, get_sync_engine, is_postgres
from capture.ids import uuid7
from capture.offline_statements import (
    EXPIRED_COLUMNS,
    TRAINING_COLUMNS,
    check_count,
    check_positive,
    delete_expired_logs,
    insert_training_examples,
    training_copy_sql,
)
from capture.rows import RetrainingRow, map_retraining_row
from capture.settings import PartitionInterval
from capture.shadow import shadow_predictions
from capture.values import to_utc, utc_now
from tasks.anonymise import scrub_pii

logger = logging.getLogger(__name__)

SOURCE_PRODUCTION = "production"
DEFAULT_RETENTION_DAYS = 90
DEFAULT_BATCH_SIZE = 1_000

#: Tries to take the table lock a partition DDL needs (``LOCK_TIMEOUT_S`` each).
DDL_ATTEMPTS = 3
LOCK_TIMEOUT_S = 5.0

BeforeCommit = Callable[[int], None]
BeforeDrop = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class RetentionResult:
    """What one retention run did. ``deleted - copied`` rows already had their copy.

    ``deleted`` counts rows of dropped partitions and rows deleted row-wise; ``batches`` the
    committed copy transactions of both; ``partitions_dropped`` / ``partitions_created``:
    partition DDL (PostgreSQL); ``moved_from_default``: rows the DEFAULT partition held that
    moved into a new partition."""

    cutoff: datetime
    copied: int
    deleted: int
    batches: int
    partitions_dropped: int = 0
    partitions_created: int = 0
    moved_from_default: int = 0
    #: Rows of ``nlu_shadow_predictions`` (production A/B, migration 0008) whose log was created
    #: before the cutoff, deleted with their logs (:func:`delete_expired_shadow`).
    shadow_deleted: int = 0
    #: Wall seconds per step (``detach``, ``copy``, ``drop``, ``rows``, ``create``,
    #: ``analyze``); logged and read by ``bench/scale.py``, not part of :meth:`as_dict` (it
    #: varies from run to run).
    seconds: dict[str, float] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["seconds"]
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


#: The counts of a :class:`RetentionResult` that a run adds up as it goes.
_COUNTED = (
    "copied",
    "deleted",
    "batches",
    "partitions_dropped",
    "partitions_created",
    "moved_from_default",
)


@dataclass(slots=True)
class _Progress:
    """The run so far: its result's :data:`_COUNTED` counts, and wall seconds per step."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTED, 0))
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def batches(self) -> int:
        return self.counts["batches"]

    def add(self, **counts: int) -> None:
        for name, n in counts.items():
            self.counts[name] += n  # a KeyError for a name outside _COUNTED

    def took(self, step: str, started: float) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - started

    def result(self, cutoff: datetime, *, shadow_deleted: int) -> RetentionResult:
        return RetentionResult(
            cutoff=cutoff, shadow_deleted=shadow_deleted, seconds=self.seconds, **self.counts
        )


def _with_lock_retries(engine: Engine, what: str, work: Callable[[Connection], Any]) -> Any:
    """Run ``work`` in a transaction (``work`` sets ``lock_timeout`` before its DDL); retry a
    lock timeout ``DDL_ATTEMPTS`` times (a long reader holds the table), then raise."""
    for attempt in range(1, DDL_ATTEMPTS + 1):
        try:
            with engine.begin() as conn:
                return work(conn)
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != "55P03" or attempt == DDL_ATTEMPTS:
                raise
            logger.warning("retention: %s waited too long for a table lock; retrying", what)
            time.sleep(attempt)
    raise AssertionError("unreachable")


def _detach_expired(conn: Connection, cutoff: datetime) -> list[str]:
    # No refresh runs between the drop and the fix (waits for a running one, however long).
    conn.execute(stats_rollup.lock_stats_state())
    partitions.set_lock_timeout(conn, LOCK_TIMEOUT_S)  # the DDL must not queue for long
    detached = partitions.detach_expired(conn, cutoff)
    for partition, _ in detached:
        end = partition.end
        assert end is not None  # an expired partition has an upper bound
        stats_rollup.forget_removed_rows(conn, partition.start, end)
    return [name for _, name in detached]


def _copy_training_rows(conn: Connection, rows: list[RetrainingRow]) -> int:
    """PostgreSQL: the scrubbed copies of ``rows`` into the training store through ``COPY``
    into a staging table (:func:`capture.offline_statements.training_copy_sql`), in the
    caller's transaction; returns how many were new."""
    stage, copy_sql, merge = training_copy_sql()
    driver = conn.connection.driver_connection
    assert driver is not None
    with driver.cursor() as cur:
        cur.execute(stage)
        with cur.copy(copy_sql) as copy:
            for row in rows:
                values = training_values(row)
                copy.write_row([values[column] for column in TRAINING_COLUMNS])
        cur.execute(merge)
        return max(int(cur.rowcount), 0)


def _copy_expired_table(
    engine: Engine,
    name: str,
    *,
    batch_size: int,
    before_commit: BeforeCommit | None,
    progress: _Progress,
) -> int:
    """Copy every row of a detached partition into the training store; returns its rows."""
    table = partitions.expired_table(name)
    after: tuple[Any, Any] | None = None
    rows_seen = 0
    while True:
        with engine.begin() as conn:
            statement = partitions.select_expired_rows(
                table, EXPIRED_COLUMNS, after=after, limit=batch_size
            )
            rows = conn.execute(statement).all()
            if not rows:
                break
            copied = _copy_training_rows(conn, [map_retraining_row(row) for row in rows])
            if before_commit is not None:
                before_commit(progress.batches + 1)
        progress.add(batches=1, copied=copied)
        rows_seen += len(rows)
        after = (rows[-1].id, rows[-1].created_at)
        if len(rows) < batch_size:
            break
    return rows_seen


def _drop_expired_partitions(
    engine: Engine,
    cutoff: datetime,
    *,
    batch_size: int,
    before_commit: BeforeCommit | None,
    before_drop: BeforeDrop | None,
    progress: _Progress,
) -> None:
    copy_and_drop = partial(
        _copy_and_drop,
        engine,
        batch_size=batch_size,
        before_commit=before_commit,
        before_drop=before_drop,
        progress=progress,
    )
    with engine.connect() as conn:
        left = partitions.list_expired_tables(conn)  # a run that stopped after detaching
    for name in left:
        copy_and_drop(name)
    started = time.perf_counter()
    detached = _with_lock_retries(engine, "detach", lambda conn: _detach_expired(conn, cutoff))
    progress.took("detach", started)
    for name in detached:
        copy_and_drop(name)


def _copy_and_drop(
    engine: Engine,
    name: str,
    *,
    batch_size: int,
    before_commit: BeforeCommit | None,
    before_drop: BeforeDrop | None,
    progress: _Progress,
) -> None:
    """Copy a detached partition into the training store, then drop it."""
    started = time.perf_counter()
    rows = _copy_expired_table(
        engine, name, batch_size=batch_size, before_commit=before_commit, progress=progress
    )
    progress.took("copy", started)
    if before_drop is not None:
        before_drop(name)
    dropping = time.perf_counter()
    with engine.begin() as conn:
        partitions.drop_expired_table(conn, name)
    progress.took("drop", dropping)
    progress.add(deleted=rows, partitions_dropped=1)
    logger.info(
        "retention: partition %s (%d rows) copied and dropped in %.1f s",
        name,
        rows,
        time.perf_counter() - started,
    )


def _delete_rows(
    engine: Engine,
    *,
    postgres: bool,
    cutoff: datetime,
    batch_size: int,
    before_commit: BeforeCommit | None,
    progress: _Progress,
) -> None:
    """The row-wise path: batches of ``DELETE ... RETURNING`` + copy, one transaction each."""
    while True:
        with engine.begin() as conn:
            batch_copied, batch_deleted = _move_batch(
                conn, postgres=postgres, cutoff=cutoff, batch_size=batch_size
            )
            if batch_deleted == 0:
                break
            if before_commit is not None:
                before_commit(progress.batches + 1)
        progress.add(batches=1, copied=batch_copied, deleted=batch_deleted)
        logger.info(
            "retention batch %d: deleted %d raw logs older than %s, copied %d",
            progress.batches,
            batch_deleted,
            cutoff.isoformat(),
            batch_copied,
        )
        if batch_deleted < batch_size:
            break


def _maintain_partitions(
    conn: Connection,
    *,
    now: datetime,
    cutoff: datetime,
    ahead_days: float,
    interval: PartitionInterval | None,
) -> partitions.PartitionChanges:
    """Partitions for the rows the DEFAULT partition caught (created at or after the cutoff,
    before the horizon) and for every period up to ``ahead_days`` after ``now``."""
    partitions.set_lock_timeout(conn, LOCK_TIMEOUT_S)
    horizon = now + timedelta(days=ahead_days)
    if interval is None:
        interval = partitions.infer_interval(partitions.list_partitions(conn))
    caught = partitions.default_periods(conn, since=cutoff, until=horizon, interval=interval)
    return partitions.ensure_partitions(
        conn, start=now, end=horizon, interval=interval, periods=caught
    )


def _analyze_parent(engine: Engine) -> None:
    """``ANALYZE`` the partitioned parent (step 5 of the module docstring). On PostgreSQL
    before 18 it samples every partition on the way (there is no ``ANALYZE ONLY``); it takes
    SHARE UPDATE EXCLUSIVE locks, which block no reader, writer or refresh."""
    with engine.begin() as conn:
        conn.exec_driver_sql(f"ANALYZE {partitions.PARENT}")


def delete_expired_shadow(engine: Engine, cutoff: datetime, *, batch_size: int) -> int:
    """Delete the shadow predictions of logs created before ``cutoff`` (the shadow table has no
    foreign key, so dropped log partitions leave them behind), ``batch_size`` log ids per
    transaction, oldest first; returns the rows deleted. A shadow row carries its log's
    ``created_at`` (``log_created_at``), so it expires exactly with its log."""
    shadow = shadow_predictions
    expired = (
        sa.select(shadow.c.log_id)
        .where(shadow.c.log_created_at < cutoff)
        .order_by(shadow.c.log_created_at)
        .limit(batch_size)
    )
    statement = sa.delete(shadow).where(shadow.c.log_id.in_(expired.scalar_subquery()))
    deleted = 0
    while True:
        with engine.begin() as conn:
            n = max(int(conn.execute(statement).rowcount), 0)
        deleted += n
        if n == 0:
            return deleted


def run_retention(
    url: str | None = None,
    *,
    retention_days: float = DEFAULT_RETENTION_DAYS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    now: datetime | None = None,
    clock: Callable[[], datetime] = utc_now,
    before_commit: BeforeCommit | None = None,
    before_drop: BeforeDrop | None = None,
    partition_interval: PartitionInterval | None = None,
    ahead_days: float = partitions.AHEAD_DAYS,
) -> RetentionResult:
    """Move every raw log older than ``retention_days`` into the training store (see the
    module docstring for the PostgreSQL partition path and the row-wise one).

    ``now`` (or ``clock()``) fixes the cutoff; ``before_commit(batch_number)`` runs inside each
    copy transaction just before it commits, ``before_drop(table)`` between the copy of a
    detached partition and its DROP (tests inject crashes there). ``partition_interval``: the
    width of the partitions created (default: that of the newest one); ``ahead_days``: how far
    ahead of ``now`` partitions are created. A role that does not own the table cannot run
    partition DDL: it removes every expired row row-wise (and says so in a warning).
    """
    check_positive(retention_days, "retention_days")
    check_count(batch_size, "batch_size")
    check_positive(ahead_days, "ahead_days")
    if partition_interval is not None:
        partitions.check_interval(partition_interval)
    url = database_url(url)
    postgres = is_postgres(url)
    reference = to_utc(now if now is not None else clock(), "now")
    cutoff = reference - timedelta(days=retention_days)
    engine = get_sync_engine(url)
    progress = _Progress()
    manage = False
    if postgres:
        with engine.connect() as conn:
            partitioned = partitions.is_partitioned(conn)
            manage = partitioned and partitions.can_manage(conn)
        if partitioned and not manage:
            logger.warning(
                "retention: this role does not own %s, so it cannot drop expired partitions or "
                "create new ones; expired rows are deleted row by row. Run the retention flow "
                "as the table owner (docs/DATABASE.md, Partitions)",
                partitions.PARENT,
            )
    if manage:
        _drop_expired_partitions(
            engine,
            cutoff,
            batch_size=batch_size,
            before_commit=before_commit,
            before_drop=before_drop,
            progress=progress,
        )
    started = time.perf_counter()
    _delete_rows(
        engine,
        postgres=postgres,
        cutoff=cutoff,
        batch_size=batch_size,
        before_commit=before_commit,
        progress=progress,
    )
    progress.took("rows", started)
    started = time.perf_counter()
    shadow_deleted = delete_expired_shadow(engine, cutoff, batch_size=batch_size)
    progress.took("shadow", started)
    if manage:
        started = time.perf_counter()
        changes = _with_lock_retries(
            engine,
            "create partitions",
            lambda conn: _maintain_partitions(
                conn,
                now=reference,
                cutoff=cutoff,
                ahead_days=ahead_days,
                interval=partition_interval,
            ),
        )
        progress.took("create", started)
        progress.add(partitions_created=len(changes.created), moved_from_default=changes.moved_rows)
        started = time.perf_counter()
        _analyze_parent(engine)
        progress.took("analyze", started)
    result = progress.result(cutoff, shadow_deleted=shadow_deleted)
    logger.info(
        "retention done: %d raw logs deleted (%d partitions dropped), %d copied to the training "
        "store, %d batches; %d partitions created, %d rows moved out of the DEFAULT partition; "
        "%d shadow predictions deleted",
        result.deleted,
        result.partitions_dropped,
        result.copied,
        result.batches,
        result.partitions_created,
        result.moved_from_default,
        result.shadow_deleted,
    )
    return result


@task(name="apply-retention", cache_policy=NO_CACHE)
def apply_retention(
    url: str | None = None,
    *,
    retention_days: float = DEFAULT_RETENTION_DAYS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    now: datetime | None = None,
    partition_interval: PartitionInterval | None = None,
) -> RetentionResult:
    """Prefect task: :func:`run_retention` with the flow's parameters."""
    return run_retention(
        url,
        retention_days=retention_days,
        batch_size=batch_size,
        now=now,
        partition_interval=partition_interval,
    )
