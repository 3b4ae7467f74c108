"""The monitoring rollup: the planner that decides where a statistic reads each part of its
window, AND the refresh that executes (it writes the rollup tables and advances the watermark).

Migration 0004 keeps per-hour and per-day aggregates (``nlu_prompt_stats_hourly`` / ``_daily``)
of the columns the three statistics read. A statistic over ``created_at > since`` is the sum
of: daily rows for whole UTC days, hourly rows for the other whole hours, both only before the
watermark and never for an hour marked dirty; and the raw rows of everything else (the part of
the first hour after ``since``, dirty hours, and the tail since the watermark). The parts are
disjoint and cover the window exactly, so the result equals the raw query's.

- Planning (reads only): :func:`plan_stats_cover` / :func:`load_stats_cover` return a
  :class:`StatsCover`, which the monitoring statements of :mod:`capture.statements` take as
  ``cover=``.
- Refreshing (writes; the caller owns the transaction and commits it):
  :func:`refresh_prompt_stats` (synchronous), or its steps :func:`refresh_begin` /
  :func:`refresh_finish` (the async repository runs them around an async wait);
  :func:`reset_prompt_stats` empties the rollup.

Dirty hours are marked by triggers (migration 0004) whenever a row of an hour that may already
be rolled up is inserted, changes a statistics column, or is deleted; :func:`refresh_prompt_stats`
recomputes them and advances the watermark. Rows removed without a trigger (a dropped partition,
migration 0007) are accounted for by :func:`forget_removed_rows`, in the transaction that drops
them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    Connection,
    Double,
    Insert,
    TextClause,
    Update,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    text,
    true,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from capture.dialect_sql import confidence_tenths, utc_day, utc_hour
from capture.rollup_statements import (
    DAILY,
    DIRTY,
    HOURLY,
    MEASURES,
    STATS_STATE,
    TABLE,
    TENTHS,
    AnySelect,
    C,
    spans_clause,
)
from capture.statements import USER_SCOPE_SETTING
from capture.values import DAY, HOUR, floor_day, floor_hour, from_db_datetime, to_utc, utc_now

logger = logging.getLogger(__name__)

#: A cover with more raw ranges than this (many dirty hours) is not worth it: read the raw table.
MAX_COVER_SPANS = 512
#: Time ranges per DELETE/INSERT statement of a refresh.
REFRESH_SPANS_PER_STATEMENT = 64


class rollup_readable(FunctionElement[bool]):
    """Whether this connection may answer the statistics from the rollup: it can read the
    rollup tables, and it sees every raw row (no user scope set; the application role, which
    row-level security scopes, has no grant on the rollup and keeps reading the raw table)."""

    name = "rollup_readable"
    type = Boolean()
    inherit_cache = True


@compiles(rollup_readable)
def _rollup_readable_default(element: rollup_readable, compiler: SQLCompiler, **kw: Any) -> str:
    return "1"  # SQLite: no roles, no row-level security


@compiles(rollup_readable, "postgresql")
def _rollup_readable_postgresql(element: rollup_readable, compiler: SQLCompiler, **kw: Any) -> str:
    return (
        f"(has_table_privilege('{HOURLY.name}', 'SELECT')"
        f" AND has_table_privilege('{DAILY.name}', 'SELECT')"
        f" AND NULLIF(current_setting('{USER_SCOPE_SETTING}', true), '') IS NULL)"
    )


@dataclass(frozen=True, slots=True)
class Span:
    """The time range ``start <= t < end`` (``start < t`` when ``open_start``); ``None``: no
    bound on that side."""

    start: datetime | None
    end: datetime | None
    open_start: bool = False

    def clause(self, column: Any) -> ColumnElement[bool]:
        parts: list[ColumnElement[bool]] = []
        if self.start is not None:
            parts.append(column > self.start if self.open_start else column >= self.start)
        if self.end is not None:
            parts.append(column < self.end)
        return and_(*parts) if parts else true()


def _merge(spans: Iterable[Span]) -> list[Span]:
    """Sorted, adjacent or overlapping spans joined (a ``None`` start sorts first)."""
    ordered = sorted(
        spans, key=lambda s: (s.start is not None, s.start or datetime.min.replace(tzinfo=UTC))
    )
    out: list[Span] = []
    for span in ordered:
        if span.end is not None and span.start is not None and span.end <= span.start:
            continue
        last = out[-1] if out else None
        if (
            last is not None
            and last.end is not None
            and span.start is not None
            and span.start <= last.end
        ):
            end = None if span.end is None else max(last.end, span.end)
            out[-1] = Span(last.start, end, last.open_start)
        else:
            out.append(span)
    return out


@dataclass(frozen=True, slots=True)
class StatsCover:
    """Where each part of the window ``created_at > since`` is read from: the raw table (the
    ``raw`` spans), the hourly rollup (hours in ``hourly`` except ``dirty_hours``) and the daily
    rollup (days in ``daily`` except ``dirty_days``). The three parts are disjoint and together
    cover the window."""

    since: datetime | None
    watermark: datetime
    raw: tuple[Span, ...]
    hourly: tuple[Span, ...]
    daily: tuple[Span, ...]
    dirty_hours: tuple[datetime, ...] = ()
    dirty_days: tuple[datetime, ...] = ()


def plan_stats_cover(
    watermark: datetime | None, dirty_hours: Iterable[datetime], since: datetime | None
) -> StatsCover | None:
    """The cover of ``created_at > since`` given the rollup's state; ``None``: read the raw
    table (never refreshed, the window lies after the watermark, or too many dirty hours)."""
    if watermark is None:
        return None
    mark = floor_hour(watermark)
    since = None if since is None else to_utc(since, "since")
    # The first whole hour inside the window (an hour starting at ``since`` itself is not: a row
    # at exactly ``since`` is outside the window).
    first = None if since is None else floor_hour(since) + HOUR
    if first is not None and first >= mark:
        return None
    dirty = sorted(
        {h for h in map(floor_hour, dirty_hours) if (first is None or h >= first) and h < mark}
    )
    raw = [Span(h, h + HOUR) for h in dirty] + [Span(mark, None)]
    if since is not None:
        raw.insert(0, Span(since, first, open_start=True))
    raw_spans = _merge(raw)
    if len(raw_spans) > MAX_COVER_SPANS:
        logger.info(
            "statistics: %d dirty hours before the watermark %s; reading the raw table "
            "(run `prompt-capture db refresh-stats`)",
            len(dirty),
            mark.isoformat(),
        )
        return None

    last_day = floor_day(mark)  # days before it are closed
    first_day = None if first is None else floor_day(first - timedelta(microseconds=1)) + DAY
    dirty_days = sorted({floor_day(h) for h in dirty})
    hour_spans: list[Span] = []
    day_spans: list[Span] = []
    if first_day is not None and first_day >= last_day:
        hour_spans.append(Span(first, mark))
    else:
        day_spans.append(Span(first_day, last_day))
        if first is not None and first_day is not None and first < first_day:
            hour_spans.append(Span(first, first_day))
        # Closed days with a dirty hour: their other hours from the hourly rows.
        hour_spans += [
            Span(d, d + DAY)
            for d in dirty_days
            if (first_day is None or d >= first_day) and d < last_day
        ]
        hour_spans.append(Span(last_day, mark))
    return StatsCover(
        since,
        mark,
        tuple(raw_spans),
        tuple(_merge(hour_spans)),
        tuple(day_spans),
        tuple(dirty),
        tuple(d for d in dirty_days if (first_day is None or d >= first_day) and d < last_day),
    )


def select_stats_cover_state() -> AnySelect:
    """The rollup's watermark, whether this connection may read it, and the dirty hours before
    the watermark (one row each; a single row with ``hour`` NULL when there are none)."""
    dirty = select(DIRTY.c.hour).distinct().subquery("dirty")
    return select(
        STATS_STATE.c.watermark, rollup_readable().label("readable"), dirty.c.hour
    ).select_from(STATS_STATE.outerjoin(dirty, dirty.c.hour < STATS_STATE.c.watermark))


def stats_cover_from_rows(rows: Iterable[Any], since: datetime | None) -> StatsCover | None:
    """:func:`plan_stats_cover` from the rows of :func:`select_stats_cover_state`."""
    rows = list(rows)
    if not rows:
        raise RuntimeError(
            f"{STATS_STATE.name} has no row: the database is not at the head schema revision; "
            "run `prompt-capture db upgrade`"
        )
    first = rows[0]._mapping
    if not first["readable"]:
        return None
    dirty = [from_db_datetime(r._mapping["hour"]) for r in rows if r._mapping["hour"] is not None]
    return plan_stats_cover(
        from_db_datetime(first["watermark"]), [h for h in dirty if h is not None], since
    )


def load_stats_cover(session: Session, since: datetime | None) -> StatsCover | None:
    """The cover for a synchronous caller (the async repository runs the same two steps)."""
    return stats_cover_from_rows(session.execute(select_stats_cover_state()), since)


# --------------------------------------------------------------------------- refresh


@dataclass(frozen=True, slots=True)
class RefreshStart:
    """The first step of a refresh (:func:`refresh_begin`): the state row is locked."""

    previous: datetime | None  # the watermark before this refresh
    candidate: datetime  # the newest watermark this refresh may set
    writers: tuple[str, ...]  # PostgreSQL: transactions writing the raw table at the start
    dialect: str


@dataclass(frozen=True, slots=True)
class StatsRefresh:
    """What :func:`refresh_prompt_stats` did."""

    previous_watermark: datetime | None
    watermark: datetime | None  # hours before it are rolled up
    dirty_hours: int  # marked hours recomputed
    hourly_rows: int  # rollup rows written
    daily_rows: int
    writers_waited_for: int  # transactions that were writing the raw table at the start
    writers_left: int  # of those, still writing when the wait ended (then no advance)

    @property
    def full(self) -> bool:
        """Whether every hour before the watermark was recomputed (the first refresh)."""
        return self.previous_watermark is None and self.watermark is not None

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON values (the watermarks as ISO 8601 text or None), and ``full``."""
        out = asdict(self)
        for key in ("previous_watermark", "watermark"):
            out[key] = _iso(out[key])
        out["full"] = self.full
        return out


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# The transactions (other than this one) holding the lock every INSERT, UPDATE, DELETE and COPY
# of the raw table takes until they end. pg_locks is readable by every role.
_WRITERS_SQL = (
    "SELECT DISTINCT l.virtualtransaction FROM pg_locks AS l"
    " WHERE l.locktype = 'relation' AND l.mode = 'RowExclusiveLock'"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.relation = CAST(:table_name AS regclass)"
    " AND l.pid IS DISTINCT FROM pg_backend_pid()"
)


