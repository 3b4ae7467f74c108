"""Alerts: error-rate checks over a time window, a stale weekly-cycle check, and notifications.

Checks, per predicted intent and overall, over ``(now - window, now]``:

- ``failure_rate``: failed workflows / prompts with a known outcome,
- ``low_confidence_rate``: prompts with confidence below a threshold / prompts,
- ``correction_rate``: corrected prompts / prompts,
- ``traffic_drop``: 1 - prompts / prompts of the previous window of the same length,

each only when its sample has at least ``min_count`` rows (tiny samples never alert), and
``stale_cycle``: the weekly cycle has not succeeded for more than ``max_cycle_age_days``.

A breach is notified once per window: the window id is ``now`` floored to a multiple of the
window length (UTC epoch), and ``<channel>|<window id>|<check>:<scope>`` is recorded in
``HOME/monitor/alerts_sent.json`` after a successful delivery. A failed delivery is retried
(bounded, exponential backoff), then reported in the result and the logs, and left unrecorded
so that the next run tries again. Channels: a Slack-compatible webhook (``{"text", "blocks"}``
posted with httpx) and/or a Prefect notification block named ``<block-type>/<name>``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import case, false, func, select
from sqlalchemy.orm import Session

from capture import queries
from capture.db import database_url, get_sync_engine
from capture.queries import as_real, to_utc
from capture.types import check_confidence

logger = logging.getLogger(__name__)

C = queries.C
OVERALL = "overall"
WEEKLY_CYCLE = "weekly_cycle"
STATE_FILE = "alerts_sent.json"
CYCLE_MARKER = "weekly_cycle.json"
STATE_KEEP_DAYS = 14
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
            check_confidence(getattr(self, name), name)
        if (
            isinstance(self.min_count, bool)
            or not isinstance(self.min_count, int)
            or self.min_count < 1
        ):
            raise ValueError(f"min_count: expected a positive integer, found {self.min_count!r}")
        if not self.max_cycle_age_days > 0:
            raise ValueError(
                f"max_cycle_age_days: expected a positive number, found {self.max_cycle_age_days!r}"
            )


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


@dataclass(frozen=True, slots=True)
class Breach:
    check: str
    scope: str
    value: float
    threshold: float
    sample: int
    message: str

    @property
    def key(self) -> str:
        return f"{self.check}:{self.scope}"


@dataclass(frozen=True, slots=True)
class Delivery:
    channel: str
    ok: bool
    attempts: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class NotifyResult:
    new: list[str] = field(default_factory=list)  # breach keys not notified before in the window
    suppressed: list[str] = field(default_factory=list)  # already notified in this window
    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [f"{d.channel}: {d.error}" for d in self.deliveries if not d.ok]


# --------------------------------------------------------------------------- windows and stats


def window_bounds(now: datetime, window: timedelta) -> tuple[datetime, datetime]:
    """The window ``(now - window, now]`` the checks look at."""
    if not window.total_seconds() > 0:
        raise ValueError(f"window: expected a positive duration, found {window}")
    end = to_utc(now, "now")
    return end - window, end


def window_id(now: datetime, window: timedelta) -> str:
    """The aligned window ``now`` falls in (its UTC start), the unit of notification dedupe."""
    seconds = window.total_seconds()
    start = (to_utc(now, "now").timestamp() // seconds) * seconds
    return datetime.fromtimestamp(start, UTC).isoformat()


def _select_window(start: datetime, end: datetime, low_confidence_threshold: float) -> Any:
    threshold = as_real(low_confidence_threshold)  # a stored REAL 0.7 is not below 0.7
    return (
        select(
            C.predicted_intent,
            func.count().label("total"),
            func.count(case((C.confidence < threshold, 1))).label("low_confidence"),
            func.count(C.corrected_intent).label("corrections"),
            func.count(C.was_successful).label("outcomes"),
            func.count(case((C.was_successful == false(), 1))).label("failures"),
        )
        .where(C.created_at > to_utc(start, "start"), C.created_at <= to_utc(end, "end"))
        .group_by(C.predicted_intent)
    )


def _select_traffic(start: datetime, end: datetime) -> Any:
    return (
        select(C.predicted_intent, func.count().label("total"))
        .where(C.created_at > to_utc(start, "start"), C.created_at <= to_utc(end, "end"))
        .group_by(C.predicted_intent)
    )


@task(name="monitor-refresh-stats", cache_policy=NO_CACHE)
def refresh_statistics(url: str | None, *, wait_timeout: float = 30.0) -> dict[str, Any]:
    """Bring the monitoring rollup (migration 0004) up to date, so that the dashboards' and
    reports' statistics read it instead of the raw rows; returns what the refresh did
    (:meth:`capture.queries.StatsRefresh.as_dict`)."""
    with Session(get_sync_engine(database_url(url))) as session:
        result = queries.refresh_prompt_stats(session=session, wait_timeout=wait_timeout)
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


@task(name="monitor-window-stats", cache_policy=NO_CACHE)
def collect_window_stats(
    url: str | None, *, now: datetime, window: timedelta, low_confidence_threshold: float
) -> list[ScopeStats]:
    """Per-intent counts for the window and the window before it; ``overall`` first."""
    start, end = window_bounds(now, window)
    with Session(get_sync_engine(database_url(url))) as session:
        current = {
            r.predicted_intent: r
            for r in session.execute(_select_window(start, end, low_confidence_threshold))
        }
        previous = {
            r.predicted_intent: int(r.total)
            for r in session.execute(_select_traffic(start - window, start))
        }
    scopes = [
        ScopeStats(
            scope=intent,
            total=int(current[intent].total) if intent in current else 0,
            low_confidence=int(current[intent].low_confidence) if intent in current else 0,
            corrections=int(current[intent].corrections) if intent in current else 0,
            outcomes=int(current[intent].outcomes) if intent in current else 0,
            failures=int(current[intent].failures) if intent in current else 0,
            previous_total=previous.get(intent, 0),
        )
        for intent in sorted(set(current) | set(previous))
    ]
    overall = ScopeStats(
        scope=OVERALL,
        total=sum(s.total for s in scopes),
        low_confidence=sum(s.low_confidence for s in scopes),
        corrections=sum(s.corrections for s in scopes),
        outcomes=sum(s.outcomes for s in scopes),
        failures=sum(s.failures for s in scopes),
        previous_total=sum(s.previous_total for s in scopes),
    )
    return [overall, *scopes]


def _describe(scope: str) -> str:
    return "all intents" if scope == OVERALL else f"intent `{scope}`"


def find_breaches(stats: Sequence[ScopeStats], thresholds: AlertThresholds) -> list[Breach]:
    """Every check over ``thresholds`` whose sample has at least ``min_count`` rows."""
    t = thresholds
    breaches = []
    for s in stats:
        where = _describe(s.scope)
        rates = [
            (
                "failure_rate",
                s.failures,
                s.outcomes,
                t.max_failure_rate,
                "workflow failure rate",
                "failed workflows",
            ),
            (
                "low_confidence_rate",
                s.low_confidence,
                s.total,
                t.max_low_confidence_rate,
                "low-confidence rate",
                f"prompts below {t.low_confidence_threshold:g} confidence",
            ),
            (
                "correction_rate",
                s.corrections,
                s.total,
                t.max_correction_rate,
                "correction rate",
                "corrected prompts",
            ),
        ]
        for check, hits, sample, limit, label, noun in rates:
            if sample >= t.min_count and hits / sample > limit:
                breaches.append(
                    Breach(
                        check=check,
                        scope=s.scope,
                        value=hits / sample,
                        threshold=limit,
                        sample=sample,
                        message=f"{label} of {where} is {hits / sample:.1%} "
                        f"({hits} of {sample} {noun}; limit {limit:.0%})",
                    )
                )
        if s.previous_total >= t.min_count:
            drop = 1 - s.total / s.previous_total
            if drop > t.max_traffic_drop:
                breaches.append(
                    Breach(
                        check="traffic_drop",
                        scope=s.scope,
                        value=drop,
                        threshold=t.max_traffic_drop,
                        sample=s.previous_total,
                        message=f"traffic of {where} dropped {drop:.0%}: {s.total} prompts "
                        f"this window, {s.previous_total} the window before "
                        f"(limit {t.max_traffic_drop:.0%})",
                    )
                )
    return breaches


# --------------------------------------------------------------------------- weekly cycle


def _monitor_dir(home: Path) -> Path:
    return home / "monitor"


def record_cycle_success(home: Path, when: datetime) -> Path:
    """Record that the weekly cycle succeeded at ``when`` (the weekly flow calls this last)."""
    from tasks.registry import write_json_atomic

    path = _monitor_dir(home) / CYCLE_MARKER
    write_json_atomic(path, {"last_success": to_utc(when, "when").isoformat()})
    logger.info("weekly cycle success recorded at %s in %s", when.isoformat(), path)
    return path


def _aware(value: str, source: Path) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(
            f"{source}: expected an ISO 8601 time, found {value!r}; fix or delete the file"
        ) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def last_cycle_success(home: Path) -> datetime | None:
    """The latest of: the marker written by :func:`record_cycle_success`, and the newest
    ``created_at`` among the registry's versions (``home/models``). None when neither exists."""
    from tasks.registry import list_models

    candidates = []
    marker = _monitor_dir(home) / CYCLE_MARKER
    if marker.is_file():
        data = json.loads(marker.read_text(encoding="utf-8"))
        value = data.get("last_success") if isinstance(data, dict) else None
        if not isinstance(value, str):
            raise ValueError(
                f'{marker}: expected {{"last_success": "<ISO time>"}}, found {data!r}; '
                "fix or delete the file"
            )
        candidates.append(_aware(value, marker))
    for entry in list_models(home / "models"):
        if entry.created_at:
            candidates.append(_aware(entry.created_at, entry.path / "metadata.json"))
    return max(candidates) if candidates else None


