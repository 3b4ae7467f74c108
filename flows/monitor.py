"""The hourly monitor flow: every aligned UTC hour checked once (error-rate and traffic checks),
a stale-cycle check, notifications sent once (``tasks.monitor_hours``, ``tasks.alert_delivery``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow, get_run_logger

from capture.offline_statements import check_count
from capture.values import utc_now
from flows.entry import from_parameters, open_run
from tasks.alert_delivery import alert_channels, deliver_alerts_task, monitor_summary
from tasks.monitor import AlertThresholds, refresh_statistics
from tasks.monitor_hours import DEFAULT_MAX_CATCH_UP_HOURS, check_hours_task


@flow(name="monitor")
def monitor_flow(
    *,
    max_catch_up_hours: int = DEFAULT_MAX_CATCH_UP_HOURS,
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
    """Check every completed aligned UTC hour since the last one checked (at most
    ``max_catch_up_hours`` back; the state is in the database, so DST, a late or a missed run
    leave no gap and overlapping runs never check an hour twice), per intent and overall, and
    the weekly cycle's age; notify each alert once to ``webhook_url`` (default: the setting
    ``PROMPT_CAPTURE_ALERT_WEBHOOK_URL``) and/or the Prefect notification block
    ``notification_block`` (``<block-type>/<name>``). Delivery failures are retried, then
    reported in the result (``delivery_errors``) and retried by a later run; they never fail
    the flow.

    First (unless ``refresh_stats`` is false) it brings the monitoring rollup up to date, which
    keeps the confidence / intent / success-rate statistics fast (``stats_refresh`` in the
    result; see docs/DATABASE.md "Monitoring rollup").

    ``home`` defaults to PROMPT_CAPTURE_HOME; the database to ``database_url`` (no password),
    the Secret block ``database_secret``, PROMPT_CAPTURE_DATABASE_URL, or the home's SQLite file.
    """
    # A user's mistake fails before any I/O: the thresholds and the catch-up window first.
    thresholds = from_parameters(AlertThresholds, locals())
    check_count(max_catch_up_hours, "max_catch_up_hours")
    run_logger = get_run_logger()
    run = open_run(home, database_url, database_secret)
    now = now if now is not None else utc_now()
    webhook_url = webhook_url or run.settings.alert_webhook_url or None

    run.require_database()
    refreshed = refresh_statistics(run.database_url) if refresh_stats else None
    check = check_hours_task(
        run.database_url,
        run.layout.home,
        now=now,
        thresholds=thresholds,
        channels=alert_channels(webhook_url, notification_block),
        max_catch_up_hours=max_catch_up_hours,
        check_weekly_cycle=check_weekly_cycle,
    )
    run_logger.info(check.summary())
    for breach in check.breaches:
        run_logger.warning("alert %s (hour %s): %s", breach.key, breach.hour, breach.message)
    result = deliver_alerts_task(
        run.database_url,
        check,
        webhook_url=webhook_url,
        notification_block=notification_block,
        attempts=delivery_attempts,
        backoff_s=retry_backoff_s,
    )
    for error in result.errors:
        run_logger.error("alert delivery failed: %s", error)
    return monitor_summary(check, result, refreshed)
