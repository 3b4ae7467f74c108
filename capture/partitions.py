"""Time partitions of ``nlu_prompt_logs`` on PostgreSQL (migration 0007): the catalog readers,
the period arithmetic and the DDL that the retention flow (``tasks.retention``) runs.

``nlu_prompt_logs`` is partitioned by ``RANGE (created_at)``: one partition per UTC day or per
ISO week (Monday 00:00 UTC; ``Settings.partition_interval``), named ``nlu_prompt_logs_p<start
YYYYMMDD>``, and a DEFAULT partition (``nlu_prompt_logs_default``) that takes any row no range
covers, so an insert never fails for want of a partition. Only the table owner (or a member of
its role) runs DDL: the capture writer and the application never do.

What the retention flow does with these functions (each step its own short transaction):

- :func:`detach_expired`: partitions that end at or before the cutoff are detached and renamed
  ``nlu_prompt_logs_expired_<suffix>`` (one ACCESS EXCLUSIVE lock on the parent, bounded by
  ``lock_timeout``); from then on no reader or writer of the parent sees them. Their rows are
  copied, scrubbed, to the training store (:func:`select_expired_rows`, in keyset batches), then
  the table is dropped (:func:`drop_expired_table`). A run that stops in between leaves the
  renamed table; the next run finds it (:func:`list_expired_tables`) and finishes it;
- :func:`default_periods` + :func:`create_partition`: rows the DEFAULT partition caught (a clock
  past the last partition, a late replay) get their partition; the rows move into it;
- :func:`ensure_partitions`: the partitions ahead of now (``AHEAD_DAYS``).

Period boundaries are UTC midnights, so a dropped partition removes whole hours and days of the
monitoring rollup (``capture.stats_rollup.forget_removed_rows``).

PostgreSQL only; on SQLite ``nlu_prompt_logs`` is a plain table and :func:`is_partitioned` is
False.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast, get_args

from sqlalchemy import Column, Connection, MetaData, Table, select, text, tuple_

from capture.settings import PartitionInterval
from capture.statements import TABLE, AnySelect
from capture.values import DAY, from_db_datetime, to_utc

logger = logging.getLogger(__name__)

PARENT = TABLE.name
DEFAULT_PARTITION = f"{PARENT}_default"
#: Detached partitions whose rows are being copied to the training store.
EXPIRED_PREFIX = f"{PARENT}_expired_"
#: Partitions are created this many days ahead of now.
AHEAD_DAYS = 14
INTERVALS: tuple[PartitionInterval, ...] = get_args(PartitionInterval)


def _midnight(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition: ``start <= created_at < end`` (``None``: unbounded, or the DEFAULT one)."""

    name: str
    start: datetime | None
    end: datetime | None
    is_default: bool = False

    def expired(self, cutoff: datetime) -> bool:
        """Whether every row it can hold was created before ``cutoff``."""
        return not self.is_default and self.end is not None and self.end <= cutoff


# --------------------------------------------------------------------------- periods


def check_interval(value: object) -> PartitionInterval:
    """``value`` as a partition interval (``ValueError`` naming the allowed ones)."""
    if value not in INTERVALS:
        raise ValueError(
            f"partition_interval: expected one of {', '.join(INTERVALS)}, found {value!r}"
        )
    return cast(PartitionInterval, value)


def period_step(interval: PartitionInterval) -> timedelta:
    return 7 * DAY if interval == "week" else DAY


def period_start(moment: datetime, interval: PartitionInterval) -> datetime:
    """The start of the period ``moment`` falls in: its UTC midnight, or the Monday before."""
    day = _midnight(to_utc(moment, "moment"))
    return day - timedelta(days=day.weekday()) if interval == "week" else day


def partition_name(start: datetime) -> str:
    """``nlu_prompt_logs_p<YYYYMMDD>`` (``_<HHMMSS>`` added for a start that is not midnight)."""
    start = to_utc(start, "start")
    suffix = "" if start == _midnight(start) else f"_{start:%H%M%S}"
    return f"{PARENT}_p{start:%Y%m%d}{suffix}"


def expired_name(name: str) -> str:
    """What a detached partition is renamed to until its rows are copied and it is dropped."""
    return EXPIRED_PREFIX + name.removeprefix(f"{PARENT}_")


def uncovered(
    partitions: Sequence[Partition], start: datetime, end: datetime
) -> list[tuple[datetime, datetime]]:
    """The parts of ``[start, end)`` no range partition covers, in order."""
    gaps: list[tuple[datetime, datetime]] = []
    cursor = start
    ranges = sorted(
        (p for p in partitions if not p.is_default),
        key=lambda p: p.start or datetime.min.replace(tzinfo=UTC),
    )
    for p in ranges:
        lo = p.start or datetime.min.replace(tzinfo=UTC)
        hi = p.end or datetime.max.replace(tzinfo=UTC)
        if hi <= cursor:
            continue
        if lo >= end:
            break
        if lo > cursor:
            gaps.append((cursor, lo))
        cursor = max(cursor, hi)
        if cursor >= end:
            break
    if cursor < end:
        gaps.append((cursor, end))
    return gaps


