"""Alert delivery: each alert row of ``tasks.monitor_hours`` sent once to its channel.

An alert is one breach in one aligned UTC hour for one channel; its row in ``monitor_alerts``
(migration 0006, unique per check, scope, channel and hour) is inserted BEFORE it is sent, by
the run whose insert wins, so two overlapping monitor runs never send one alert twice. A
failed delivery is retried within the run (bounded, exponential backoff), then recorded as
``failed`` and reported in the result and the logs; a later run claims the failed alerts of
the last ``retry_hours`` again (one ``UPDATE ... RETURNING``, so again only one run sends
them), as well as alerts a run claimed and never settled (it died). Channels: a
Slack-compatible webhook (``{"text", "blocks"}`` posted with httpx) and/or a Prefect
notification block named ``<block-type>/<name>``. This replaces ``HOME/monitor/alerts_sent.json``.
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from capture.db import database_url, get_sync_engine
from capture.monitor_statements import claim_retries, settle_alerts
from capture.values import HOUR, from_db_datetime, utc_now
from tasks.monitor import Breach, breach_dict
from tasks.monitor_hours import MonitorCheck

logger = logging.getLogger(__name__)

#: How far back a run retries alerts whose delivery failed, in hours.
DEFAULT_RETRY_HOURS = 24.0
#: An alert claimed longer ago than this and never settled was abandoned by its run.
STALE_CLAIM = timedelta(minutes=15)


@dataclass(frozen=True, slots=True)
class Delivery:
    """How sending to one channel went: ``attempts`` made, ``error`` of the last one (None:
    the channel took the alert)."""

    channel: str
    attempts: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class NotifyResult:
    """What :func:`deliver_alerts` did with the alerts of one run."""

    new: list[str] = field(default_factory=list)  # breach keys whose alert rows this run won
    suppressed: list[str] = field(default_factory=list)  # held by another run (same hour)
    deliveries: list[Delivery] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)  # failed earlier, claimed again now

    @property
    def errors(self) -> list[str]:
        return [f"{d.channel}: {d.error}" for d in self.deliveries if not d.ok]


# --------------------------------------------------------------------------- delivery


def _hour_label(breach: Breach) -> str:
    """``"00:00–01:00 UTC: "`` for a breach found in one hour's traffic, else ``""``."""
    if breach.hour is None or breach.check == "stale_cycle":
        return ""
    return f"{breach.hour:%H:%M}–{breach.hour + HOUR:%H:%M} UTC: "


def _block_id(breach: Breach) -> str:
    """Unique within one message (Slack refuses two equal ``block_id``\\ s): the key, and the
    hour when the breach has one (one message may carry the same check for several hours)."""
    if breach.hour is None:
        return breach.key[:255]
    return f"{breach.key}@{breach.hour:%Y-%m-%dT%H:%MZ}"[:255]


def slack_payload(
    breaches: Sequence[Breach], *, window_start: datetime, window_end: datetime
) -> dict[str, Any]:
    """A Slack-compatible message: ``text`` (fallback) and ``blocks`` (one section per breach)."""
    title = f"Prompt Capture: {len(breaches)} alert{'s' if len(breaches) != 1 else ''}"
    span = f"window {window_start:%Y-%m-%d %H:%M} – {window_end:%Y-%m-%d %H:%M} UTC"
    lines = [f"• {_hour_label(b)}{b.message}" for b in breaches]
    return {
        "text": f"{title} ({span})\n" + "\n".join(lines),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": title}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": span}]},
            *(
                {
                    "type": "section",
                    "block_id": _block_id(b),
                    "text": {
                        "type": "mrkdwn",
                        "text": f"*{b.check}* · {_hour_label(b)}{b.message}",
                    },
                }
                for b in breaches
            ),
        ],
    }


RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def send_webhook(
    url: str,
    payload: dict[str, Any],
    *,
    attempts: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 5.0,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Delivery:
    """POST ``payload`` as JSON; retry connection errors, timeouts, 408/425/429/5xx up to
    ``attempts`` times with exponential backoff. Never raises for delivery problems."""
    error = "not attempted"
    with httpx.Client(transport=transport, timeout=timeout_s) as client:
        for attempt in range(1, attempts + 1):
            try:
                response = client.post(url, json=payload)
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    return Delivery(channel="webhook", attempts=attempt)
                error = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in RETRYABLE_STATUS:
                    return Delivery(channel="webhook", attempts=attempt, error=error)
            if attempt < attempts:
                delay = backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "webhook attempt %d/%d failed (%s); retrying in %.1fs",
                    attempt,
                    attempts,
                    error,
                    delay,
                )
                sleep(delay)
    return Delivery(channel="webhook", attempts=attempts, error=error)


def send_block(
    name: str,
    subject: str,
    body: str,
    *,
    attempts: int = 3,
    backoff_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Delivery:
    """Notify through the Prefect notification block ``name`` (``<block-type-slug>/<name>``,
    e.g. ``slack-webhook/alerts``), with the same bounded retries as :func:`send_webhook`."""
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import NotificationBlock
    from prefect.utilities.asyncutils import run_coro_as_sync

    channel = f"block:{name}"
    try:
        block = Block.load(name)
    except (ValueError, RuntimeError, httpx.HTTPError) as exc:
        return Delivery(channel=channel, attempts=0, error=f"cannot load block: {exc}")
    if not isinstance(block, NotificationBlock):
        return Delivery(
            channel=channel,
            attempts=0,
            error=f"block {name!r} is a {type(block).__name__}, not a notification block",
        )
    notifier: Any = block
    error = "not attempted"
    for attempt in range(1, attempts + 1):
        try:
            with block.raise_on_failure():
                # Concrete blocks dispatch notify() synchronously here; a block whose notify is
                # only async returns a coroutine, which is run to completion.
                sent = notifier.notify(body, subject=subject)
                if inspect.iscoroutine(sent):
                    run_coro_as_sync(sent)
            return Delivery(channel=channel, attempts=attempt)
        except Exception as exc:  # a third-party notifier may raise anything: report it
            error = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            sleep(backoff_s * 2 ** (attempt - 1))
    return Delivery(channel=channel, attempts=attempts, error=error)


def alert_channels(webhook_url: str | None, notification_block: str | None) -> list[str]:
    """The channel names alert rows are kept under: ``webhook``, ``block:<name>``."""
    channels = []
    if webhook_url:
        channels.append("webhook")
    if notification_block:
        channels.append(f"block:{notification_block}")
    return channels


def _send(
    channel: str,
    payload: dict[str, Any],
    *,
    webhook_url: str | None,
    notification_block: str | None,
    attempts: int,
    backoff_s: float,
    transport: httpx.BaseTransport | None,
    sleep: Callable[[float], None],
) -> Delivery:
    """Deliver ``payload`` to ``channel`` ("webhook" or "block:<name>")."""
    if channel == "webhook":
        assert webhook_url is not None
        return send_webhook(
            webhook_url,
            payload,
            attempts=attempts,
            backoff_s=backoff_s,
            transport=transport,
            sleep=sleep,
        )
    assert notification_block is not None
    return send_block(
        notification_block,
        payload["blocks"][0]["text"]["text"],
        payload["text"],
        attempts=attempts,
        backoff_s=backoff_s,
        sleep=sleep,
    )


def _claim_retries(
    url: str, channel: str, run_id: str, now: datetime, retry_hours: float
) -> list[tuple[uuid.UUID, Breach]]:
    """Claim this channel's failed (or abandoned) alerts of the last ``retry_hours``."""
    stmt = claim_retries(
        channel=channel,
        run_id=run_id,
        now=now,
        since=now - timedelta(hours=retry_hours),
        stale_before=now - STALE_CLAIM,
    )
    with get_sync_engine(url).begin() as conn:
        rows = conn.execute(stmt).all()
    return [
        (
            r.id,
            Breach(
                check=r.check_name,
                scope=r.scope,
                value=float("inf") if r.value is None else float(r.value),
                threshold=float(r.threshold),
                sample=int(r.sample),
                message=r.message,
                hour=from_db_datetime(r.hour),
            ),
        )
        for r in rows
    ]


def _settle(url: str, ids: list[uuid.UUID], run_id: str, delivery: Delivery) -> None:
    stmt = settle_alerts(
        ids,
        run_id=run_id,
        ok=delivery.ok,
        attempts=delivery.attempts,
        error=delivery.error,
        now=utc_now(),
    )
    with get_sync_engine(url).begin() as conn:
        conn.execute(stmt)


def deliver_alerts(
    url: str | None,
    check: MonitorCheck,
    *,
    webhook_url: str | None = None,
    notification_block: str | None = None,
    attempts: int = 3,
    backoff_s: float = 1.0,
    retry_hours: float = DEFAULT_RETRY_HOURS,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> NotifyResult:
    """Send the alerts ``check`` won (one message per channel, with this channel's failed
    alerts of the last ``retry_hours`` claimed again) and record each delivery in
    ``monitor_alerts``. Never raises for a delivery problem: it is in the result."""
    url = database_url(url)
    channels = alert_channels(webhook_url, notification_block)
    breaches = check.breaches
    if not channels:
        if breaches:
            logger.warning(
                "%d alert(s) but no webhook or notification block configured", len(breaches)
            )
        return NotifyResult(new=sorted({b.key for b in breaches}))
    new_keys = {p.breach.key for p in check.pending}
    retried: set[str] = set()
    deliveries = []
    for channel in channels:
        mine = [(p.id, p.breach) for p in check.pending if p.channel == channel]
        again = _claim_retries(url, channel, check.run_id, check.now, retry_hours)
        retried.update(b.key for _, b in again)
        todo = mine + again
        if not todo:
            continue
        sent = [b for _, b in todo]
        start = min((b.hour for b in sent if b.hour is not None), default=check.now)
        end = max((b.hour for b in sent if b.hour is not None), default=check.now)
        delivery = _send(
            channel,
            slack_payload(sent, window_start=start, window_end=end + HOUR),
            webhook_url=webhook_url,
            notification_block=notification_block,
            attempts=attempts,
            backoff_s=backoff_s,
            transport=transport,
            sleep=sleep,
        )
        deliveries.append(delivery)
        _settle(url, [alert_id for alert_id, _ in todo], check.run_id, delivery)
        if delivery.ok:
            logger.info(
                "%s: notified %d alert(s) (%d retried from earlier runs)",
                channel,
                len(todo),
                len(again),
            )
        else:
            logger.error(
                "%s: could not deliver %d alert(s) after %d attempt(s): %s; a later run "
                "retries them",
                channel,
                len(todo),
                delivery.attempts,
                delivery.error,
            )
    suppressed = {b.key for b in check.suppressed} - new_keys
    return NotifyResult(
        new=sorted(new_keys),
        suppressed=sorted(suppressed),
        deliveries=deliveries,
        retried=sorted(retried),
    )


deliver_alerts_task = task(name="monitor-deliver-alerts", cache_policy=NO_CACHE)(deliver_alerts)


def monitor_summary(
    check: MonitorCheck, notified: NotifyResult, stats_refresh: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The monitor flow's JSON-able result: the hours checked (and skipped), per hour the
    prompts of that hour and of the hour before, every breach (with its hour), which alerts
    this run sent, found already held by another run or retried, and each delivery."""
    hours = [h.as_dict() for h in check.hours]
    return {
        "run_id": check.run_id,
        "now": check.now.isoformat(),
        "hours_checked": [h["hour"] for h in hours],
        "hours_skipped": (
            [check.skipped[0].isoformat(), check.skipped[1].isoformat()] if check.skipped else None
        ),
        "window_start": check.hours[0].hour.isoformat() if check.hours else None,
        "window_end": (check.hours[-1].hour + HOUR).isoformat() if check.hours else None,
        "hours": hours,
        "prompts": sum(h.prompts for h in check.hours),
        "previous_prompts": sum(h.previous_prompts for h in check.hours),
        "breaches": [breach_dict(b) for b in check.breaches],
        "new": notified.new,
        "suppressed": notified.suppressed,
        "retried": notified.retried,
        "deliveries": [
            {"channel": d.channel, "ok": d.ok, "attempts": d.attempts, "error": d.error}
            for d in notified.deliveries
        ],
        "delivery_errors": notified.errors,
        "stats_refresh": stats_refresh,
    }
