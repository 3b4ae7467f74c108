"""The COPY writer: applies one batch of capture-logger operations in one transaction.

The capture logger (:mod:`capture.logger`) hands a writer a batch of operations (see
:data:`capture.spool_format.Op`) in sequence order; ``apply`` writes them in one transaction and
returns the update operations whose log id has no row (the logger rejects those):

- :class:`PostgresWriter`: a dedicated psycopg 3 connection. New rows go by binary ``COPY`` of
  the queued wire rows, with the column types of the spool's column table
  (:data:`capture.spool_format.COPY_TYPES`); replays (idempotent) and roles under row-level security
  copy into a temp staging table and ``INSERT ... ON CONFLICT (id, created_at) DO NOTHING`` from
  it (the primary key of the partitioned table, migration 0007: a replayed row carries the
  ``created_at`` it was first written with). Outcomes and corrections are the shared update
  statement in its batch form (:func:`capture.statements.update_logs` with ``batch=True``:
  ``UPDATE ... FROM unnest(...)``), UUIDv7 ids looked up near their time first, so that each
  probes one partition.
- :class:`SqliteWriter`: SQLAlchemy Core ``executemany`` of the same insert and updates.

``classify(exc)`` says what a failure means to the logger: ``duplicate`` (a batch re-sent after a
lost commit acknowledgement), ``data`` (bisect and reject) or ``connection`` (spool and retry).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import psycopg
import psycopg.errors
import sqlalchemy.exc
from psycopg.adapt import AdaptersMap, Dumper, PyFormat
from psycopg.postgres import adapters as postgres
from psycopg.pq import Format
from sqlalchemy import select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from capture import db, statements
from capture.rows import Change
from capture.spool_format import (
    CHANGE_TYPES,
    COPY_TYPES,
    INSERT,
    ROW_COLUMNS,
    Op,
    python_row,
)
from capture.values import as_real

logger = logging.getLogger(__name__)

TABLE = statements.TABLE.name
_COLUMNS_SQL = ", ".join(ROW_COLUMNS)
_STAGE = "pc_capture_stage"
_SQLITE_IDS_PER_SELECT = 500


# --- binary COPY of wire rows -------------------------------------------------------------
# bench/capture.py measured binary ``write_row`` (psycopg's C dumpers) at 2-3x the rows/s of a
# pre-formatted text block built in Python, so the writer sends binary COPY. The queued rows are
# already in binary-COPY form (wire rows): UUID and jsonb columns are bytes that psycopg's C
# ``bytes`` dumper copies as they are (:class:`_RawBinaryDumper`), so no Python code runs per
# value.

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


def register_wire_dumpers(adapters: AdaptersMap) -> None:
    """Let a binary ``COPY`` with :data:`capture.spool_format.COPY_TYPES` take wire rows as they are
    (register on a cursor's or connection's ``adapters``)."""
    adapters.register_dumper(None, _RawUuidDumper)
    adapters.register_dumper(None, _RawJsonbDumper)


def copy_sql(table: str) -> str:
    """The binary ``COPY ... FROM STDIN`` of wire rows into ``table``."""
    return f"COPY {table} ({_COLUMNS_SQL}) FROM STDIN (FORMAT BINARY)"


# --- splitting a batch --------------------------------------------------------------------


@dataclass(slots=True)
class _Split:
    rows: list[Any]
    # kind -> id -> (the last update of that id, all its ops: to report an unknown id).
    changes: dict[str, dict[uuid.UUID, tuple[Change, list[Op]]]] = field(default_factory=dict)

    def unknown(self, kind: str, found: set[Any]) -> list[Op]:
        """The ops of ``kind`` whose id is not in ``found``."""
        target = self.changes[kind]
        return [op for log_id, (_, ops) in target.items() if log_id not in found for op in ops]


def _split(ops: list[Op]) -> _Split:
    rows = [data for kind, _, data, _ in ops if kind == INSERT]
    split = _Split(rows)
    if len(rows) == len(ops):
        return split  # the common case: a batch of new rows
    split.changes = {kind: {} for kind in CHANGE_TYPES}  # outcomes first, then corrections
    for op in ops:
        kind, _, change, _ = op
        if kind == INSERT:
            continue
        target = split.changes[kind]
        entry = target.get(change.log_id)
        if entry is None:
            target[change.log_id] = (change, [op])
        else:
            entry[1].append(op)
            target[change.log_id] = (change, entry[1])  # the last update wins
    split.changes = {kind: target for kind, target in split.changes.items() if target}
    return split


@cache
def _batch_update_sql(kind: str, near_id_time: bool = False) -> str:
    """The batch form of the shared update statement, as psycopg takes it."""
    statement = statements.update_logs(CHANGE_TYPES[kind], batch=True, near_id_time=near_id_time)
    return str(statement.compile(dialect=postgresql.psycopg.dialect()))


# --- writers ------------------------------------------------------------------------------


class PostgresWriter:
    """A dedicated psycopg 3 connection (``application_name`` identifies it in pg_stat_activity)."""

    def __init__(self, url: str, application_name: str) -> None:
        self.dsn = db.libpq_url(url)
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
            register_wire_dumpers(cur.adapters)  # this cursor's COPY only
            if split.rows:
                if idempotent or self.rls_active:
                    await cur.execute(
                        f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} "
                        f"(LIKE {TABLE} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                    )
                    await self._copy(cur, _STAGE, split.rows)
                    await cur.execute(
                        f"INSERT INTO {TABLE} ({_COLUMNS_SQL}) SELECT {_COLUMNS_SQL} "
                        f"FROM {_STAGE} ON CONFLICT (id, created_at) DO NOTHING"
                    )
                else:
                    await self._copy(cur, TABLE, split.rows)
            for kind, target in split.changes.items():
                found = await self._update(cur, kind, [change for change, _ in target.values()])
                unknown += split.unknown(kind, found)
        return unknown

    @staticmethod
    async def _update(cur: psycopg.AsyncCursor[Any], kind: str, changes: list[Change]) -> set[Any]:
        """Apply updates of distinct rows; returns the ids found. The table is partitioned by
        ``created_at``: UUIDv7 ids are looked up near their time first, one statement per UTC
        day of their ids (live traffic: one, pruned to the current partition), then the ids
        not found there, and any other ids, in every partition."""
        found: set[Any] = set()
        groups, _ = statements.near_id_time_groups(changes)
        for group in groups:
            params = statements.batch_params(group, near_id_time=True)
            await cur.execute(_batch_update_sql(kind, True), params)
            found.update(r[0] for r in await cur.fetchall())
        rest = [c for c in changes if c.log_id not in found]
        if rest:
            await cur.execute(_batch_update_sql(kind), statements.batch_params(rest))
            found.update(r[0] for r in await cur.fetchall())
        return found

    @staticmethod
    async def _copy(cur: psycopg.AsyncCursor[Any], table: str, rows: list[Any]) -> None:
        async with cur.copy(copy_sql(table)) as copy:
            copy.set_types(COPY_TYPES)
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


class SqliteWriter:
    """SQLAlchemy Core executemany over the project's async SQLite engine."""

    application_name = ""

    def __init__(self, url: str) -> None:
        self.engine = db.get_engine(url)

    @staticmethod
    def _row_dict(row: Any) -> dict[str, Any]:
        values = python_row(row)
        values["confidence"] = as_real(values["confidence"])  # as PostgreSQL's REAL stores it
        return values

    async def apply(self, ops: list[Op], *, idempotent: bool) -> list[Op]:
        """Apply ``ops`` in one transaction; return the update ops whose id has no row."""
        split = _split(ops)
        ids_column = statements.C.id
        unknown: list[Op] = []
        async with self.engine.begin() as conn:
            if split.rows:
                stmt = sqlite_insert(statements.TABLE).on_conflict_do_nothing(index_elements=["id"])
                await conn.execute(stmt, [self._row_dict(r) for r in split.rows])
            for kind, target in split.changes.items():
                ids = list(target)
                found: set[Any] = set()
                for start in range(0, len(ids), _SQLITE_IDS_PER_SELECT):
                    chunk = ids[start : start + _SQLITE_IDS_PER_SELECT]
                    result = await conn.execute(select(ids_column).where(ids_column.in_(chunk)))
                    found.update(result.scalars())
                unknown += split.unknown(kind, found)
                params = [
                    statements.change_params(change)
                    for log_id, (change, _) in target.items()
                    if log_id in found
                ]
                if params:
                    await conn.execute(statements.update_logs(CHANGE_TYPES[kind]), params)
        return unknown

    @staticmethod
    def classify(exc: BaseException) -> str:
        """``data`` (bisect, reject) / ``connection`` (spool, retry)."""
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


Writer = PostgresWriter | SqliteWriter


def make_writer(url: str, application_name: str) -> Writer:
    """The writer for ``url``'s database."""
    if db.is_postgres(url):
        return PostgresWriter(url, application_name)
    return SqliteWriter(url)
