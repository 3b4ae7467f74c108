"""The capture logger: a non-blocking, batched, lossless writer of prompt-log operations.

``submit_*`` never waits on the database: an operation (insert / outcome / correction) gets a
sequence number and goes to a bounded in-memory queue; a background asyncio task (the writer)
drains the queue in batches, one transaction per batch (PostgreSQL: binary ``COPY`` of the
queued wire rows, see :func:`capture.spool.wire_row`, plus ``UPDATE ... FROM unnest(...)``;
SQLite: ``executemany``).

Order: the writer applies operations strictly in sequence order, whether they come from memory
or from the spool, so an outcome is never applied before its insert. In ``buffered`` mode an
outcome or correction for a row that is still queued is merged into its insert.

Failures: a connection error sends the batch (and everything queued) to the spool
(:mod:`capture.spool`); new operations go to the spool until the writer has replayed it,
idempotently (ids are client-made: ``INSERT ... ON CONFLICT (id) DO NOTHING``), after a
reconnect with exponential backoff. A data error bisects the batch; the rows the database refuses
are counted as rejected, logged, and appended to ``HOME/rejected.jsonl``. The writer never dies.

Durability modes (``settings.durability``): see ``docs/CAPTURE.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import sqlalchemy.exc
from psycopg.adapt import Dumper, PyFormat
from psycopg.postgres import adapters as postgres
from psycopg.pq import Format
from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from capture import db
from capture.models import PromptLog
from capture.queries import as_real
from capture.settings import Settings, get_settings
from capture.spool import (
    C_CORRECTED,
    C_CORRECTED_AT,
    C_ERROR,
    C_ID,
    C_NOTES,
    C_SUCCESS,
    C_UPDATED,
    C_WORKFLOW,
    CORRECTION,
    DATA,
    INSERT,
    KIND,
    OUTCOME,
    ROW_COLUMNS,
    SEGMENT,
    SEQ,
    Op,
    Segment,
    Spool,
    as_uuid,
    encode_op,
    python_row,
    read_ops,
    wire_row,
)

logger = logging.getLogger(__name__)

SEGMENT_MAX_OPS = 100_000
TABLE = PromptLog.__tablename__
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CaptureStats:
    """Counters of one logger since it started.

    queued: operations accepted (inserts, outcomes, corrections; merged ones included);
    written: operations committed from memory (an insert that carries merged updates counts once);
    merged: outcomes/corrections folded into a still-queued insert;
    spooled: operations sent to the spool because the database failed or the queue was full;
    journaled: operations appended to the spool before returning (spool/fsync modes);
    replayed: operations applied from spool segments (own or left by a dead process);
    rejected: operations the database refused (bad data, unknown log id), see rejected.jsonl;
    truncated: prompts stored truncated to ``max_prompt_chars``;
    pending: operations not yet committed; connection_errors: database failures seen.
    """

    queued: int
    written: int
    merged: int
    spooled: int
    journaled: int
    replayed: int
    rejected: int
    truncated: int
    pending: int
    connection_errors: int


class ConnectionLostError(RuntimeError):
    """The database could not be reached (or dropped the connection) during a write."""


# --- COPY (binary format) ----------------------------------------------------------------
# bench/capture.py measured binary ``write_row`` (psycopg's C dumpers) at 2-3x the rows/s of a
# pre-formatted text block built in Python, so the writer sends binary COPY. The queued rows are
# already in binary-COPY form (wire rows): UUID and jsonb columns are bytes that psycopg's C
# ``bytes`` dumper copies as they are (:class:`_RawBinaryDumper`), so no Python code runs per
# value.

_PG_TYPES = (
    "uuid",
    "uuid",
    "text",
    "text",
    "float4",
    "jsonb",
    "text",
    "text",
    "timestamptz",
    "bool",
    "text",
    "text",
    "uuid",
    "int4",
    "text",
    "timestamptz",
    "timestamptz",
)
_BYTES_BINARY_DUMPER = postgres.get_dumper(bytes, PyFormat.BINARY)  # C when psycopg has it


class _RawBinaryDumper(Dumper):
    """Sends ``bytes`` already in the PostgreSQL binary format of the column's type.

    Registered by oid only (``register_dumper(None, ...)``), so it is used where ``set_types``
    names the type, i.e. in the writer's ``COPY``; an instance *is* psycopg's own ``bytes``
    dumper (the C one with ``psycopg[binary]``), which copies the bytes with no Python call.
    """

    format = Format.BINARY

    def __new__(cls, obj_cls: type | None, context: Any = None) -> Any:
        return _BYTES_BINARY_DUMPER(bytes, context)

    def dump(self, obj: Any) -> Any:
        return obj  # (not reached: instances are psycopg's bytes dumper)


class _RawUuidDumper(_RawBinaryDumper):
    oid = postgres.types["uuid"].oid


class _RawJsonbDumper(_RawBinaryDumper):
    oid = postgres.types["jsonb"].oid


# --- splitting a batch --------------------------------------------------------------------


@dataclass(slots=True)
class _Split:
    rows: list[Sequence[Any]]
    # id -> (values, ops): the last values win; ops are kept to report unknown ids.
    outcomes: dict[uuid.UUID, tuple[Sequence[Any], list[Op]]]
    corrections: dict[uuid.UUID, tuple[Sequence[Any], list[Op]]]


def _split(ops: list[Op]) -> _Split:
    rows = [op[DATA] for op in ops if op[KIND] == INSERT]
    split = _Split(rows, {}, {})
    if len(rows) == len(ops):
        return split  # the common case: a batch of new rows
    for op in ops:
        kind, _, data, _ = op
        if kind == INSERT:
            continue
        target = split.outcomes if kind == OUTCOME else split.corrections
        log_id = data[0]
        entry = target.get(log_id)
        if entry is None:
            target[log_id] = (data, [op])
        else:
            entry[1].append(op)
            target[log_id] = (data, entry[1])
    return split


def _unknown(target: dict[uuid.UUID, tuple[Sequence[Any], list[Op]]], found: set[Any]) -> list[Op]:
    return [op for log_id, (_, ops) in target.items() if log_id not in found for op in ops]


# --- backends -----------------------------------------------------------------------------

_COLUMNS_SQL = ", ".join(ROW_COLUMNS)
_OUTCOME_PG = f"""
UPDATE {TABLE} AS t
SET was_successful = u.ok, workflow_type = u.wt, execution_error = u.err, updated_at = u.at
FROM unnest(%s::uuid[], %s::boolean[], %s::text[], %s::text[], %s::timestamptz[])
    AS u(id, ok, wt, err, at)
