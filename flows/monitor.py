"""The hourly monitor flow: error-rate and traffic checks, a stale-cycle check, notifications."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger

from capture.settings import get_settings
from capture.values import utc_now
from tasks.alert_delivery import notify_breaches
from tasks.monitor import (
    AlertThresholds,
    breach_dict,
    check_cycle,
    collect_window_stats,
    find_breaches,
    refresh_statistics,
    window_bounds,
)
from tasks.run_settings import resolve_run_settings

logger = logging.getLogger(__name__)


@flow(name="monitor")
def monitor_flow(
    *,
    window_hours: float = 1.0,
    webhook_url: str | None = None,
    notification_block: str | None = None,
    max_failure_rate: float = 0.2,
    max_low_confidence_rate: float = 0.4,
    max_correction_rate: float = 0.15,
    max_traffic_drop: float = 0.5,
    min_count: int = 20,
    low_confidence_threshold: float = 0.7,
    max_cycle_age_days: float = 8.0,
    check_weekly_cycle: bool = True,
    refresh_stats: bool = True,
    delivery_attempts: int = 3,
    retry_backoff_s: float = 2.0,
    home: str | None = None,
    database_url: str | None = None,
    database_secret: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Check the last ``window_hours`` of traffic per intent and overall, and the weekly cycle's
    age; notify each new breach once per window to ``webhook_url`` (default: the setting
    ``PROMPT_CAPTURE_ALERT_WEBHOOK_URL``) and/or the Prefect notification block
    ``notification_block`` (``<block-type>/<name>``). Delivery failures are retried, then
    reported in the result (``delivery_errors``); they never fail the flow.

    First (unless ``refresh_stats`` is false) it brings the monitoring rollup up to date, which
    keeps the confidence / intent / success-rate statistics fast (``stats_refresh`` in the
    result; see docs/DATABASE.md "Monitoring rollup").

    ``home`` defaults to PROMPT_CAPTURE_HOME; the database to ``database_url`` (no password),
    the Secret block ``database_secret``, PROMPT_CAPTURE_DATABASE_URL, or the home's SQLite file.
    """
    run_logger = get_run_logger()
    settings = get_settings()
    run = resolve_run_settings(
        settings, home=home, database_url=database_url, database_secret=database_secret
    )
    thresholds = AlertThresholds(
        max_failure_rate=max_failure_rate,
        max_low_confidence_rate=max_low_confidence_rate,
        max_correction_rate=max_correction_rate,
        max_traffic_drop=max_traffic_drop,
        min_count=min_count,
        low_confidence_threshold=low_confidence_threshold,
        max_cycle_age_days=max_cycle_age_days,
    )
    window = timedelta(hours=window_hours)
    now = now if now is not None else utc_now()
    home_dir = run.home
    webhook_url = webhook_url or settings.alert_webhook_url or None

    refreshed = refresh_statistics(run.database_url) if refresh_stats else None
    stats = collect_window_stats(
        run.database_url, now=now, window=window, low_confidence_threshold=low_confidence_threshold
    )
    breaches = find_breaches(stats, thresholds)
    if check_weekly_cycle:
        stale = check_cycle(home_dir, now=now, max_age_days=max_cycle_age_days)
        if stale is not None:
            breaches.append(stale)
    for breach in breaches:
        run_logger.warning("alert %s: %s", breach.key, breach.message)

    result = notify_breaches(
        breaches,
        home=home_dir,
        now=now,
        window=window,
        webhook_url=webhook_url,
        notification_block=notification_block,
        attempts=delivery_attempts,
        backoff_s=retry_backoff_s,
    )
    for error in result.errors:
        run_logger.error("alert delivery failed: %s", error)
    start, end = window_bounds(now, window)
    overall = stats[0]
    return {
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "prompts": overall.total,
        "previous_prompts": overall.previous_total,
        "breaches": [breach_dict(b) for b in breaches],
        "new": result.new,
        "suppressed": result.suppressed,
        "deliveries": [
            {"channel": d.channel, "ok": d.ok, "attempts": d.attempts, "error": d.error}
            for d in result.deliveries
        ],
        "delivery_errors": result.errors,
        "stats_refresh": refreshed,
    }