def check_cycle(home: Path, *, now: datetime, max_age_days: float) -> Breach | None:
    """A ``stale_cycle`` breach when the weekly cycle's last success is older than allowed."""
    last = last_cycle_success(home)
    now = to_utc(now, "now")
    if last is None:
        return Breach(
            check="stale_cycle",
            scope=WEEKLY_CYCLE,
            value=float("inf"),
            threshold=max_age_days,
            sample=0,
            message="the weekly cycle has never succeeded "
            f"(no success marker and an empty registry under {home})",
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
    )


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
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    sent = data.get("sent") if isinstance(data, dict) else None
    if not isinstance(sent, dict):
        raise ValueError(
            f'{path}: expected {{"sent": {{...}}}}, found {data!r}; delete the file to reset'
        )
    return {str(k): str(v) for k, v in sent.items()}


def _save_state(path: Path, sent: dict[str, str], now: datetime) -> None:
    from tasks.registry import write_json_atomic

    horizon = now - timedelta(days=STATE_KEEP_DAYS)
    kept = {k: v for k, v in sent.items() if datetime.fromisoformat(v) >= horizon}
    write_json_atomic(path, {"sent": dict(sorted(kept.items()))})


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
    """Send each breach not yet notified in this window to every configured channel."""
    now = to_utc(now, "now")
    current_window = window_id(now, window)
    state_path = _monitor_dir(home) / STATE_FILE
    sent = _load_state(state_path)
    start, end = window_bounds(now, window)
    channels = [
        c
        for c in (webhook_url and "webhook", notification_block and f"block:{notification_block}")
        if c
    ]
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
        payload = slack_payload(pending, window_start=start, window_end=end)
        if channel == "webhook":
            assert webhook_url is not None
            delivery = send_webhook(
                webhook_url,
                payload,
                attempts=attempts,
                backoff_s=backoff_s,
                transport=transport,
                sleep=sleep,
            )
        else:
            assert notification_block is not None
            delivery = send_block(
                notification_block,
                payload["blocks"][0]["text"]["text"],
                payload["text"],
                attempts=attempts,
                backoff_s=backoff_s,
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


def breach_dict(breach: Breach) -> dict[str, Any]:
    """A JSON-safe dict of ``breach`` (an infinite value, "never succeeded", becomes None)."""
    data = asdict(breach)
    data["key"] = breach.key
    if not math.isfinite(breach.value):
        data["value"] = None
    return data