WHERE t.id = u.id
RETURNING t.id
"""
_CORRECTION_PG = f"""
UPDATE {TABLE} AS t
SET corrected_intent = u.ci, correction_notes = u.cn, corrected_at = u.at, updated_at = u.at
FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::timestamptz[]) AS u(id, ci, cn, at)
WHERE t.id = u.id
RETURNING t.id
"""
_STAGE = "pc_capture_stage"


class _PostgresBackend:
    """A dedicated psycopg 3 connection (``application_name`` identifies it in pg_stat_activity)."""

    def __init__(self, url: str, application_name: str) -> None:
        self.dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.application_name = application_name
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.rls_active = False

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()
        self._conn = await psycopg.AsyncConnection.connect(
            self.dsn,
            autocommit=True,
            application_name=self.application_name,
            connect_timeout=5,
        )
        # PostgreSQL refuses COPY FROM into a table whose row-level security applies to this
        # role (migration 0003 FORCEs it); such a writer stages rows in a temp table instead.
        cur = await self._conn.execute("SELECT row_security_active(%s::regclass)", [TABLE])
        row = await cur.fetchone()
        self.rls_active = bool(row and row[0])
        if self.rls_active:
            logger.info(
                "capture writer: row-level security applies to this role; COPY goes through a "
                "staging table (a BYPASSRLS role writes faster, see docs/CAPTURE.md)"
            )
        return self._conn

    async def apply(self, ops: list[Op], *, idempotent: bool) -> list[Op]:
        """Apply ``ops`` in one transaction; return the update ops whose id has no row."""
        split = _split(ops)
        conn = await self._connection()
        unknown: list[Op] = []
        async with conn.transaction(), conn.cursor() as cur:
            # The raw dumpers serve this cursor's COPY only (registered on the cursor).
            cur.adapters.register_dumper(None, _RawUuidDumper)
            cur.adapters.register_dumper(None, _RawJsonbDumper)
            if split.rows:
                if idempotent or self.rls_active:
                    await cur.execute(
                        f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} "
                        f"(LIKE {TABLE} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                    )
                    await self._copy(cur, _STAGE, split.rows)
                    await cur.execute(
                        f"INSERT INTO {TABLE} ({_COLUMNS_SQL}) SELECT {_COLUMNS_SQL} "
                        f"FROM {_STAGE} ON CONFLICT (id) DO NOTHING"
                    )
                else:
                    await self._copy(cur, TABLE, split.rows)
            if split.outcomes:
                values = [v for v, _ in split.outcomes.values()]
                await cur.execute(
                    _OUTCOME_PG,
                    [[v[i] for v in values] for i in (0, 1, 2, 3, 4)],
                )
                found = {r[0] for r in await cur.fetchall()}
                unknown += _unknown(split.outcomes, found)
            if split.corrections:
                values = [v for v, _ in split.corrections.values()]
                await cur.execute(
                    _CORRECTION_PG,
                    [[v[i] for v in values] for i in (0, 1, 2, 4)],
                )
                found = {r[0] for r in await cur.fetchall()}
                unknown += _unknown(split.corrections, found)
        return unknown

    @staticmethod
    async def _copy(cur: psycopg.AsyncCursor[Any], table: str, rows: list[Sequence[Any]]) -> None:
        async with cur.copy(f"COPY {table} ({_COLUMNS_SQL}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(_PG_TYPES)
            # What AsyncCopy.write_row does, without a coroutine per row: the formatter (C)
            # appends the row to its buffer and hands back a block when the buffer is full.
            format_row = copy.formatter.write_row
            for row in rows:
                if block := format_row(row):
                    await copy.write(block)

    @staticmethod
    def classify(exc: BaseException) -> str:
        """``duplicate`` / ``data`` (bisect, reject) / ``connection`` (spool, retry)."""
        if isinstance(exc, psycopg.errors.UniqueViolation):
            return "duplicate"
        if isinstance(exc, psycopg.DataError | psycopg.IntegrityError | TypeError | ValueError):
            return "data"
        return "connection"

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._conn.close()
            self._conn = None


class _SqliteBackend:
    """SQLAlchemy Core executemany over the project's async SQLite engine."""

    application_name = ""

    def __init__(self, url: str) -> None:
        self.engine = db.get_engine(url)
        self.table: Table = PromptLog.__table__  # type: ignore[assignment]

    @staticmethod
    def _row_dict(row: Sequence[Any]) -> dict[str, Any]:
        values = python_row(row)
        values["confidence"] = as_real(values["confidence"])  # as PostgreSQL's REAL stores it
        return values

    async def apply(self, ops: list[Op], *, idempotent: bool) -> list[Op]:
        split = _split(ops)
        t = self.table
        unknown: list[Op] = []
        async with self.engine.begin() as conn:
            if split.rows:
                stmt = sqlite_insert(t).on_conflict_do_nothing(index_elements=["id"])
                await conn.execute(stmt, [self._row_dict(r) for r in split.rows])
            for target, columns in (
                (split.outcomes, ("was_successful", "workflow_type", "execution_error")),
                (split.corrections, ("corrected_intent", "correction_notes")),
            ):
                if not target:
                    continue
                ids = list(target)
                found: set[Any] = set()
                for start in range(0, len(ids), 500):
                    result = await conn.execute(
                        select(t.c.id).where(t.c.id.in_(ids[start : start + 500]))
                    )
                    found.update(result.scalars())
                unknown += _unknown(target, found)
                params = []
                for log_id in ids:
                    if log_id not in found:
                        continue
                    values = target[log_id][0]
                    item = {"b_id": log_id, "b_at": values[4]}
                    item.update({f"b_{c}": values[i + 1] for i, c in enumerate(columns)})
                    params.append(item)
                if params:
                    assignments: dict[str, Any] = {c: bindparam(f"b_{c}") for c in columns}
                    assignments["updated_at"] = bindparam("b_at")
                    if "corrected_intent" in columns:
                        assignments["corrected_at"] = bindparam("b_at")
                    stmt_u = update(t).where(t.c.id == bindparam("b_id")).values(assignments)
                    await conn.execute(stmt_u, params)
        return unknown

    @staticmethod
    def classify(exc: BaseException) -> str:
        if isinstance(exc, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.DataError):
            return "data"
        if isinstance(exc, sqlalchemy.exc.StatementError) and not isinstance(
            exc, sqlalchemy.exc.DBAPIError
        ):
            return "data"  # a value the type layer could not convert
        if isinstance(exc, TypeError | ValueError):
            return "data"
        return "connection"

    async def close(self) -> None:
        """The engine is shared per process (capture.db); nothing of our own to close."""


