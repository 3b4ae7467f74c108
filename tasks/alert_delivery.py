"""Alert delivery: each breach of ``tasks.monitor`` sent once per window to every channel.

A breach is notified once per window: the window id is ``now`` floored to a multiple of the
window length (UTC epoch), and ``<channel>|<window id>|<check>:<scope>`` is recorded in
``HOME/monitor/alerts_sent.json`` (``{"sent": {key: ISO time}}``, entries kept 14 days) after a
successful delivery. A failed delivery is retried (bounded, exponential backoff), then reported
in the result and the logs, and left unrecorded so that the next run tries again. Channels: a
Slack-compatible webhook (``{"text", "blocks"}`` posted with httpx) and/or a Prefect
notification block named ``<block-type>/<name>``.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from capture.files import write_json_atomic
from capture.values import to_utc
from tasks.monitor import (
    Breach,
    MonitorStateError,
    monitor_dir,
    read_state_file,
    window_bounds,
    window_id,
)

logger = logging.getLogger(__name__)

STATE_FILE = "alerts_sent.json"
STATE_KEEP_DAYS = 14


@dataclass(frozen=True, slots=True)
class Delivery:
    """How sending to one channel went: ``attempts`` made, ``error`` of the last one."""

    channel: str
    ok: bool
    attempts: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class NotifyResult:
    """What :func:`notify_breaches` did with the breaches of one run."""

    new: list[str] = field(default_factory=list)  # breach keys not notified before in the window
    suppressed: list[str] = field(default_factory=list)  # already notified in this window
    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [f"{d.channel}: {d.error}" for d in self.deliveries if not d.ok]


# --------------------------------------------------------------------------- delivery


def slack_payload(
    breaches: Sequence[Breach], *, window_start: datetime, window_end: datetime
) -> dict[str, Any]:
    """A Slack-compatible message: ``text`` (fallback) and ``blocks`` (one section per breach)."""
    title = f"Prompt Capture: {len(breaches)} alert{'s' if len(breaches) != 1 else ''}"
    span = f"window {window_start:%Y-%m-%d %H:%M} – {window_end:%Y-%m-%d %H:%M} UTC"
    lines = [f"• {b.message}" for b in breaches]
    return {
        "text": f"{title} ({span})\n" + "\n".join(lines),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": title}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": span}]},
            *(
                {
                    "type": "section",
                    "block_id": b.key[:255],
                    "text": {"type": "mrkdwn", "text": f"*{b.check}* · {b.message}"},
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
                    return Delivery(channel="webhook", ok=True, attempts=attempt)
                error = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in RETRYABLE_STATUS:
                    return Delivery(channel="webhook", ok=False, attempts=attempt, error=error)
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
    return Delivery(channel="webhook", ok=False, attempts=attempts, error=error)


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
        return Delivery(channel=channel, ok=False, attempts=0, error=f"cannot load block: {exc}")
    if not isinstance(block, NotificationBlock):
        return Delivery(
            channel=channel,
            ok=False,
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
            return Delivery(channel=channel, ok=True, attempts=attempt)
        except Exception as exc:  # a third-party notifier may raise anything: report it
            error = f"{type(exc).__name__}: {exc}"
        if attempt < attempts:
            sleep(backoff_s * 2 ** (attempt - 1))
    return Delivery(channel=channel, ok=False, attempts=attempts, error=error)


def _load_state(path: Path) -> dict[str, str]:
    expected, fix = '{"sent": {...}}', "delete the file to reset"
    sent = read_state_file(path, "sent", expected, fix)
    if sent is None:
        return {}
    if not isinstance(sent, dict):
        raise MonitorStateError(f"{path}: expected {expected}, found sent {sent!r}; {fix}")
    return {str(k): str(v) for k, v in sent.items()}


def _save_state(path: Path, sent: dict[str, str], now: datetime) -> None:
    horizon = now - timedelta(days=STATE_KEEP_DAYS)
    kept = {k: v for k, v in sent.items() if datetime.fromisoformat(v) >= horizon}
    write_json_atomic(path, {"sent": dict(sorted(kept.items()))})


def _channels(webhook_url: str | None, notification_block: str | None) -> list[str]:
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


@task(name="monitor-notify", cache_policy=NO_CACHE)
def notify_breaches(
    breaches: Sequence[Breach],
    *,
    home: Path,
    now: datetime,
    window: timedelta,
    webhook_url: str | None = None,
    notification_block: str | None = None,
    attempts: int = 3,
    backoff_s: float = 1.0,
    transport: httpx.BaseTransport | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> NotifyResult:
    """Send each breach not yet notified in this window to every configured channel; record
    what was delivered in ``HOME/monitor/alerts_sent.json``."""
    now = to_utc(now, "now")
    current_window = window_id(now, window)
    state_path = monitor_dir(home) / STATE_FILE
    sent = _load_state(state_path)
    start, end = window_bounds(now, window)
    channels = _channels(webhook_url, notification_block)
    if not channels:
        if breaches:
            logger.warning(
                "%d alert(s) but no webhook or notification block configured", len(breaches)
            )
        return NotifyResult(new=[b.key for b in breaches])
    new_keys: set[str] = set()
    suppressed: set[str] = set()
    deliveries = []
    for channel in channels:
        pending = [b for b in breaches if f"{channel}|{current_window}|{b.key}" not in sent]
        suppressed.update(b.key for b in breaches if b not in pending)
        if not pending:
            continue
        new_keys.update(b.key for b in pending)
        delivery = _send(
            channel,
            slack_payload(pending, window_start=start, window_end=end),
            webhook_url=webhook_url,
            notification_block=notification_block,
            attempts=attempts,
            backoff_s=backoff_s,
            transport=transport,
            sleep=sleep,
        )
        deliveries.append(delivery)
        if delivery.ok:
            for b in pending:
                sent[f"{channel}|{current_window}|{b.key}"] = now.isoformat()
            logger.info("%s: notified %d alert(s)", channel, len(pending))
        else:
            logger.error(
                "%s: could not deliver %d alert(s) after %d attempt(s): %s",
                channel,
                len(pending),
                delivery.attempts,
                delivery.error,
            )
    if any(d.ok for d in deliveries):
        _save_state(state_path, sent, now)
    return NotifyResult(
        new=sorted(new_keys), suppressed=sorted(suppressed - new_keys), deliveries=deliveries
    )
