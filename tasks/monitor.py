"""Alerts: error-rate checks per aligned UTC hour and a stale weekly-cycle check.

Checks, per predicted intent and overall, over one aligned UTC hour ``[H, H + 1h)`` (the hour
loop, the database state and the alert de-duplication are :mod:`tasks.monitor_hours`'):

- ``failure_rate``: failed workflows / prompts with a known outcome,
- ``low_confidence_rate``: prompts with confidence below a threshold / prompts,
- ``correction_rate``: corrected prompts / prompts,
- ``traffic_drop``: 1 - prompts / prompts of the hour before,

each only when its sample has at least ``min_count`` rows (tiny samples never alert), and
``stale_cycle``: the weekly cycle has not succeeded for more than ``max_cycle_age_days`` (the
marker :data:`capture.monitor_statements.WEEKLY_CYCLE_SUCCESS` in the database, written by
:func:`record_cycle_success`; the newest registry version counts too, and so does the old
``HOME/monitor/weekly_cycle.json`` when it is still there).

The counts come from ``capture.offline_statements.select_intent_counts`` and
``select_intent_traffic``. Sending a breach once is ``tasks.alert_delivery``'s job.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from capture import stats_rollup
from capture.db import database_url, get_sync_engine
from capture.errors import UserError
from capture.model_dir import METADATA_FILE
from capture.monitor_statements import WEEKLY_CYCLE_SUCCESS, select_marker, upsert_marker
from capture.offline_statements import (
    ParameterError,
    WindowCounts,
    check_count,
    check_fraction,
    check_positive,
    select_intent_counts,
    select_intent_traffic,
)
from capture.values import from_db_datetime, to_utc, utc_now

logger = logging.getLogger(__name__)

OVERALL = "overall"
WEEKLY_CYCLE = "weekly_cycle"
CYCLE_MARKER = "weekly_cycle.json"
CHECKS = ("failure_rate", "low_confidence_rate", "correction_rate", "traffic_drop", "stale_cycle")


@dataclass(frozen=True, slots=True)
class AlertThresholds:
    """When a check breaches. Rates are fractions in [0, 1]."""

    max_failure_rate: float = 0.2
    max_low_confidence_rate: float = 0.4
    max_correction_rate: float = 0.15
    max_traffic_drop: float = 0.5
    min_count: int = 20
    low_confidence_threshold: float = 0.7
    max_cycle_age_days: float = 8.0

    def __post_init__(self) -> None:
        for name in (
            "max_failure_rate",
            "max_low_confidence_rate",
            "max_correction_rate",
            "max_traffic_drop",
            "low_confidence_threshold",
        ):
            check_fraction(getattr(self, name), name)
        check_count(self.min_count, "min_count")
        check_positive(self.max_cycle_age_days, "max_cycle_age_days")


@dataclass(frozen=True, slots=True)
class ScopeStats:
    """Counts of one intent (or ``overall``) in the window, and its previous-window traffic."""

    scope: str
    total: int = 0
    low_confidence: int = 0
    corrections: int = 0
    outcomes: int = 0
    failures: int = 0
    previous_total: int = 0


_NO_ROWS = WindowCounts(total=0, low_confidence=0, corrections=0, outcomes=0, failures=0)


def _scope_stats(scope: str, counts: WindowCounts, previous_total: int) -> ScopeStats:
    return ScopeStats(
        scope=scope,
        total=counts.total,
        low_confidence=counts.low_confidence,
        corrections=counts.corrections,
        outcomes=counts.outcomes,
        failures=counts.failures,
        previous_total=previous_total,
    )


@dataclass(frozen=True, slots=True)
class Breach:
    """A check over its limit: in the aligned UTC hour starting at ``hour`` (the hour of the
    run for ``stale_cycle``; None when not tied to one)."""

    check: str
    scope: str
    value: float
    threshold: float
    sample: int
    message: str
    hour: datetime | None = None

    @property
    def key(self) -> str:
        return f"{self.check}:{self.scope}"


# --------------------------------------------------------------------------- windows and stats


def window_bounds(now: datetime, window: timedelta) -> tuple[datetime, datetime]:
    """The window ``[now - window, now)`` ending at ``now``."""
    if not window.total_seconds() > 0:
        raise ParameterError(f"window: expected a positive duration, found {window}")
    end = to_utc(now, "now")
    return end - window, end


def window_id(now: datetime, window: timedelta) -> str:
    """The aligned window ``now`` falls in (its UTC start), the unit of notification dedupe."""
    seconds = window.total_seconds()
    start = (to_utc(now, "now").timestamp() // seconds) * seconds
    return datetime.fromtimestamp(start, UTC).isoformat()


@task(name="monitor-refresh-stats", cache_policy=NO_CACHE)
def refresh_statistics(url: str | None, *, wait_timeout: float = 30.0) -> dict[str, Any]:
    """Bring the monitoring rollup (migration 0004) up to date, so that the dashboards' and
    reports' statistics read it instead of the raw rows; returns what the refresh did
    (:meth:`capture.stats_rollup.StatsRefresh.as_dict`)."""
    with Session(get_sync_engine(database_url(url))) as session:
        result = stats_rollup.refresh_prompt_stats(session=session, wait_timeout=wait_timeout)
        session.commit()
    logger.info(
        "statistics rollup: watermark %s (was %s), %d dirty hours, %d hourly and %d daily rows",
        result.watermark,
        result.previous_watermark,
        result.dirty_hours,
        result.hourly_rows,
        result.daily_rows,
    )
    return result.as_dict()


def window_stats(
    conn: Connection, *, start: datetime, end: datetime, low_confidence_threshold: float
) -> list[ScopeStats]:
    """Per-intent counts over ``created_at`` in ``[start, end)`` and the traffic of the window
    of the same length before it; ``overall`` first."""
    threshold = check_fraction(low_confidence_threshold, "low_confidence_threshold")
    current = {
        r.predicted_intent: WindowCounts.from_row(r)
        for r in conn.execute(
            select_intent_counts(start=start, end=end, low_confidence_threshold=threshold)
        )
    }
    previous = {
        r.predicted_intent: int(r.total)
        for r in conn.execute(select_intent_traffic(start=start - (end - start), end=start))
    }
    scopes = [
        _scope_stats(intent, current.get(intent, _NO_ROWS), previous.get(intent, 0))
        for intent in sorted(set(current) | set(previous))
    ]
    overall = _scope_stats(
        OVERALL,
        WindowCounts.sum(current.values()),
        sum(previous.values()),
    )
    return [overall, *scopes]


def collect_window_stats(
    url: str | None, *, now: datetime, window: timedelta, low_confidence_threshold: float
) -> list[ScopeStats]:
    """:func:`window_stats` of the window ``[now - window, now)`` (its own connection)."""
    start, end = window_bounds(now, window)
    check_fraction(low_confidence_threshold, "low_confidence_threshold")
    with get_sync_engine(database_url(url)).connect() as conn:
        return window_stats(
            conn, start=start, end=end, low_confidence_threshold=low_confidence_threshold
        )


def _describe(scope: str) -> str:
    return "all intents" if scope == OVERALL else f"intent `{scope}`"


def _rate_breaches(s: ScopeStats, t: AlertThresholds, hour: datetime | None) -> list[Breach]:
    """The failure, low-confidence and correction rates of one scope over their limits."""
    where = _describe(s.scope)
    low = f"prompts below {t.low_confidence_threshold:g} confidence"
    rates = [
        # check, hits, sample, limit, what the rate is, what the hits are
        ("failure_rate", s.failures, s.outcomes, t.max_failure_rate, "workflow failure rate",
         "failed workflows"),
        ("low_confidence_rate", s.low_confidence, s.total, t.max_low_confidence_rate,
         "low-confidence rate", low),
        ("correction_rate", s.corrections, s.total, t.max_correction_rate, "correction rate",
         "corrected prompts"),
    ]  # fmt: skip
    return [
        Breach(
            check=check,
            scope=s.scope,
            value=hits / sample,
            threshold=limit,
            sample=sample,
            message=f"{label} of {where} is {hits / sample:.1%} "
            f"({hits} of {sample} {noun}; limit {limit:.0%})",
            hour=hour,
        )
        for check, hits, sample, limit, label, noun in rates
        if sample >= t.min_count and hits / sample > limit
    ]


def _traffic_breach(s: ScopeStats, t: AlertThresholds, hour: datetime | None) -> Breach | None:
    """A ``traffic_drop`` breach when the scope's traffic fell by more than allowed."""
    if s.previous_total < t.min_count:
        return None
    drop = 1 - s.total / s.previous_total
    if drop <= t.max_traffic_drop:
        return None
    return Breach(
        check="traffic_drop",
        scope=s.scope,
        value=drop,
        threshold=t.max_traffic_drop,
        sample=s.previous_total,
        message=f"traffic of {_describe(s.scope)} dropped {drop:.0%}: {s.total} prompts "
        f"this {'hour' if hour is not None else 'window'}, {s.previous_total} the "
        f"{'hour' if hour is not None else 'window'} before (limit {t.max_traffic_drop:.0%})",
        hour=hour,
    )