def plan_partitions(
    partitions: Sequence[Partition], start: datetime, end: datetime, interval: PartitionInterval
) -> list[tuple[datetime, datetime]]:
    """The ranges to create so that ``[period_start(start), end)`` is covered: whole periods,
    cut where an existing partition already covers part of one (e.g. after the interval
    setting changed)."""
    step = period_step(interval)
    lo = period_start(start, interval)
    wanted: list[tuple[datetime, datetime]] = []
    while lo < end:
        wanted += uncovered(partitions, lo, lo + step)
        lo += step
    return wanted


def infer_interval(
    partitions: Sequence[Partition], fallback: PartitionInterval = "day"
) -> PartitionInterval:
    """The interval of the newest range partition (7 days: ``week``), else ``fallback``."""
    ranges = [p for p in partitions if p.start is not None and p.end is not None]
    if not ranges:
        return fallback
    newest = max(ranges, key=lambda p: cast(datetime, p.start))
    return "week" if cast(datetime, newest.end) - cast(datetime, newest.start) >= 7 * DAY else "day"


# --------------------------------------------------------------------------- catalog


def is_partitioned(conn: Connection) -> bool:
    """Whether ``nlu_prompt_logs`` is a partitioned table (PostgreSQL after migration 0007)."""
    if conn.dialect.name != "postgresql":
        return False
    kind = conn.execute(
        text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": PARENT}
    ).scalar()
    return kind == "p"


def can_manage(conn: Connection) -> bool:
    """Whether this role may create, detach and drop partitions: it is (a member of) the
    table's owner and may create tables in its schema."""
    allowed = conn.execute(
        text(
            "SELECT pg_has_role(relowner, 'USAGE') AND has_schema_privilege(relnamespace, "
            "'CREATE') FROM pg_class WHERE oid = to_regclass(:t)"
        ),
        {"t": PARENT},
    ).scalar()
    return bool(allowed)


_BOUND = "pg_get_expr(c.relpartbound, c.oid)"
_LIST_SQL = f"""
SELECT c.relname AS name,
       {_BOUND} = 'DEFAULT' AS is_default,
       CAST((regexp_match({_BOUND}, 'FROM \\(''([^'']*)''\\)'))[1] AS timestamptz) AS lo,
       CAST((regexp_match({_BOUND}, 'TO \\(''([^'']*)''\\)'))[1] AS timestamptz) AS hi
FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass(:t)
"""


def list_partitions(conn: Connection) -> list[Partition]:
    """The partitions of ``nlu_prompt_logs``, oldest first (the DEFAULT one first of all)."""
    found = [
        Partition(
            str(r.name),
            None if r.lo is None else to_utc(r.lo),
            None if r.hi is None else to_utc(r.hi),
            bool(r.is_default),
        )
        for r in conn.execute(text(_LIST_SQL), {"t": PARENT})
    ]
    return sorted(
        found, key=lambda p: (not p.is_default, p.start or datetime.min.replace(tzinfo=UTC))
    )


def list_expired_tables(conn: Connection) -> list[str]:
    """Detached partitions left by a retention run that stopped before dropping them."""
    rows = conn.execute(
        text(
            "SELECT relname FROM pg_class WHERE relnamespace = CAST(current_schema() AS "
            "regnamespace) AND relkind = 'r' AND NOT relispartition AND starts_with(relname, :p) "
            "ORDER BY relname"
        ),
        {"p": EXPIRED_PREFIX},
    )
    return [str(r[0]) for r in rows]


def default_periods(
    conn: Connection, *, since: datetime, until: datetime, interval: PartitionInterval
) -> list[datetime]:
    """Starts of the periods of rows in the DEFAULT partition created in ``[since, until)``."""
    rows = conn.execute(
        text(
            f"SELECT DISTINCT date_trunc('day', created_at, 'UTC') FROM {DEFAULT_PARTITION} "
            "WHERE created_at >= :since AND created_at < :until"
        ),
        {"since": to_utc(since, "since"), "until": to_utc(until, "until")},
    )
    days = (from_db_datetime(r[0]) for r in rows)
    return sorted({period_start(day, interval) for day in days if day is not None})


# --------------------------------------------------------------------------- DDL


def set_lock_timeout(conn: Connection, seconds: float) -> None:
    """Give up waiting for a table lock after ``seconds`` in this transaction (DDL must not
    queue for long behind a reader: every new query on the table would queue behind it)."""
    conn.execute(
        text("SELECT set_config('lock_timeout', :v, true)"), {"v": f"{int(seconds * 1000)}"}
    )


def _literal(moment: datetime) -> str:
    return f"'{to_utc(moment).isoformat()}'"