def select_raw_writers() -> TextClause:
    """PostgreSQL: the virtual transaction ids now writing ``nlu_prompt_logs``."""
    return text(_WRITERS_SQL).bindparams(table_name=TABLE.name)


def select_raw_writers_left(writers: Sequence[str]) -> TextClause:
    """PostgreSQL: which of ``writers`` are still writing ``nlu_prompt_logs``."""
    return text(_WRITERS_SQL + " AND l.virtualtransaction IN :writers").bindparams(
        bindparam("writers", expanding=True), table_name=TABLE.name, writers=list(writers)
    )


def lock_stats_state() -> Update:
    """Lock the rollup's state row for this transaction (serialises refreshes; on SQLite it also
    takes the write lock first, so no writer commits between reading and recomputing)."""
    return (
        update(STATS_STATE)
        .where(STATS_STATE.c.id == 1)
        .values(refreshed_at=STATS_STATE.c.refreshed_at)
        .returning(STATS_STATE.c.watermark, STATS_STATE.c.late_after_seconds)
    )


def refresh_begin(session: Session) -> RefreshStart:
    """Step 1 of a refresh: lock the state, pick the newest hour it may close, and (PostgreSQL)
    list the transactions writing the raw table, which step 2 waits for.

    Why the wait makes the rollup exact on PostgreSQL: the triggers mark a change to a row whose
    ``created_at`` is older than ``late_after_seconds`` at the time of the change. A change they
    did not mark, to a row this refresh rolls up (``created_at`` < the candidate watermark <=
    ``now - late_after_seconds``), therefore happened before ``now``: its transaction already
    held the table lock listed here, so once it has ended the recompute sees the change.
    """
    dialect = session.get_bind().dialect.name
    row = session.execute(lock_stats_state()).first()
    if row is None:
        raise RuntimeError(
            f"{STATS_STATE.name} has no row: the database is not at the head schema revision; "
            "run `prompt-capture db upgrade`"
        )
    previous = from_db_datetime(row.watermark)
    if dialect != "postgresql":
        # SQLite: writers are serialised and the triggers compare with the watermark itself.
        return RefreshStart(previous, floor_hour(utc_now()), (), dialect)
    isolation = session.execute(text("SHOW transaction_isolation")).scalar_one()
    if isolation != "read committed":
        raise ValueError(
            f"refresh_prompt_stats: needs a READ COMMITTED transaction, found {isolation!r}; "
            "run it in a session with the default isolation level"
        )
    now = session.execute(select(func.clock_timestamp())).scalar_one()
    candidate = floor_hour(now - timedelta(seconds=int(row.late_after_seconds)))
    writers = tuple(session.execute(select_raw_writers()).scalars())
    return RefreshStart(previous, candidate, writers, dialect)