def find_breaches(
    stats: Sequence[ScopeStats], thresholds: AlertThresholds, *, hour: datetime | None = None
) -> list[Breach]:
    """Every check over ``thresholds`` whose sample has at least ``min_count`` rows, scope by
    scope: the three rates, then the traffic drop (each tagged with ``hour``, the start of the
    aligned hour the stats cover)."""
    breaches = []
    for s in stats:
        breaches.extend(_rate_breaches(s, thresholds, hour))
        traffic = _traffic_breach(s, thresholds, hour)
        if traffic is not None:
            breaches.append(traffic)
    return breaches


# --------------------------------------------------------------------------- weekly cycle


class MonitorStateError(UserError, ValueError):
    """A state file of ``HOME/monitor`` cannot be read; the message names it and the fix."""


def monitor_dir(home: Path) -> Path:
    """Where the monitor kept its state files before migration 0006: ``HOME/monitor``."""
    return home / "monitor"


def read_state_file(path: Path, key: str, expected: str, fix: str) -> Any | None:
    """The value under ``key`` of the JSON object in ``path`` (None: no file). Raises
    :class:`MonitorStateError` naming the file, ``expected`` and the ``fix`` otherwise."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MonitorStateError(
            f"{path}: expected {expected}, found text that is not JSON ({exc}); {fix}"
        ) from None
    if not isinstance(data, dict) or key not in data:
        raise MonitorStateError(f"{path}: expected {expected}, found {data!r}; {fix}")
    return data[key]


def record_cycle_success(url: str | None, when: datetime) -> datetime:
    """Record in the database that the weekly cycle succeeded at ``when`` (the weekly flow
    calls this last); a later success is kept over an earlier one. Returns ``when`` in UTC."""
    moment = to_utc(when, "when")
    engine = get_sync_engine(database_url(url))
    with engine.begin() as conn:
        conn.execute(
            upsert_marker(postgres=engine.dialect.name == "postgresql"),
            {"name": WEEKLY_CYCLE_SUCCESS, "at": moment, "updated_at": utc_now()},
        )
    logger.info("weekly cycle success recorded at %s", moment.isoformat())
    return moment


def _aware(value: str, source: Path) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise MonitorStateError(
            f"{source}: expected an ISO 8601 time, found {value!r}; fix or delete the file"
        ) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _legacy_marker(home: Path) -> datetime | None:
    """The success time in ``HOME/monitor/weekly_cycle.json`` (written before migration 0006),
    or None."""
    marker = monitor_dir(home) / CYCLE_MARKER
    expected = '{"last_success": "<ISO time>"}'
    value = read_state_file(marker, "last_success", expected, "fix or delete the file")
    if value is None:
        return None
    if not isinstance(value, str):
        raise MonitorStateError(
            f"{marker}: expected {expected}, found last_success {value!r}; fix or delete the file"
        )
    return _aware(value, marker)


def last_cycle_success(url: str | None, home: Path) -> datetime | None:
    """The latest of: the database marker written by :func:`record_cycle_success`, the old
    ``HOME/monitor/weekly_cycle.json`` if present, and the newest ``created_at`` among the
    registry's versions (``home/models``). None when there is none of them."""
    from tasks.registry import list_models

    candidates = []
    with get_sync_engine(database_url(url)).connect() as conn:
        recorded = from_db_datetime(conn.execute(select_marker(WEEKLY_CYCLE_SUCCESS)).scalar())
    if recorded is not None:
        candidates.append(recorded)
    legacy = _legacy_marker(home)
    if legacy is not None:
        candidates.append(legacy)
    for entry in list_models(home / "models"):
        if entry.created_at:
            candidates.append(_aware(entry.created_at, entry.path / METADATA_FILE))
    return max(candidates) if candidates else None


