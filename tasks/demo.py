"""The demo's steps (``flows.demo``): a fresh home with the demo dataset, the week of traffic,
the stand-in reviewer, the hot-reload wait, and the story told at the end.

The demo uses the configured database: ``PROMPT_CAPTURE_DATABASE_URL`` when it is set, else the
SQLite file of its (fresh) home, and says which. It writes made-up traffic and corrections, so
it refuses (:class:`DemoDatabaseError`, before anything is written) a configured database that
already holds prompts or training examples, or tables that are not Prompt Capture's.

The traffic, the reviewer and the accuracy scoring are the harness the simulator uses too
(``capture.traffic``, ``tasks.reviewer``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from capture.errors import UserError
from capture.settings import Settings
from capture.traffic import LabelledPrompt, OutcomeRule, TrafficResult, run_traffic, score_version
from tasks.corrections import ImportResult
from tasks.deploy import DeployResult
from tasks.layout import HomeLayout
from tasks.records import Record, write_records
from tasks.retrain import RetrainResult
from tasks.review_export import ReviewExport
from tasks.reviewer import fill_review_file, reviewed_name
from tasks.run_settings import configured_database_url, redacted
from tasks.weekly import WeeklyResult

logger = logging.getLogger(__name__)

DEMO_REVIEW_LIMIT = 300
DEMO_USERS = 25
DEMO_REVIEWER_NOTE = "demo reviewer: true label from the dataset"
WEEK = timedelta(days=7)
# The traffic is stamped across the week before now, starting this much inside it, so the
# review export's 7-day window still holds the first prompt minutes later.
WINDOW_MARGIN = timedelta(hours=1)
#: The tables whose rows are people's data: the demo never writes next to them.
DATA_TABLES = ("nlu_prompt_logs", "nlu_training_examples")


class DemoDatabaseError(UserError, RuntimeError):
    """The database the demo would use holds data; the message names it and the fix."""


@dataclass(frozen=True, slots=True)
class DemoSetup:
    """The demo's home (migrated SQLite database, base files written) and its data splits."""

    layout: HomeLayout
    database_url: str
    train: tuple[LabelledPrompt, ...]
    val: tuple[LabelledPrompt, ...]
    test: tuple[LabelledPrompt, ...]
    traffic: tuple[LabelledPrompt, ...]


def fresh_home(requested: Path, now: datetime | None = None) -> Path:
    """``requested`` when it holds no models and no database yet, else a new sub-directory
    ``demo-<UTC stamp>``."""
    in_use = (requested / "models").exists() or (requested / "prompt_capture.db").exists()
    if not in_use:
        return requested
    return requested / f"demo-{(now or datetime.now(UTC)).strftime('%Y%m%dT%H%M%S')}"


def demo_database(settings: Settings, layout: HomeLayout) -> str:
    """The database the demo uses: the configured one (``PROMPT_CAPTURE_DATABASE_URL``), else
    the SQLite file of the demo's home ``layout``."""
    return configured_database_url(settings) or layout.sqlite_url


def check_demo_database(url: str) -> None:
    """Refuse (:class:`DemoDatabaseError`) a database the demo must not write into: one whose
    :data:`DATA_TABLES` hold rows, or that holds tables but no Prompt Capture schema. A missing
    SQLite file, an empty database and a migrated empty one are fine. Reads only."""
    from sqlalchemy import func, inspect, select, table

    from capture import db

    path = db.sqlite_path(url)
    if path is not None and not path.exists():
        return
    shown = redacted(url)
    fix = (
        "the demo writes a week of made-up prompts and corrections, so it runs only on an "
        "empty database: point PROMPT_CAPTURE_DATABASE_URL at a new, empty database, or unset "
        "it to use a fresh SQLite file under PROMPT_CAPTURE_HOME"
    )
    engine = db.get_sync_engine(url)
    with engine.connect() as connection:
        names = set(inspect(connection).get_table_names())
        if names and "alembic_version" not in names:
            raise DemoDatabaseError(
                f"demo: the database {shown} holds {len(names)} table(s) ("
                f"{', '.join(sorted(names)[:5])}) and no Prompt Capture schema; {fix}"
            )
        counts = {
            name: int(
                connection.execute(select(func.count()).select_from(table(name))).scalar_one()
            )
            for name in DATA_TABLES
            if name in names
        }
    held = {name: n for name, n in counts.items() if n}
    if held:
        found = ", ".join(f"{n} rows in {name}" for name, n in held.items())
        raise DemoDatabaseError(f"demo: the database {shown} already holds data ({found}); {fix}")