def refresh_finish(
    session: Session,
    start: RefreshStart,
    *,
    writers_left: Sequence[str] = (),
    until: datetime | None = None,
) -> StatsRefresh:
    """Step 3 of a refresh: consume the dirty marks before the new watermark, recompute those
    hours and the hours up to the new watermark, their closed days, and store the watermark.

    The watermark advances to ``start.candidate`` (at most ``floor_hour(until)``) only when no
    writer of step 1 is left; it never moves back.
    """
    previous = start.previous
    target: datetime | None = start.candidate if not writers_left else previous
    if target is not None and until is not None:
        target = min(target, floor_hour(until))
    if previous is not None and (target is None or target < previous):
        target = previous
    if target is None:
        return StatsRefresh(None, None, 0, 0, 0, len(start.writers), len(writers_left))
    if writers_left:
        logger.warning(
            "statistics refresh: %d transaction(s) still writing %s (virtual xids %s); "
            "the watermark stays at %s",
            len(writers_left),
            TABLE.name,
            ", ".join(writers_left),
            _iso(previous),
        )

    consumed = {
        floor_hour(h)
        for h in (
            from_db_datetime(v)
            for v in session.execute(
                delete(DIRTY).where(DIRTY.c.hour < target).returning(DIRTY.c.hour)
            ).scalars()
        )
        if h is not None
    }
    if previous is None:
        hour_spans = [Span(None, target)]
        day_spans = [Span(None, floor_day(target))]
    else:
        late = sorted(h for h in consumed if h < previous)
        hour_spans = _merge(
            [Span(h, h + HOUR) for h in late]
            + ([Span(previous, target)] if target > previous else [])
        )
        days = {floor_day(h) for h in late}
        day = floor_day(previous)
        while day < target:
            days.add(day)
            day += DAY
        day_spans = _merge(Span(d, d + DAY) for d in sorted(days) if d + DAY <= target)

    hourly_rows = daily_rows = 0
    for chunk in _chunks(hour_spans):
        session.execute(delete(HOURLY).where(spans_clause(HOURLY.c.hour, chunk)))
        hourly_rows += _rowcount(session.execute(insert_hourly_from_logs(chunk)))
    for chunk in _chunks(day_spans):
        session.execute(delete(DAILY).where(spans_clause(DAILY.c.day, chunk)))
        daily_rows += _rowcount(session.execute(insert_daily_from_hourly(chunk)))
    session.execute(
        update(STATS_STATE)
        .where(STATS_STATE.c.id == 1)
        .values(watermark=target, refreshed_at=utc_now())
    )
    return StatsRefresh(
        previous,
        target,
        len(consumed),
        hourly_rows,
        daily_rows,
        len(start.writers),
        len(writers_left),
    )


