"""The monitoring report's figures: what the HTML page, the markdown artifact and the headline
numbers show, collected once (:func:`collect_report_data`), and how a number is written.

Over the last ``days`` days, ending now (``now - days < created_at <= now``: a row dated in the
future, e.g. by a client with a wrong clock, is not counted):

- confidence histogram (``capture.statements.select_confidence_distribution``),
- intent distribution with corrections per intent (``select_intent_distribution``),
- workflow success rate by intent (``select_success_rate_by_intent``),
- per UTC day: prompts, low-confidence prompts, corrections, outcomes, failures
  (``capture.offline_statements.select_daily_counts``); the window's totals are their sum,
- model versions with their evaluation accuracy (the registry under ``models_dir``),
- the A/B tests of a candidate that ran during the window (``history.jsonl``), each read by
  :func:`tasks.ab_readout.readout_of` over its own time under test (the one readout the
  ab-check flow and ``prompt-capture ab`` use), newest first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from capture import statements
from capture.db import database_url, get_sync_engine
from capture.offline_statements import (
    DailyCounts,
    WindowCounts,
    check_fraction,
    select_daily_counts,
    window_start,
)
from capture.rows import (
    ConfidenceBucket,
    IntentStats,
    IntentSuccessRate,
    map_confidence_bucket,
    map_intent_stats,
    map_success_rate,
)
from capture.values import to_utc, utc_now
from tasks.ab_readout import ABReadout, ab_tests, readout_of

logger = logging.getLogger(__name__)

DEFAULT_DAYS = 30


@dataclass(frozen=True, slots=True)
class ModelPoint:
    """One registry version: when it was trained and how it evaluated."""

    version: str
    created_at: datetime | None
    accuracy: float | None
    macro_f1: float | None
    serving: bool
    gate: str | None


@dataclass(frozen=True, slots=True)
class ReportData:
    """Everything the report shows; ``overall`` is the window's counts (the sum of ``daily``)."""

    generated_at: datetime
    since: datetime
    days: float
    low_confidence_threshold: float
    confidence: list[ConfidenceBucket]
    intents: list[IntentStats]
    success: list[IntentSuccessRate]
    daily: list[DailyCounts]
    models: list[ModelPoint] = field(default_factory=list)
    #: Readouts of the A/B tests that overlap the window, newest first (empty: none ran).
    ab: list[ABReadout] = field(default_factory=list)

    @property
    def overall(self) -> WindowCounts:
        return WindowCounts.sum(self.daily)

    @property
    def total(self) -> int:
        """Prompts logged in the window."""
        return self.overall.total

    @property
    def serving_version(self) -> str | None:
        return next((m.version for m in self.models if m.serving), None)


# --------------------------------------------------------------------------- how numbers read


def share_text(hits: int, total: int) -> str:
    """``hits / total`` as a percentage with one decimal, rounded half up exactly (the design
    note's ``ROUND(100.0 * hits / total, 1)``); "–" when ``total`` is 0."""
    if total == 0:
        return "–"
    tenths = (2000 * hits + total) // (2 * total)
    return f"{tenths // 10}.{tenths % 10}%"


def percent_text(value: float | None) -> str:
    """A fraction as a percentage with one decimal ("84.2%"); "–" for None."""
    return "–" if value is None else f"{100 * value:.1f}%"


def number_text(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals; "–" for None."""
    return "–" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------- model registry


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        logger.warning("registry: created_at %r is not an ISO 8601 time; plotted without it", value)
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _first_number(
    sources: Sequence[dict[str, Any]], paths: Sequence[tuple[str, ...]]
) -> float | None:
    for source in sources:
        for path in paths:
            value: Any = source
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
    return None


_ACCURACY_PATHS = (
    ("evaluation", "all", "challenger", "accuracy"),
    ("evaluation", "base test", "challenger", "accuracy"),
    ("accuracy",),
    ("val_accuracy",),
    ("test_accuracy",),
)
_MACRO_F1_PATHS = (
    ("evaluation", "all", "challenger", "macro_f1"),
    ("evaluation", "base test", "challenger", "macro_f1"),
    ("macro_f1",),
)


def model_history(models_dir: Path) -> list[ModelPoint]:
    """Every registry version with its creation time and evaluation accuracy, oldest first.

    Accuracy is read from metrics.json (the weekly cycle's evaluation) and falls back to the
    ``metrics`` of metadata.json (the training run's own evaluation), both as
    ``tasks.registry.list_models`` reads them.
    """
    from tasks.registry import list_models

    points = []
    for entry in list_models(models_dir):
        metadata_metrics = dict(entry.metadata.metrics) if entry.metadata is not None else {}
        sources = [entry.metrics, metadata_metrics]
        points.append(
            ModelPoint(
                version=entry.version,
                created_at=_parse_time(entry.created_at),
                accuracy=_first_number(sources, _ACCURACY_PATHS),
                macro_f1=_first_number(sources, _MACRO_F1_PATHS),
                serving=entry.serving,
                gate=entry.gate,
            )
        )
    return points


# --------------------------------------------------------------------------- collection


def collect_report_data(
    url: str | None = None,
    *,
    days: float = DEFAULT_DAYS,
    low_confidence_threshold: float | None = None,
    models_dir: Path | None = None,
    now: datetime | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> ReportData:
    """Run the monitoring queries over the last ``days`` days, ending at ``now``, and read the
    registry.

    ``low_confidence_threshold`` and ``models_dir`` default to the settings'. Raises
    ``capture.offline_statements.ParameterError`` (a ``UserError``) for ``days`` outside
    (0, 36500] or a threshold outside [0, 1], before touching the database.
    """
    from capture.settings import get_settings

    settings = get_settings()
    threshold = check_fraction(
        settings.review_confidence_threshold
        if low_confidence_threshold is None
        else low_confidence_threshold,
        "low_confidence_threshold",
    )
    generated_at = to_utc(now if now is not None else clock(), "now")
    since = window_start(generated_at, days)
    assert since is not None
    until = generated_at  # the window ends now: rows dated in the future are not counted
    registry = models_dir if models_dir is not None else settings.models_dir
    with Session(get_sync_engine(database_url(url))) as session:
        confidence = [
            map_confidence_bucket(r)
            for r in session.execute(
                statements.select_confidence_distribution(since=since, until=until)
            )
        ]
        intents = [
            map_intent_stats(r)
            for r in session.execute(
                statements.select_intent_distribution(since=since, until=until)
            )
        ]
        success = [
            map_success_rate(r)
            for r in session.execute(
                statements.select_success_rate_by_intent(since=since, until=until)
            )
        ]
        daily = [
            DailyCounts.from_row(r)
            for r in session.execute(
                select_daily_counts(since=since, until=until, low_confidence_threshold=threshold)
            )
        ]
    return ReportData(
        generated_at=generated_at,
        since=since,
        days=days,
        low_confidence_threshold=threshold,
        confidence=confidence,
        intents=intents,
        success=success,
        daily=daily,
        models=model_history(registry),
        ab=ab_in_window(url, registry, since=since, until=until),
    )


def ab_in_window(
    url: str | None, models_dir: Path, *, since: datetime, until: datetime
) -> list[ABReadout]:
    """Readouts of the A/B tests in the registry's history that ran at some moment of
    ``[since, until]``, newest first; a running test is read up to now, with the decision the
    ab-check would take at ``until``."""
    tests = [t for t in ab_tests(models_dir) if t.overlaps(since, until)]
    return [readout_of(url, test, now=until) for test in reversed(tests)]