def check_cycle(
    url: str | None, home: Path, *, now: datetime, max_age_days: float
) -> Breach | None:
    """A ``stale_cycle`` breach when the weekly cycle's last success is older than allowed;
    its ``hour`` is the last completed UTC hour at ``now`` (one alert per hour at most)."""
    last = last_cycle_success(url, home)
    now = to_utc(now, "now")
    hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    if last is None:
        return Breach(
            check="stale_cycle",
            scope=WEEKLY_CYCLE,
            value=float("inf"),
            threshold=max_age_days,
            sample=0,
            message="the weekly cycle has never succeeded "
            f"(no success recorded and an empty registry under {home})",
            hour=hour,
        )
    age_days = (now - last).total_seconds() / 86_400
    if age_days <= max_age_days:
        return None
    return Breach(
        check="stale_cycle",
        scope=WEEKLY_CYCLE,
        value=age_days,
        threshold=max_age_days,
        sample=0,
        message=f"the weekly cycle last succeeded {age_days:.1f} days ago "
        f"({last:%Y-%m-%d %H:%M} UTC; limit {max_age_days:g} days)",
        hour=hour,
    )


def breach_dict(breach: Breach) -> dict[str, Any]:
    """A JSON-safe dict of ``breach`` (an infinite value, "never succeeded", becomes None; the
    hour an ISO string)."""
    data = asdict(breach)
    data["key"] = breach.key
    data["hour"] = breach.hour.isoformat() if breach.hour is not None else None
    if not math.isfinite(breach.value):
        data["value"] = None
    return data