@task(cache_policy=NO_CACHE, name="demo-setup")
def prepare_demo(requested_home: Path, *, seed: int, settings: Settings) -> DemoSetup:
    """A fresh home under ``requested_home`` (:func:`fresh_home`), the demo's database
    (:func:`demo_database`: the configured one, else the home's SQLite file) checked
    (:func:`check_demo_database`) and migrated, the demo dataset split (``seed``) and its
    train/val/test splits written as the home's base files; the traffic split is held back."""
    from capture import db
    from capture.demo_data import load_demo_dataset, split_demo_dataset

    layout = HomeLayout(fresh_home(requested_home.resolve()))
    if layout.home != requested_home.resolve():
        get_run_logger().warning(
            "PROMPT_CAPTURE_HOME=%s holds models or a database already: the demo runs in %s",
            requested_home,
            layout.home,
        )
    url = demo_database(settings, layout)
    check_demo_database(url)
    db.upgrade(url)
    layout.create_registry()  # the flows refuse a home without one (tasks.layout)
    splits = split_demo_dataset(load_demo_dataset(), seed=seed)
    parts = {
        kind: tuple(LabelledPrompt.of(rows))
        for kind, rows in (
            ("train", splits.train),
            ("val", splits.val),
            ("test", splits.test),
            ("traffic", splits.traffic),
        )
    }
    for kind in ("train", "val", "test"):
        write_records(layout.base_file(kind), [Record(p.text, p.label) for p in parts[kind]])
    get_run_logger().info(
        "1. setup: PROMPT_CAPTURE_HOME=%s, database %s migrated; demo dataset: train %d, "
        "val %d, test %d, traffic %d (held back)",
        layout.home,
        redacted(url),
        *(len(parts[k]) for k in ("train", "val", "test", "traffic")),
    )
    return DemoSetup(layout=layout, database_url=url, **parts)


def demo_hyperparameters(seed: int, steps: int) -> dict[str, Any]:
    """The demo's ``TrainConfig`` overrides: ``steps`` optimiser steps, small batches."""
    return {"seed": seed, "batch_size": 16, "min_steps": steps, "max_steps": steps}


@contextmanager
def hot_reloading_classifier(models_dir: Path) -> Iterator[Any]:
    """The serving classifier that follows ``models_dir/current`` (closed on exit)."""
    from capture.classifier import HotReloadingClassifier

    classifier = HotReloadingClassifier(models_dir)
    try:
        yield classifier
    finally:
        classifier.close()


@task(cache_policy=NO_CACHE, name="demo-accuracy")
def accuracy(classifier: Any, prompts: tuple[LabelledPrompt, ...]) -> tuple[float, str]:
    """Top-1 accuracy of the serving classifier on ``prompts`` and the version scored."""
    return score_version(classifier, prompts)


@task(cache_policy=NO_CACHE, name="demo-traffic")
def send_week_of_traffic(
    classifier: Any, prompts: tuple[LabelledPrompt, ...], *, settings: Settings, seed: int
) -> TrafficResult:
    """Send ``prompts`` through the NLU service (``settings``: the demo home and database),
    stamped across the week before now; a wrong intent makes the simulated workflow fail."""
    import random

    end = datetime.now(UTC)
    result = run_traffic(
        classifier,
        prompts,
        start=end - WEEK + WINDOW_MARGIN,
        end=end,
        users=DEMO_USERS,
        rng=random.Random(seed),
        outcome=OutcomeRule(
            fail_if_wrong=1.0,
            fail_if_right=0.0,
            error="simulated: the user wanted another workflow",
        ),
        url=settings.resolved_database_url,
        settings=settings,
    )
    get_run_logger().info(
        "3. traffic: %d prompts through the NLU service (model %s); %d workflows failed "
        "(wrong intent)",
        result.sent,
        result.model_version,
        result.failed,
    )
    return result


@task(cache_policy=NO_CACHE, name="demo-stand-in-reviewer")
def review_as_stand_in(review: Path, truth: dict[str, str], inbox: Path) -> Path:
    """Fill the review file with the true labels and drop it in ``inbox`` as
    ``reviewed-<stamp>.json``; returns the inbox file."""
    target = inbox / reviewed_name(review)
    fill_review_file(review, truth, target, note=DEMO_REVIEWER_NOTE)
    return target


@task(cache_policy=NO_CACHE, name="demo-wait-for-reload")
def wait_for_version(classifier: Any, version: str, timeout: float = 60.0) -> float:
    """Seconds until ``classifier.version`` becomes ``version`` (``TimeoutError`` after
    ``timeout`` seconds)."""
    started = time.monotonic()
    while str(classifier.version) != version:
        if time.monotonic() - started > timeout:
            raise TimeoutError(
                f"the classifier still serves {classifier.version} {timeout:.0f}s after "
                f"version {version} was deployed"
            )
        time.sleep(0.1)
    return time.monotonic() - started