def _rowcount(result: Any) -> int:
    return max(int(result.rowcount), 0)


def _chunks(spans: Sequence[Span]) -> Iterable[Sequence[Span]]:
    for i in range(0, len(spans), REFRESH_SPANS_PER_STATEMENT):
        yield spans[i : i + REFRESH_SPANS_PER_STATEMENT]


def insert_hourly_from_logs(spans: Sequence[Span]) -> Insert:
    """Hourly rollup rows of the raw rows in ``spans`` (whole UTC hours).

    The bucket of each row is computed once in a subquery (``OFFSET 0`` keeps PostgreSQL from
    inlining it into the twelve bucket counts: ~40% less CPU in a full refresh).
    """
    rows = (
        select(
            utc_hour(C.created_at).label("hour"),
            C.predicted_intent,
            C.confidence,
            C.corrected_intent,
            C.was_successful,
            confidence_tenths(C.confidence).label("tenths"),
        )
        .where(spans_clause(C.created_at, spans))
        .offset(0)
        .subquery("rows")
    )
    r = rows.c
    source = select(
        r.hour,
        r.predicted_intent,
        func.count().label("prompts"),
        func.count(r.confidence).label("confidence_count"),
        func.coalesce(func.sum(r.confidence.cast(Double)), 0.0).label("confidence_sum"),
        func.count(r.corrected_intent).label("corrections"),
        func.count(r.was_successful).label("outcomes"),
        func.count(case((r.was_successful == true(), 1))).label("successes"),
        *(func.count(case((r.tenths == k, 1))).label(f"tenths_{k}") for k in TENTHS),
        func.count(case((r.confidence.is_(None), 1))).label("tenths_null"),
    ).group_by(r.hour, r.predicted_intent)
    return (
        insert(HOURLY)
        .from_select(["hour", "predicted_intent", *MEASURES], source)
        .execution_options(preserve_rowcount=True)
    )


