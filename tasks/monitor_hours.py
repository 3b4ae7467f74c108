"""The monitor's hour loop: every aligned UTC hour checked exactly once, whatever the schedule.

A run (:func:`check_hours`) checks every COMPLETED aligned UTC hour ``[H, H + 1h)`` (``H + 1h
<= now``) after the newest hour in the database (``monitor_hours``, migration 0006); the first
run ever checks the last completed hour. Each hour is its own window, so a burst in one hour is
not diluted by quiet hours around it, and the traffic-drop check compares it with the hour
before. Hence:

- a cron schedule in a time zone with DST (Prefect fires ``5 * * * *`` Europe/London at 00:05
  and then 02:05 UTC on the night the clocks go back) leaves no hour unchecked: the 02:05 run
  checks 00:00-01:00 and 01:00-02:00; on the night they go forward nothing is checked twice;
- a late run checks what completed by then; after missed runs the next one catches up, at most
  ``max_catch_up_hours`` back (older hours are logged as skipped, never silently);
- two overlapping runs never check one hour twice: the hours are claimed with ``INSERT ... ON
  CONFLICT DO NOTHING`` in the transaction that checks them, and each alert row (unique per
  check, scope, channel and hour) is inserted before it is sent, so the run whose insert won
  is the only one that sends it (``tasks.alert_delivery``).

The stale-cycle check is tied to the last completed hour at ``now``: at most one alert per hour
and channel. What was checked, found and claimed is logged and returned (:class:`MonitorCheck`).
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from capture.db import database_url, get_sync_engine, is_postgres
from capture.ids import uuid7
from capture.monitor_statements import (
    SENDING,
    claim_hours,
    insert_alerts,
    record_hour,
    select_last_checked_hour,
)
from capture.offline_statements import check_count
from capture.values import HOUR, from_db_datetime, to_utc
from tasks.monitor import (
    CHECKS,
    AlertThresholds,
    Breach,
    ScopeStats,
    check_cycle,
    find_breaches,
    window_stats,
)
from tasks.retry import io_task

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_CATCH_UP_HOURS",
    "HourCheck",
    "MonitorCheck",
    "PendingAlert",
    "check_hours",
    "check_hours_task",
    "due_hours",
    "hour_start",
]

#: How far back a run catches up after missed runs (a week of hours).
DEFAULT_MAX_CATCH_UP_HOURS = 168


def hour_start(moment: datetime) -> datetime:
    """The start of the aligned UTC hour ``moment`` falls in (aware UTC)."""
    return to_utc(moment, "moment").replace(minute=0, second=0, microsecond=0)


def due_hours(
    last_checked: datetime | None, now: datetime, max_catch_up_hours: int
) -> tuple[list[datetime], tuple[datetime, datetime] | None]:
    """The completed hours (their starts, oldest first) a run at ``now`` must check after the
    newest checked hour ``last_checked`` (None: only the last completed hour), at most
    ``max_catch_up_hours`` of them, and the span ``[first, end)`` of older hours left unchecked
    because of that limit (None when nothing was left)."""
    newest = hour_start(now) - HOUR  # [newest, newest + 1h) completed: newest + 1h <= now
    first = newest if last_checked is None else hour_start(last_checked) + HOUR
    if first > newest:
        return [], None
    count = int((newest - first) / HOUR) + 1
    skipped = None
    if count > max_catch_up_hours:
        kept_from = newest - (max_catch_up_hours - 1) * HOUR
        skipped, first = (first, kept_from), kept_from
        count = max_catch_up_hours
    return [first + k * HOUR for k in range(count)], skipped


@dataclass(frozen=True, slots=True)
class HourCheck:
    """One checked hour ``[hour, hour + 1h)``: per-scope stats (``overall`` first) and the
    breaches found."""

    hour: datetime
    stats: list[ScopeStats]
    breaches: list[Breach]

    @property
    def prompts(self) -> int:
        return self.stats[0].total if self.stats else 0

    @property
    def previous_prompts(self) -> int:
        return self.stats[0].previous_total if self.stats else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "hour": self.hour.isoformat(),
            "prompts": self.prompts,
            "previous_prompts": self.previous_prompts,
            "breaches": [b.key for b in self.breaches],
        }


@dataclass(frozen=True, slots=True)
class PendingAlert:
    """An alert row this run inserted (status ``sending``): this run must send it."""

    id: uuid.UUID
    channel: str
    breach: Breach


@dataclass(slots=True)
class MonitorCheck:
    """What one :func:`check_hours` run did. ``hours``: the hours it claimed and checked,
    oldest first; ``skipped``: ``[start, end)`` of hours too old to catch up; ``cycle``: the
    stale-cycle breach; ``pending``: alerts to send; ``suppressed``: breaches another run
    already holds an alert row for (same check, scope, channel and hour)."""

    run_id: str
    now: datetime
    hours: list[HourCheck] = field(default_factory=list)
    skipped: tuple[datetime, datetime] | None = None
    cycle: Breach | None = None
    channels: list[str] = field(default_factory=list)
    pending: list[PendingAlert] = field(default_factory=list)
    suppressed: list[Breach] = field(default_factory=list)

    @property
    def breaches(self) -> list[Breach]:
        """Every breach found by this run: the hours' in order, then the stale cycle."""
        found = [b for h in self.hours for b in h.breaches]
        return found + ([self.cycle] if self.cycle is not None else [])

    def summary(self) -> str:
        """One line for the logs: hours, checks, breaches, alerts."""
        if self.hours:
            first, last = self.hours[0].hour, self.hours[-1].hour + HOUR
            span = f"{len(self.hours)} hour(s) {first:%Y-%m-%d %H:%M} – {last:%Y-%m-%d %H:%M} UTC"
        else:
            span = "no new completed hour (already checked)"
        scopes = sum(len(h.stats) for h in self.hours)
        skipped = (
            f"; SKIPPED {self.skipped[0]:%Y-%m-%d %H:%M} – {self.skipped[1]:%Y-%m-%d %H:%M} UTC "
            "(older than max_catch_up_hours)"
            if self.skipped
            else ""
        )
        return (
            f"monitor run {self.run_id}: checked {span}, {len(CHECKS) - 1} checks over "
            f"{scopes} hour×scope sample(s) + stale_cycle; {len(self.breaches)} breach(es); "
            f"alerts: {len(self.pending)} new, {len(self.suppressed)} already held by another "
            f"run, channels {', '.join(self.channels) or 'none'}{skipped}"
        )