# --- the logger ---------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CaptureLogger:
    """Owns the queue, the spool and the writer task for one database URL."""

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        sleep: Sleep | None = None,
        application_name: str | None = None,
        backoff: tuple[float, float] = (0.05, 5.0),
    ) -> None:
        self.settings = settings or get_settings()
        self.url = db.database_url(url) if url else self.settings.resolved_database_url
        self.durability = self.settings.durability
        self._journal = self.durability != "buffered"
        self._batch_size = self.settings.batch_size
        self._max_buffer = self.settings.buffer_size
        self._flush_interval = self.settings.flush_interval_s
        self._sleep: Sleep = sleep or asyncio.sleep
        self._backoff = backoff
        self.application_name = application_name or f"prompt-capture-writer-{os.getpid()}"
        self._backend: _PostgresBackend | _SqliteBackend
        if db.is_postgres(self.url):
            self._backend = _PostgresBackend(self.url, self.application_name)
        else:
            self._backend = _SqliteBackend(self.url)
        self.spool = Spool(self.settings.spool_dir, fsync=self.durability == "fsync")
        self.rejected_path: Path = self.settings.home / "rejected.jsonl"

        self._buffer: deque[Op] = deque()
        # Buffered mode: id bytes -> the row as it is to be written (a merged outcome or
        # correction replaces it; the queued op picks up the latest row when it is taken).
        self._queued_inserts: dict[bytes, tuple[Any, ...]] = {}
        self._inflight: list[Op] | None = None
        self._seq = 0
        self._done_seq = 0
        self._spool_active = False
        self._closing = False
        self._closed = False
        self._orphans_done = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()

        self.queued = 0
        self.written = 0
        self.merged = 0
        self.spooled = 0
        self.journaled = 0
        self.replayed = 0
        self.rejected = 0
        self.truncated = 0
        self.connection_errors = 0

    # --- request side (synchronous, never waits) -------------------------------------------

    def stats(self) -> CaptureStats:
        return CaptureStats(
            queued=self.queued,
            written=self.written,
            merged=self.merged,
            spooled=self.spooled,
            journaled=self.journaled,
            replayed=self.replayed,
            rejected=self.rejected,
            truncated=self.truncated,
            pending=self._seq - self._done_seq,
            connection_errors=self.connection_errors,
        )

    def start(self) -> None:
        """Start the writer (needs a running event loop); called by the first submit."""
        if self._task is None:
            if self._closed:
                raise RuntimeError("the capture logger is closed")
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"capture-writer:{self.application_name}"
            )

    def submit_insert(self, row: Sequence[Any]) -> None:
        """Queue a new row (``ROW_COLUMNS`` order, already validated by the caller); UUIDs and
        secondary intents may be Python values (see :func:`capture.spool.wire_row`)."""
        self.submit_wire_row(wire_row(row))

    def submit_wire_row(self, row: tuple[Any, ...]) -> None:
        """Queue a new row already in wire form (what the service builds on the request path)."""
        if self._task is None:
            self.start()
        self._seq = seq = self._seq + 1
        op: Op = (INSERT, seq, row, None)
        buffer = self._buffer
        if self._journal or self._spool_active or len(buffer) >= self._max_buffer:
            if self._enqueue(op) and not self._journal:
                self._queued_inserts[row[C_ID]] = row
            return
        # The common case (buffered mode, healthy database), inlined: it is the request path.
        self.queued += 1
        buffer.append(op)
        self._queued_inserts[row[C_ID]] = row
        if len(buffer) >= self._batch_size:
            self._wake.set()

    def submit_outcome(
        self,
        log_id: uuid.UUID,
        was_successful: bool,
        workflow_type: str | None,
        execution_error: str | None,
        at: datetime,
    ) -> bool:
        """Queue an outcome; returns True when it was merged into a still-queued insert."""
        return self._submit_update(
            OUTCOME, [log_id, was_successful, workflow_type, execution_error, at]
        )

    def submit_correction(
        self, log_id: uuid.UUID, corrected_intent: str, correction_notes: str | None, at: datetime
    ) -> bool:
        return self._submit_update(
            CORRECTION, [log_id, corrected_intent, correction_notes, None, at]
        )

    @property
    def copy_mode(self) -> str:
        """How inserts reach PostgreSQL: ``direct`` COPY, or ``staged`` (COPY into a temp table,
        then INSERT; used when row-level security applies to the writer's role); ``executemany``
        on SQLite."""
        if isinstance(self._backend, _SqliteBackend):
            return "executemany"
        return "staged" if self._backend.rls_active else "direct"

    @property
    def orphans_replayed(self) -> bool:
        """False until the spool segments of stopped processes have been replayed."""
        return self._orphans_done

    @property
    def spooling(self) -> bool:
        """True while operations wait in this logger's spool (the database was down)."""
        return self._spool_active or bool(self.spool.pending)

    async def wait_orphans_replayed(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for the start-up replay; returns whether it is done."""
        self.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self._orphans_done:
                    self._progress.clear()
                    await self._progress.wait()
        return self._orphans_done

    def is_queued(self, log_id: uuid.UUID) -> bool:
        return log_id.bytes in self._queued_inserts

    def _submit_update(self, kind: str, data: list[Any]) -> bool:
        if self._task is None:
            self.start()
        key = data[0].bytes
        queued = self._queued_inserts.get(key)
        if queued is not None:
            row = list(queued)
            if kind == OUTCOME:
                row[C_SUCCESS], row[C_WORKFLOW], row[C_ERROR] = data[1], data[2], data[3]
            else:
                row[C_CORRECTED], row[C_NOTES], row[C_CORRECTED_AT] = data[1], data[2], data[4]
            row[C_UPDATED] = data[4]
            self._queued_inserts[key] = tuple(row)
            self.queued += 1
            self.merged += 1
            return True
        self._seq += 1
        self._enqueue((kind, self._seq, data, None))
        return False

    def _with_merges(self, ops: Iterable[Op]) -> list[Op]:
        """``ops`` with each queued insert carrying its latest row (merged updates)."""
        queued = self._queued_inserts
        out: list[Op] = []
        for op in ops:
            row = queued.get(op[DATA][C_ID]) if queued and op[KIND] == INSERT else None
            if row is not None and row is not op[DATA]:
                out.append((INSERT, op[SEQ], row, op[SEGMENT]))
            else:
                out.append(op)
        return out

    def _enqueue(self, op: Op) -> bool:
        """Put ``op`` in memory (True) or in the spool (False), journaling it in spool modes."""
        self.queued += 1
        if not self._spool_active and len(self._buffer) >= self._max_buffer:
            logger.warning(
                "capture queue full (%d operations): new operations go to the spool %s until "
                "the writer catches up",
                self._max_buffer,
                self.spool.directory,
            )
            self._spool_active = True
            if self._journal:
                self.spool.rotate(to_pending=False)
        try:
            if self._spool_active:
                segment = self.spool.append(op)
                if self._journal:
                    self.journaled += 1
                else:
                    self.spooled += 1
                self._maybe_rotate(segment, to_pending=True)
                return False
            if self._journal:
                journal = self.spool.append(op)
                op = (op[KIND], op[SEQ], op[DATA], journal)
                self.journaled += 1
                self._maybe_rotate(journal, to_pending=False)
        except OSError:
            # The spool is unwritable (disk full, permissions): keep the operation in memory
            # rather than fail the request; the writer still commits it.
            logger.exception("capture spool %s is not writable", self.spool.directory)
            op = (op[KIND], op[SEQ], op[DATA], None)
        self._buffer.append(op)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()
        return True

    def _maybe_rotate(self, segment: Segment, *, to_pending: bool) -> None:
        if segment.appended >= SEGMENT_MAX_OPS:
            self.spool.rotate(to_pending=to_pending)

    # --- flush / close -------------------------------------------------------------------

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every operation submitted so far is committed (or rejected).

        Waits while the database is down (the writer keeps retrying); pass ``timeout`` to bound
        the wait (raises ``TimeoutError``; nothing is lost: the operations stay queued/spooled).
        """
        self.start()
        target = self._seq
        async with asyncio.timeout(timeout):
            while self._done_seq < target or not self._orphans_done:
                if self._task is not None and self._task.done():
                    raise RuntimeError("the capture writer has stopped") from (
                        self._task.exception() if not self._task.cancelled() else None
                    )
                self._progress.clear()
                self._wake.set()
                await self._progress.wait()

    async def aclose(self, timeout: float = 30.0) -> None:
        """Write everything (or, if the database stays unreachable for ``timeout`` seconds,
        leave it in the spool for the next start), then stop the writer."""
        if self._closed:
            return
        self._closing = True
        if self._task is not None:
            try:
                await self.flush(timeout=timeout)
            except TimeoutError:
                logger.error(
                    "capture logger: database unreachable for %.0f s at close; "
                    "moving the unwritten operations to the spool",
                    timeout,
                )
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._closed = True
        leftover = [*(self._inflight or []), *self._with_merges(self._buffer)]
        self._inflight = None
        self._buffer.clear()
        self._queued_inserts.clear()
        if leftover and not self._journal:
            self.spool.write_segment(leftover)
            self.spooled += len(leftover)
        left = self.spool.close()
        await self._backend.close()
        if left:
            logger.warning(
                "capture logger closed; %d spool segment(s) left in %s (not yet committed); "
                "the next start replays them: %s",
                len(left),
                self.spool.directory,
                ", ".join(p.name for p in left),
            )
        else:
            logger.info("capture logger closed; all %d operations written", self.queued)

    # --- the writer ----------------------------------------------------------------------

    def _notify(self) -> None:
        self._progress.set()

    async def _run(self) -> None:
        delay = self._backoff[0]
        while not self._orphans_done:
            try:
                await self._replay_orphans()
                self._orphans_done = True
            except ConnectionLostError as exc:
                delay = await self._after_failure(exc, delay)
        self._notify()
        delay = self._backoff[0]
        while True:
            try:
                progressed = await self._step()
            except ConnectionLostError as exc:
                delay = await self._after_failure(exc, delay)
                continue
            except Exception:
                # A bug or an unexpected environment error (e.g. an unreadable spool file): log
                # it, keep the batch, retry later. The writer must not die.
                logger.exception("capture writer: unexpected error; retrying in %.2f s", delay)
                if self._inflight is not None:
                    self._buffer.extendleft(reversed(self._inflight))
                    self._inflight = None
                await self._sleep(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            if progressed:
                self._notify()
                continue
            self._notify()
            if self._closing:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)

    async def _after_failure(self, exc: BaseException, delay: float) -> float:
        self.connection_errors += 1
        logger.warning(
            "capture writer: database unavailable (%s); operations go to the spool %s; "
            "retrying in %.2f s",
            exc,
            self.spool.directory,
            delay,
        )
        self._notify()
        await self._sleep(delay)
        return min(delay * 2, self._backoff[1])

    async def _step(self) -> bool:
        pending = self.spool.pending
        if pending and (not self._buffer or pending[0].first_seq < self._buffer[0][SEQ]):
            await self._replay_own(pending[0])
            return True
        if self._buffer:
            await self._write_memory_batch()
            return True
        if self._spool_active:
            # Memory and older segments are done: the open spool segment is the newest data.
            self.spool.rotate(to_pending=True)
            self._spool_active = False
            logger.info("capture writer: spool replayed; back to the memory path")
            return bool(self.spool.pending)
        return False

    def _take_batch(self) -> list[Op]:
        buffer = self._buffer
        count = min(len(buffer), self._batch_size)
        pending = self.spool.pending
        if pending:
            bound = pending[0].first_seq
            batch: list[Op] = []
            while buffer and len(batch) < count and buffer[0][SEQ] < bound:
                batch.append(buffer.popleft())
        else:
            batch = [buffer.popleft() for _ in range(count)]
        queued = self._queued_inserts
        if queued:
            pop = queued.pop
            for index, op in enumerate(batch):
                if op[KIND] == INSERT:
                    row = pop(op[DATA][C_ID], None)
                    if row is not None and row is not op[DATA]:  # updates were merged into it
                        batch[index] = (INSERT, op[SEQ], row, op[SEGMENT])
        return batch

    async def _write_memory_batch(self) -> None:
        batch = self._take_batch()
        self._inflight = batch  # if the writer is cancelled mid-write, aclose() spools it
        rejected_before = self.rejected
        try:
            await self._write(batch, idempotent=False)
        except ConnectionLostError:
            self._inflight = None
            self._divert(batch)
            raise
        self._inflight = None
        self.written += len(batch) - (self.rejected - rejected_before)
        if self._journal:
            counts: dict[Segment, int] = {}
            for op in batch:
                journal = op[SEGMENT]
                if journal is not None:
                    counts[journal] = counts.get(journal, 0) + 1
            for segment, count in counts.items():
                self.spool.mark_committed(segment, count)
        self._done_seq = batch[-1][SEQ]

    def _divert(self, batch: list[Op]) -> None:
        """The database failed: from now on the spool holds everything not yet committed."""
        self._spool_active = True
        ops = [*batch, *self._with_merges(self._buffer)]
        self._buffer.clear()
        self._queued_inserts.clear()
        if self._journal:
            # Every queued operation is already in a journal segment: replay those instead.
            self.spool.all_uncovered()
            ops = [op for op in ops if op[SEGMENT] is None]  # journal write had failed
        if not ops:
            return
        try:
            self.spool.write_segment(ops)
        except OSError:
            logger.exception(
                "capture spool %s is not writable; keeping %d operations in memory",
                self.spool.directory,
                len(ops),
            )
            self._buffer.extendleft(reversed(ops))
            self._spool_active = False
            return
        self.spooled += len(ops)

    async def _write(self, ops: list[Op], *, idempotent: bool) -> None:
        """Apply ``ops``; bisect on data errors (rejecting single bad ops); raise
        :class:`ConnectionLostError` on anything else."""
        try:
            unknown = await self._backend.apply(ops, idempotent=idempotent)
        except Exception as exc:
            kind = self._backend.classify(exc)
            if kind == "duplicate" and not idempotent:
                # A batch whose commit was acknowledged-lost, re-sent: insert what is missing.
                await self._write(ops, idempotent=True)
                return
            if kind == "connection":
                raise ConnectionLostError(f"{type(exc).__name__}: {exc}") from exc
            if len(ops) == 1:
                self._reject(ops[0], f"{type(exc).__name__}: {exc}".strip())
                return
            middle = len(ops) // 2
            await self._write(ops[:middle], idempotent=idempotent)
            await self._write(ops[middle:], idempotent=idempotent)
            return
        for op in unknown:
            self._reject(op, f"unknown log id {op[DATA][0]}: no prompt log row has this id")

    def _reject(self, op: Op, reason: str) -> None:
        self.rejected += 1
        kind, seq, data, _ = op
        log_id = as_uuid(data[C_ID])
        logger.error("capture writer: rejected %s %s (seq %d): %s", kind, log_id, seq, reason)
        record = {"at": _utcnow().isoformat(), "reason": reason, "op": json.loads(encode_op(op))}
        self._append_rejected(json.dumps(record, ensure_ascii=False) + "\n")

    def _reject_line(self, path: Path, number: int, raw: bytes) -> None:
        self.rejected += 1
        record = {
            "at": _utcnow().isoformat(),
            "reason": f"unreadable spool line {path.name}:{number}",
            "raw": raw.decode("utf-8", "replace"),
        }
        self._append_rejected(json.dumps(record, ensure_ascii=False) + "\n")

    def _append_rejected(self, line: str) -> None:
        self.rejected_path.parent.mkdir(parents=True, exist_ok=True)
        with self.rejected_path.open("a", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(line)

    async def _replay(self, segment: Segment) -> int:
        """Apply a segment's operations idempotently, in order; returns how many were applied
        (rejected ones not counted)."""
        rejected_before = self.rejected
        total = 0
        chunk: list[Op] = []
        for number, item in read_ops(segment.path):
            if isinstance(item, bytes):
                self._reject_line(segment.path, number, item)
                rejected_before += 1
                continue
            chunk.append(item)
            if len(chunk) >= self._batch_size:
                await self._write(chunk, idempotent=True)
                total += len(chunk)
                chunk = []
        if chunk:
            await self._write(chunk, idempotent=True)
            total += len(chunk)
        return total - (self.rejected - rejected_before)

    async def _replay_own(self, segment: Segment) -> None:
        count = await self._replay(segment)
        self.spool.pending.remove(segment)
        segment.delete()
        self.replayed += count
        self._done_seq = max(self._done_seq, segment.last_seq)
        logger.info("capture writer: replayed %d operations from %s", count, segment.path.name)

    async def _replay_orphans(self) -> None:
        for segment in self.spool.orphans():
            try:
                count = await self._replay(segment)
            except BaseException:
                segment.release()
                raise
            segment.delete()
            self.replayed += count
            logger.info(
                "capture writer: replayed %d operations left by a stopped process (%s)",
                count,
                segment.path.name,
            )