def create_partition(conn: Connection, start: datetime, end: datetime) -> int:
    """Create the partition ``[start, end)``; rows of that range the DEFAULT partition holds move
    into it (deleted and inserted through the parent in this transaction, so the rollup triggers
    mark their hours). Returns the number of rows moved."""
    moved = 0
    bounds = {"lo": to_utc(start, "start"), "hi": to_utc(end, "end")}
    waiting = conn.execute(
        text(
            f"SELECT count(*) FROM {DEFAULT_PARTITION} WHERE created_at >= :lo AND created_at < :hi"
        ),
        bounds,
    ).scalar_one()
    if waiting:
        conn.execute(
            text(
                f"CREATE TEMP TABLE IF NOT EXISTS pc_partition_move (LIKE {PARENT}) ON COMMIT DROP"
            )
        )
        moved = conn.execute(
            text(
                f"WITH moved AS (DELETE FROM {PARENT} WHERE created_at >= :lo AND created_at < :hi"
                " RETURNING *) INSERT INTO pc_partition_move SELECT * FROM moved"
            ),
            bounds,
        ).rowcount
    name = partition_name(start)
    conn.execute(
        text(
            f"CREATE TABLE {name} PARTITION OF {PARENT} "
            f"FOR VALUES FROM ({_literal(start)}) TO ({_literal(end)})"
        )
    )
    if moved:
        conn.execute(text(f"INSERT INTO {PARENT} SELECT * FROM pc_partition_move"))
        conn.execute(text("TRUNCATE pc_partition_move"))
        logger.info("partition %s: moved %d rows from %s", name, moved, DEFAULT_PARTITION)
    logger.info("created partition %s [%s, %s)", name, start.isoformat(), end.isoformat())
    return int(moved)


@dataclass(frozen=True, slots=True)
class PartitionChanges:
    """What :func:`ensure_partitions` did."""

    created: tuple[str, ...] = ()
    moved_rows: int = 0


def ensure_partitions(
    conn: Connection,
    *,
    start: datetime,
    end: datetime,
    interval: PartitionInterval,
    periods: Sequence[datetime] = (),
) -> PartitionChanges:
    """Create the partitions missing in ``[period_start(start), end)`` and for each period
    starting at one of ``periods`` (those of rows caught by the DEFAULT partition)."""
    interval = check_interval(interval)
    existing = list_partitions(conn)
    wanted = plan_partitions(existing, start, end, interval)
    for first in periods:
        wanted += uncovered(existing, first, first + period_step(interval))
    created: list[str] = []
    moved = 0
    for lo, hi in sorted(set(wanted)):
        moved += create_partition(conn, lo, hi)
        created.append(partition_name(lo))
    return PartitionChanges(tuple(created), moved)


def detach_expired(conn: Connection, cutoff: datetime) -> list[tuple[Partition, str]]:
    """Detach every partition that ends at or before ``cutoff`` and rename it for
    :func:`select_expired_rows`; returns ``(partition, new name)`` pairs. The caller's
    transaction holds the parent's ACCESS EXCLUSIVE lock until it commits."""
    cutoff = to_utc(cutoff, "cutoff")
    done: list[tuple[Partition, str]] = []
    for partition in list_partitions(conn):
        if not partition.expired(cutoff):
            continue
        new_name = expired_name(partition.name)
        conn.execute(text(f"ALTER TABLE {PARENT} DETACH PARTITION {partition.name}"))
        conn.execute(text(f"ALTER TABLE {partition.name} RENAME TO {new_name}"))
        done.append((partition, new_name))
    return done


def drop_expired_table(conn: Connection, name: str) -> None:
    """Drop a detached partition whose rows are in the training store."""
    if not name.startswith(EXPIRED_PREFIX):
        raise ValueError(f"table: expected a name starting with {EXPIRED_PREFIX}, found {name!r}")
    conn.execute(text(f"DROP TABLE IF EXISTS {name}"))


def expired_table(name: str) -> Table:
    """A detached partition, with the columns (and types) of ``nlu_prompt_logs``."""
    if not name.startswith(EXPIRED_PREFIX):
        raise ValueError(f"table: expected a name starting with {EXPIRED_PREFIX}, found {name!r}")
    columns: list[Column[Any]] = [Column(c.name, c.type) for c in TABLE.c]
    return Table(name, MetaData(), *columns)


def select_expired_rows(
    table: Table, columns: Sequence[str], *, after: tuple[Any, Any] | None, limit: int
) -> AnySelect:
    """``columns`` of the next ``limit`` rows of a detached partition in primary-key order
    ``(id, created_at)``, after the key ``after`` (keyset pagination on its primary key)."""
    key = tuple_(table.c.id, table.c.created_at)
    stmt = select(*(table.c[name] for name in columns)).order_by(table.c.id, table.c.created_at)
    if after is not None:
        stmt = stmt.where(key > tuple_(*after))
    return stmt.limit(limit)