def insert_daily_from_hourly(spans: Sequence[Span]) -> Insert:
    """Daily rollup rows from the hourly rows in ``spans`` (whole UTC days)."""
    day = utc_day(HOURLY.c.hour)
    source = (
        select(
            day.label("day"),
            HOURLY.c.predicted_intent,
            *(func.sum(HOURLY.c[m]).label(m) for m in MEASURES),
        )
        .where(spans_clause(HOURLY.c.hour, spans))
        .group_by(day, HOURLY.c.predicted_intent)
    )
    return (
        insert(DAILY)
        .from_select(["day", "predicted_intent", *MEASURES], source)
        .execution_options(preserve_rowcount=True)
    )


def forget_removed_rows(
    session: Session | Connection, start: datetime | None, end: datetime
) -> None:
    """Correct the rollup, in the caller's transaction, after every row with ``start <=
    created_at < end`` was removed without firing a row trigger (a dropped partition; ``start``
    None: no lower bound). The hourly and daily rows of the hours and days inside the range now
    stand for no rows and are deleted; an hour cut by a bound that is not a whole hour is marked
    dirty (read raw, recomputed by the next refresh). Lock the state row first
    (:func:`lock_stats_state`) so that no refresh runs in between."""
    end = to_utc(end, "end")
    first_hour = first_day = None
    edges = [] if end == floor_hour(end) else [floor_hour(end)]
    if start is not None:
        start = to_utc(start, "start")
        first_hour = floor_hour(start) if start == floor_hour(start) else floor_hour(start) + HOUR
        first_day = floor_day(start) if start == floor_day(start) else floor_day(start) + DAY
        edges += [] if start == floor_hour(start) else [floor_hour(start)]
    session.execute(delete(HOURLY).where(Span(first_hour, floor_hour(end)).clause(HOURLY.c.hour)))
    session.execute(delete(DAILY).where(Span(first_day, floor_day(end)).clause(DAILY.c.day)))
    bind = session.get_bind() if isinstance(session, Session) else session
    txid = "pg_current_xact_id()::text::bigint" if bind.dialect.name == "postgresql" else "0"
    mark = f"INSERT INTO {DIRTY.name} (hour, txid) VALUES (:hour, {txid}) ON CONFLICT DO NOTHING"
    for hour in edges:
        session.execute(text(mark), {"hour": hour})


def reset_prompt_stats(session: Session) -> None:
    """Empty the rollup and forget the watermark: the statistics read the raw table until the
    next refresh, which then recomputes every hour (``prompt-capture db refresh-stats --rebuild``).
    """
    session.execute(lock_stats_state())
    for table in (HOURLY, DAILY, DIRTY):
        session.execute(delete(table))
    session.execute(update(STATS_STATE).where(STATS_STATE.c.id == 1).values(watermark=None))


def refresh_prompt_stats(
    *,
    session: Session,
    until: datetime | None = None,
    wait_timeout: float = 30.0,
    poll_interval: float = 0.05,
    sleep: Callable[[float], None] = time.sleep,
) -> StatsRefresh:
    """Bring the monitoring rollup up to date (synchronous; the caller owns the transaction and
    commits it). Idempotent: a second call right after the first recomputes nothing new.

    Recomputes the hours marked dirty (late outcomes, corrections, replayed or deleted rows) and
    every hour from the previous watermark up to the newest closed hour (PostgreSQL: ending at
    least ``late_after_seconds`` ago; SQLite: the current hour's start), at most ``until``.
    PostgreSQL waits up to ``wait_timeout`` seconds for transactions that were writing the raw
    table when it started; if some are still running it recomputes the dirty hours only.
    """
    start = refresh_begin(session)
    left = start.writers
    deadline = time.monotonic() + wait_timeout
    while left and time.monotonic() < deadline:
        sleep(poll_interval)
        left = tuple(session.execute(select_raw_writers_left(left)).scalars())
    return refresh_finish(session, start, writers_left=left, until=until)
