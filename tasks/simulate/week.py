"""One simulated week's steps: traffic through the real NLU service, the review export with the
run's strategy and the stand-in reviewer, and scoring the serving model on the test split.

The simulated clock puts week ``w`` at ``start + w × 7 days``, so the production windows
(``days=7`` review export) behave as they would in a real deployment.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from capture.traffic import OutcomeRule, TrafficResult, run_traffic, score_version
from tasks.records import Record
from tasks.review_export import ReviewSelection, export_review
from tasks.reviewer import fill_review_file
from tasks.serving import serving_classifier
from tasks.simulate.data import SimulationError
from tasks.simulate.results import WeekResult
from tasks.simulate.space import LoopSettings, RunSpace

if TYPE_CHECKING:
    from capture.classifier import OnnxClassifier
    from tasks.weekly import WeeklyResult

logger = logging.getLogger(__name__)

WEEK = timedelta(weeks=1)


def simulation_start(weeks: int, now: datetime | None = None) -> datetime:
    """Week 1 begins ``weeks`` weeks before ``now`` (so the last simulated week ends now)."""
    now = now or datetime.now(UTC)
    return now.replace(minute=0, second=0, microsecond=0) - timedelta(weeks=weeks, hours=1)


def week_end(start: datetime, week: int) -> datetime:
    return start + WEEK * week


def require_serving(space: RunSpace) -> OnnxClassifier:
    """The ONNX classifier the run's registry serves (:class:`SimulationError` when none)."""
    classifier = serving_classifier(space.models_dir)
    if classifier is None:
        raise SimulationError(f"run {space.name}: no model is deployed in {space.models_dir}")
    return classifier


def send_week(
    space: RunSpace,
    records: Sequence[Record],
    *,
    start: datetime,
    week: int,
    seed: int,
    loop: LoopSettings,
) -> TrafficResult:
    """Send one week of prompts through the real NLU service (capture logger, serving ONNX
    classifier) into the run's database, with simulated workflow outcomes, stamped across the
    simulated week; returns when everything is committed."""
    classifier = require_serving(space)
    begin = start + WEEK * (week - 1)
    return run_traffic(
        classifier,
        records,
        start=begin,
        end=begin + WEEK,  # the prompts are stamped strictly inside the week
        users=loop.users,
        rng=random.Random(f"{seed}-{week}-users"),
        outcome=OutcomeRule(
            fail_if_wrong=loop.fail_if_wrong,
            fail_if_right=loop.fail_if_right,
            seed=seed * 1000 + week,
        ),
        url=space.database_url,
        settings=space.settings,
    )


@dataclass(frozen=True, slots=True)
class ReviewResult:
    """This week's review: what the export picked and what the stand-in reviewer returned."""

    selected: int
    candidates: int
    errors_found: int  # selected prompts whose prediction was wrong
    review_file: Path
    corrections_file: Path


def review_week(
    space: RunSpace,
    traffic: TrafficResult,
    *,
    strategy: str,
    start: datetime,
    week: int,
    seed: int,
    loop: LoopSettings,
) -> ReviewResult:
    """The production review export (``tasks.review_export``) with ``strategy``, at the end of
    the simulated week; the stand-in reviewer's file goes to the inbox the weekly cycle drains."""
    classifier = require_serving(space)
    layout = space.layout
    selection = ReviewSelection(
        days=loop.review_days,
        confidence_threshold=loop.review_confidence_threshold,
        margin_threshold=loop.review_margin_threshold,
        limit=loop.review_budget,
        strategy=strategy,
        seed=seed * 1000 + week,
    )
    export = export_review(
        layout.exports_dir / f"review-week-{week:02d}.json",
        selection,
        url=space.database_url,
        embed=classifier.embed,
        now=week_end(start, week),
    )
    corrections = layout.inbox_dir / f"corrections-week-{week:02d}.json"
    fill_review_file(export.path, traffic.truth, corrections)
    errors = sum(
        traffic.predicted.get(str(c.id)) != traffic.truth.get(str(c.id)) for c in export.selected
    )
    return ReviewResult(
        selected=export.n_selected,
        candidates=export.n_candidates,
        errors_found=errors,
        review_file=export.path,
        corrections_file=corrections,
    )


def evaluate_serving(space: RunSpace, test: Sequence[Record]) -> tuple[float, str]:
    """Accuracy of the serving ONNX model on ``test`` and its version."""
    return score_version(require_serving(space), test)


def initial_row(
    strategy: str, seed: int, accuracy: float, version: str, seed_labels: int
) -> WeekResult:
    """Week 0 of a run: the first model, before any traffic."""
    return WeekResult(
        strategy=strategy,
        seed=seed,
        week=0,
        accuracy=accuracy,
        reviewed=0,
        errors_found=0,
        labels_used=seed_labels,
        traffic_accuracy=None,
        candidates=None,
        training_rows=seed_labels,
        gate="initial",
        model_version=version,
        week_seconds=0.0,
    )


def week_row(
    previous: WeekResult,
    *,
    traffic: TrafficResult,
    review: ReviewResult,
    cycle: WeeklyResult,
    accuracy: float,
    version: str,
    seconds: float,
) -> WeekResult:
    """The row of the week after ``previous``: cumulative reviews and errors found, this
    week's live accuracy, candidates, training rows and the gate's verdict."""
    reviewed = previous.reviewed + review.selected
    return WeekResult(
        strategy=previous.strategy,
        seed=previous.seed,
        week=previous.week + 1,
        accuracy=accuracy,
        reviewed=reviewed,
        errors_found=previous.errors_found + review.errors_found,
        labels_used=previous.labels_used + review.selected,
        traffic_accuracy=traffic.accuracy,
        candidates=review.candidates,
        training_rows=cycle.training_data.n_train,
        gate="promoted" if cycle.retrain.promote else "rejected",
        model_version=version,
        week_seconds=seconds,
    )


send_traffic_task = task(name="simulate-traffic", cache_policy=NO_CACHE)(send_week)
review_week_task = task(name="simulate-review", cache_policy=NO_CACHE)(review_week)
evaluate_task = task(name="simulate-evaluate", cache_policy=NO_CACHE)(evaluate_serving)