def _alert_row(breach: Breach, channel: str, run_id: str, now: datetime) -> dict[str, Any]:
    assert breach.hour is not None
    return {
        "id": uuid7(),
        "check_name": breach.check,
        "scope": breach.scope,
        "channel": channel,
        "hour": to_utc(breach.hour, "hour"),
        "status": SENDING,
        "message": breach.message,
        "value": breach.value if math.isfinite(breach.value) else None,
        "threshold": breach.threshold,
        "sample": breach.sample,
        "attempts": 0,
        "run_id": run_id,
        "created_at": now,
        "claimed_at": now,
    }


def _check_claimed(
    conn: Connection, hours: Sequence[datetime], thresholds: AlertThresholds
) -> list[HourCheck]:
    checks = []
    for hour in hours:
        stats = window_stats(
            conn,
            start=hour,
            end=hour + HOUR,
            low_confidence_threshold=thresholds.low_confidence_threshold,
        )
        breaches = find_breaches(stats, thresholds, hour=hour)
        conn.execute(record_hour(hour, prompts=stats[0].total, breaches=len(breaches)))
        checks.append(HourCheck(hour, stats, breaches))
    return checks


def check_hours(
    url: str | None,
    home: Path,
    *,
    now: datetime,
    thresholds: AlertThresholds,
    channels: Sequence[str] = (),
    max_catch_up_hours: int = DEFAULT_MAX_CATCH_UP_HOURS,
    check_weekly_cycle: bool = True,
    run_id: str | None = None,
) -> MonitorCheck:
    """Claim and check every completed hour not checked yet (see the module docstring), check
    the weekly cycle's age, and insert an alert row per breach and channel (``"webhook"``,
    ``"block:<name>"``), all in one transaction; return what to send.

    Raises ``ParameterError`` (a ``UserError``) for a bad ``max_catch_up_hours`` before any
    I/O; a state file that cannot be read raises ``MonitorStateError``.
    """
    check_count(max_catch_up_hours, "max_catch_up_hours")
    now = to_utc(now, "now")
    result = MonitorCheck(run_id=run_id or str(uuid7()), now=now, channels=list(channels))
    url = database_url(url)
    if check_weekly_cycle:
        result.cycle = check_cycle(url, home, now=now, max_age_days=thresholds.max_cycle_age_days)
    postgres = is_postgres(url)
    with get_sync_engine(url).begin() as conn:
        last = from_db_datetime(conn.execute(select_last_checked_hour()).scalar())
        due, result.skipped = due_hours(last, now, max_catch_up_hours)
        claimed: list[datetime] = []
        if due:
            rows = [{"hour": h, "checked_at": now, "run_id": result.run_id} for h in due]
            got = conn.execute(claim_hours(postgres=postgres), rows).scalars().all()
            claimed = sorted(h for h in map(from_db_datetime, got) if h is not None)
        result.hours = _check_claimed(conn, claimed, thresholds)
        if channels and result.breaches:
            rows = [
                _alert_row(b, channel, result.run_id, now)
                for channel in channels
                for b in result.breaches
            ]
            inserted = conn.execute(insert_alerts(postgres=postgres), rows).all()
            won = {
                (r.check_name, r.scope, r.channel, from_db_datetime(r.hour)): r.id for r in inserted
            }
            for channel in channels:
                for b in result.breaches:
                    alert_id = won.get((b.check, b.scope, channel, b.hour))
                    if alert_id is None:
                        result.suppressed.append(b)
                    else:
                        result.pending.append(PendingAlert(alert_id, channel, b))
    if result.skipped is not None:
        logger.warning(
            "monitor: hours %s – %s UTC were never checked and are now older than "
            "max_catch_up_hours=%d; they are skipped",
            result.skipped[0].isoformat(),
            result.skipped[1].isoformat(),
            max_catch_up_hours,
        )
    logger.info("%s", result.summary())
    for b in result.breaches:
        logger.warning("alert %s (hour %s): %s", b.key, b.hour, b.message)
    return result


check_hours_task = io_task(check_hours, name="monitor-check-hours")
