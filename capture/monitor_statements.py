"""The monitor's tables (migration 0006) as SQLAlchemy Core tables, and the statements on them.

- :data:`HOURS` (``monitor_hours``): the aligned UTC hours checked, ``hour`` (the start) the
  primary key. :func:`claim_hours` inserts the hours a run means to check and returns those
  it got: on PostgreSQL a concurrent insert of the same hour waits for the other transaction
  and then conflicts, on SQLite the write lock serialises the two — either way an hour is
  checked by exactly one run.
- :data:`ALERTS` (``monitor_alerts``): one row per alert and channel, unique on
  ``(check_name, scope, channel, hour)``, inserted before the alert is sent
  (:func:`insert_alerts`); a run sends only what its insert won. Failed deliveries are
  claimed again by a later run with :func:`claim_retries` (one ``UPDATE ... RETURNING``: two
  runs never claim the same row) and settled by :func:`settle_alerts`.
- :data:`MARKERS` (``monitor_markers``): named times (:data:`WEEKLY_CYCLE_SUCCESS`).

Times are stored as UTC (naive UTC text on SQLite, ``timestamptz`` on PostgreSQL); read them
back with ``capture.values.from_db_datetime``. Builders only; the ``tasks`` modules run them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    CheckConstraint,
    Column,
    Float,
    Index,
    Insert,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
    Update,
    Uuid,
    and_,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from capture.models import NAMING_CONVENTION, Timestamp, in_values, not_null
from capture.statements import AnySelect
from capture.values import to_utc

logger = logging.getLogger(__name__)

#: ``status`` of an alert row: claimed by a run that is sending it, delivered, or failed.
SENDING: Final = "sending"
SENT: Final = "sent"
FAILED: Final = "failed"
ALERT_STATES: Final = (SENDING, SENT, FAILED)
#: The marker the weekly cycle writes when it succeeds.
WEEKLY_CYCLE_SUCCESS: Final = "weekly_cycle_success"

METADATA = MetaData(naming_convention=NAMING_CONVENTION)
_TS = Timestamp

HOURS = Table(
    "monitor_hours",
    METADATA,
    Column("hour", _TS, primary_key=True),
    not_null("checked_at", _TS),
    not_null("run_id", Text),
    not_null("prompts", Integer, server_default="0"),
    not_null("breaches", Integer, server_default="0"),
)

ALERTS = Table(
    "monitor_alerts",
    METADATA,
    Column("id", Uuid, primary_key=True),
    not_null("check_name", Text),
    not_null("scope", Text),
    not_null("channel", Text),
    not_null("hour", _TS),
    not_null("status", Text),
    not_null("message", Text),
    Column("value", Float),
    not_null("threshold", Float),
    not_null("sample", Integer),
    not_null("attempts", Integer, server_default="0"),
    Column("error", Text),
    not_null("run_id", Text),
    not_null("created_at", _TS),
    not_null("claimed_at", _TS),
    Column("sent_at", _TS),
    UniqueConstraint(
        "check_name",
        "scope",
        "channel",
        "hour",
        name="uq_monitor_alerts_check_name_scope_channel_hour",
    ),
    CheckConstraint(in_values("status", ALERT_STATES), name="status"),
    Index("ix_monitor_alerts_status_hour", "status", "hour"),
)

MARKERS = Table(
    "monitor_markers",
    METADATA,
    Column("name", Text, primary_key=True),
    not_null("at", _TS),
    not_null("updated_at", _TS),
)

#: The columns of an alert row a sender needs (:func:`claim_retries` returns them).
ALERT_COLUMNS = (
    ALERTS.c.id,
    ALERTS.c.check_name,
    ALERTS.c.scope,
    ALERTS.c.channel,
    ALERTS.c.hour,
    ALERTS.c.message,
    ALERTS.c.value,
    ALERTS.c.threshold,
    ALERTS.c.sample,
)


def _insert(postgres: bool, table: Table) -> Any:
    return (postgresql.insert if postgres else sqlite.insert)(table)


# --------------------------------------------------------------------------- hours


def select_last_checked_hour() -> AnySelect:
    """The newest checked hour (one ``hour`` value, NULL when none was checked)."""
    return select(func.max(HOURS.c.hour).label("hour"))


def claim_hours(*, postgres: bool) -> Insert:
    """``INSERT`` of hour rows (execute with ``[{hour, checked_at, run_id}, ...]``) that skips
    an hour another run has, returning the ``hour`` of each row inserted."""
    stmt = _insert(postgres, HOURS)
    return stmt.on_conflict_do_nothing(index_elements=[HOURS.c.hour]).returning(HOURS.c.hour)


def record_hour(hour: datetime, *, prompts: int, breaches: int) -> Update:
    """What the check of ``hour`` found."""
    return (
        update(HOURS)
        .where(HOURS.c.hour == to_utc(hour, "hour"))
        .values(prompts=prompts, breaches=breaches)
    )


def select_checked_hours(*, start: datetime, end: datetime) -> AnySelect:
    """``hour, checked_at, run_id, prompts, breaches`` of the hours in ``[start, end)``, oldest
    first."""
    return (
        select(HOURS)
        .where(HOURS.c.hour >= to_utc(start, "start"), HOURS.c.hour < to_utc(end, "end"))
        .order_by(HOURS.c.hour)
    )


# --------------------------------------------------------------------------- alerts


def insert_alerts(*, postgres: bool) -> Insert:
    """``INSERT`` of alert rows (status :data:`SENDING`, claimed by their run) that skips an
    alert another run has for the same ``(check_name, scope, channel, hour)``, returning
    :data:`ALERT_COLUMNS` of each row inserted: the alerts this run must send."""
    stmt = _insert(postgres, ALERTS)
    return stmt.on_conflict_do_nothing(
        index_elements=[ALERTS.c.check_name, ALERTS.c.scope, ALERTS.c.channel, ALERTS.c.hour]
    ).returning(*ALERT_COLUMNS)


def claim_retries(
    *, channel: str, run_id: str, now: datetime, since: datetime, stale_before: datetime
) -> Update:
    """Claim the alerts of ``channel`` for hours from ``since`` on that failed, or that another
    run claimed before ``stale_before`` and never settled (it died): one ``UPDATE ...
    RETURNING`` of :data:`ALERT_COLUMNS`, so two runs never claim the same row."""
    return (
        update(ALERTS)
        .where(
            ALERTS.c.channel == channel,
            ALERTS.c.hour >= to_utc(since, "since"),
            or_(
                ALERTS.c.status == FAILED,
                and_(
                    ALERTS.c.status == SENDING,
                    ALERTS.c.claimed_at < to_utc(stale_before, "stale_before"),
                ),
            ),
        )
        .values(status=SENDING, run_id=run_id, claimed_at=to_utc(now, "now"))
        .returning(*ALERT_COLUMNS)
    )


def settle_alerts(
    ids: Sequence[uuid.UUID],
    *,
    run_id: str,
    ok: bool,
    attempts: int,
    error: str | None,
    now: datetime,
) -> Update:
    """Mark the alerts ``ids`` this run claimed as :data:`SENT` (``sent_at`` now) or
    :data:`FAILED` (with ``error``), adding ``attempts``."""
    return (
        update(ALERTS)
        .where(ALERTS.c.id.in_(list(ids)), ALERTS.c.run_id == run_id)
        .values(
            status=SENT if ok else FAILED,
            attempts=ALERTS.c.attempts + attempts,
            error=None if ok else error,
            sent_at=to_utc(now, "now") if ok else None,
        )
    )


def select_alerts() -> AnySelect:
    """Every alert row, oldest hour first (for status commands and tests)."""
    return select(ALERTS).order_by(
        ALERTS.c.hour, ALERTS.c.channel, ALERTS.c.check_name, ALERTS.c.scope
    )


# --------------------------------------------------------------------------- markers


def upsert_marker(*, postgres: bool) -> Insert:
    """``INSERT`` of a marker (``{name, at, updated_at}``) that keeps the later ``at`` when the
    name exists: a marker only moves forward."""
    stmt = _insert(postgres, MARKERS)
    later = func.max if not postgres else func.greatest
    return stmt.on_conflict_do_update(
        index_elements=[MARKERS.c.name],
        set_={
            "at": later(MARKERS.c.at, stmt.excluded.at),
            "updated_at": stmt.excluded.updated_at,
        },
    )


def select_marker(name: str) -> AnySelect:
    """The ``at`` of marker ``name`` (no row: never recorded)."""
    return select(MARKERS.c.at).where(MARKERS.c.name == name)