@dataclass(frozen=True, slots=True)
class DemoResult:
    """Everything the demo did, stage by stage (:func:`demo_story` tells it)."""

    setup: DemoSetup
    first: RetrainResult
    first_deploy: DeployResult
    accuracy_before: float
    version_before: str
    traffic: TrafficResult
    review: ReviewExport
    imported: list[ImportResult]
    reimported: ImportResult
    cycle: WeeklyResult
    reloads: int
    accuracy_after: float
    version_after: str
    seconds: float

    @property
    def home(self) -> Path:
        return self.setup.layout.home

    @property
    def promoted(self) -> bool:
        return self.cycle.retrain.promote

    @property
    def card(self) -> Path:
        return self.cycle.retrain.card


def demo_story(result: DemoResult, *, retrain_steps: int, api_url: str | None) -> list[str]:
    """The demo's stages as lines of rich markup, then where things are, ending with the
    accuracy before and after. ``api_url`` is the Prefect API the flows ran against (None:
    ephemeral mode)."""
    from tasks.registry import list_models

    s, export = result.setup, result.first_deploy.export
    data, retrain = result.cycle.training_data, result.cycle.retrain
    lines = [
        f"[bold]1. setup[/bold]: PROMPT_CAPTURE_HOME={s.layout.home}; database "
        f"{redacted(s.database_url)}",
        f"   demo dataset: train {len(s.train)}, val {len(s.val)}, test {len(s.test)}, "
        f"traffic {len(s.traffic)} (held back)",
        f"[bold]2. first model[/bold]: version {result.first.version} deployed"
        + (
            f" ({export.published} ONNX, agreement with torch {export.agreement:.1%})"
            if export is not None
            else ""
        ),
        f"[bold]3. traffic[/bold]: {result.traffic.sent} prompts through the NLU service "
        f"(model {result.version_before}); {result.traffic.failed} workflows failed "
        "(wrong intent)",
        f"[bold]4. review[/bold]: {result.review.n_selected} of {result.review.n_candidates} "
        f"candidates exported to {result.review.path} ({result.review.reasons})",
    ]
    for item in result.imported:
        lines.append(
            f"   imported {Path(item.file).name}: applied {item.applied}, unchanged "
            f"{item.unchanged}, rejected {len(item.rejected)}"
        )
    lines += [
        f"   re-import of the same file: applied {result.reimported.applied}, unchanged "
        f"{result.reimported.unchanged} (idempotent)",
        f"[bold]5. weekly cycle[/bold]: training data, pairs, retrain ({retrain_steps} steps, "
        "warm start), gate, ONNX export, deploy",
        f"   training data: {data.n_train} rows {data.counts}; {data.n_holdout} corrected "
        "prompts held out",
        f"   gate: [bold]{retrain.decision.verdict}[/bold]",
        *(f"     - {reason}" for reason in retrain.decision.reasons),
    ]
    if result.cycle.deployed is not None:
        lines.append(
            f"[bold]6. hot reload[/bold]: the running classifier switched from "
            f"{result.version_before} to {result.version_after} without a restart "
            f"(reloads: {result.reloads})"
        )
    else:
        lines.append(f"[bold]6. no deploy[/bold]: version {result.version_before} keeps serving")
    layout = s.layout
    lines.append(f"\ngate decision: {retrain.decision.verdict}; model card: {retrain.card}")
    lines.append(f"registry: {layout.models_dir}")
    for entry in list_models(layout.models_dir):
        lines.append(
            f"  version {entry.version}: gate {entry.gate or '-'}"
            f"{', serving' if entry.serving else ''} — {entry.path}"
        )
    lines.append(
        f"exports: {layout.exports_dir}; inbox: {layout.inbox_dir}; database: "
        f"{redacted(s.database_url)}\nsee them with: PROMPT_CAPTURE_HOME={layout.home} "
        "prompt-capture models"
    )
    if api_url:
        lines.append(
            f"the demo flow run, the model card and review artifacts are in the UI ({api_url})"
        )
    else:
        lines.append(
            "the demo ran as one flow in Prefect's ephemeral mode; to see it in the UI run "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    lines.append(f"demo finished in {result.seconds:.0f}s")
    lines.append(
        f"[bold]accuracy on the test split[/bold] ({len(s.test)} prompts neither model "
        f"trained on): before {result.accuracy_before:.2%} (version {result.version_before}), "
        f"after {result.accuracy_after:.2%} (version {result.version_after}), change "
        f"{result.accuracy_after - result.accuracy_before:+.2%}"
    )
    return lines
