"""The learning-loop simulator: does the weekly loop learn, and how fast per reviewed prompt?

One *run* is one review strategy with one seed, in its own ``PROMPT_CAPTURE_HOME`` and database:

1. a first model is trained on ``initial_per_intent`` examples per intent of the train split (the
   *seed set*, also the base training set of every retrain), exported to ONNX and deployed;
2. every simulated week, ``traffic_per_week`` prompts of the train split not used before flow
   through the real NLU service (capture logger, serving ONNX classifier) into the database,
   each with a simulated workflow outcome; the real review export picks ``review_budget`` of
   them with the run's strategy; a stand-in reviewer fills ``corrected_intent`` from the true
   label; the real corrections import and the real weekly cycle (training data export, retrain,
   gate, ONNX export, deploy) run;
3. after each week the serving model is scored on the test split, which never enters training.

The simulated clock puts week ``w`` at ``start + w × 7 days``, so the production windows
(``--days 7`` review export) behave as they would in a real deployment.

Outputs (:func:`write_outputs`): ``simulation.csv`` (one row per run and week), ``simulation.png``
(test accuracy against prompts reviewed, mean over seeds per strategy) and a text table.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.records import Record, load_records
from tasks.review_select import STRATEGIES

logger = logging.getLogger(__name__)

REVIEWER_NOTE = "simulated reviewer (true label)"
ALL_LABELS = "all-labels"


class SimulationError(ValueError):
    """The simulation cannot run as configured; the message names the setting and the fix."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class SimulationData:
    """The labelled splits: ``train`` feeds the seed set and the traffic, ``test`` only scores."""

    train: tuple[Record, ...]
    test: tuple[Record, ...]
    labels: tuple[str, ...]


def load_simulation_data(
    directory: Path,
    *,
    exclude_labels: Sequence[str] = ("oos",),
    max_intents: int | None = None,
) -> SimulationData:
    """Read ``directory/train.jsonl`` and ``directory/test.jsonl`` (``{"text", "label"}``).

    Rows labelled with one of ``exclude_labels`` are dropped (CLINC150's ``oos``);
    ``max_intents`` keeps the first N intents in sorted order (for quick runs). Test rows whose
    label never occurs in train cannot be learnt and are dropped with a warning.
    """
    paths = {name: directory / f"{name}.jsonl" for name in ("train", "test")}
    for name, path in paths.items():
        if not path.is_file():
            raise SimulationError(
                f"--dataset {directory}: expected {path.name} ({{'text', 'label'}} JSONL, the "
                f"{name} split) in it, found no such file"
            )
    excluded = set(exclude_labels)
    train = [r for r in load_records(paths["train"]) if r.label not in excluded]
    test = [r for r in load_records(paths["test"], min_labels=1) if r.label not in excluded]
    labels = sorted({r.label for r in train})
    if max_intents is not None:
        if max_intents < 2:
            raise SimulationError(f"max_intents: expected at least 2, found {max_intents}")
        labels = labels[:max_intents]
    keep = set(labels)
    train = [r for r in train if r.label in keep]
    unknown = [r for r in test if r.label not in keep]
    test = [r for r in test if r.label in keep]
    if len(labels) < 2:
        raise SimulationError(
            f"{paths['train']}: expected at least 2 intents after excluding "
            f"{sorted(excluded)}, found {labels}"
        )
    if unknown and max_intents is None:
        logger.warning(
            "%s: dropped %d test rows whose label is not in train (%s)",
            paths["test"],
            len(unknown),
            ", ".join(sorted({r.label for r in unknown})[:10]),
        )
    if not test:
        raise SimulationError(f"{paths['test']}: no test rows left for the intents of train")
    return SimulationData(train=tuple(train), test=tuple(test), labels=tuple(labels))


@dataclass(frozen=True, slots=True)
class TrafficPlan:
    """What one seed sees: the seed set (the first model's training data and the base set of
    every retrain), the gate set (the base test set the promotion gate scores on; never
    trained on) and the prompts of each simulated week."""

    seed_set: tuple[Record, ...]
    gate_set: tuple[Record, ...]
    weeks: tuple[tuple[Record, ...], ...]


def plan_traffic(
    data: SimulationData,
    *,
    seed: int,
    initial_per_intent: int,
    traffic_per_week: int,
    weeks: int,
    gate_per_intent: int = 3,
) -> TrafficPlan:
    """Draw the gate set (``gate_per_intent`` per intent), the seed set (``initial_per_intent``
    per intent) and the weekly traffic (the rest of train, shuffled, never repeated). The same
    seed gives the same plan for every strategy."""
    if initial_per_intent < 1:
        raise SimulationError(
            f"--initial-per-intent: expected at least 1, found {initial_per_intent}"
        )
    if gate_per_intent < 1:
        raise SimulationError(
            f"gate_per_intent: expected at least 1 (the gate needs labelled data), found "
            f"{gate_per_intent}"
        )
    if weeks < 1 or traffic_per_week < 1:
        raise SimulationError(
            f"--weeks and --traffic-per-week: expected at least 1, found {weeks} and "
            f"{traffic_per_week}"
        )
    rng = random.Random(seed)
    by_label: dict[str, list[Record]] = defaultdict(list)
    for record in data.train:
        by_label[record.label].append(record)
    seed_set: list[Record] = []
    gate_set: list[Record] = []
    rest: list[Record] = []
    for label in data.labels:
        rows = list(by_label[label])
        rng.shuffle(rows)
        if len(rows) < 3:
            raise SimulationError(
                f"intent {label!r} has {len(rows)} train examples; the simulator needs at least "
                "3 per intent (gate, seed and traffic); drop the intent from the dataset"
            )
        # Keep at least one prompt of every intent for the seed set and for the traffic.
        gate = min(gate_per_intent, len(rows) - 2)
        take = min(initial_per_intent, len(rows) - gate - 1)
        gate_set.extend(rows[:gate])
        seed_set.extend(rows[gate : gate + take])
        rest.extend(rows[gate + take :])
    rng.shuffle(rest)
    needed = weeks * traffic_per_week
    if len(rest) < needed:
        raise SimulationError(
            f"the train split has {len(rest)} prompts left after the seed set, but {weeks} weeks "
            f"of {traffic_per_week} need {needed}; lower --traffic-per-week or --weeks"
        )
    chunks = tuple(
        tuple(rest[w * traffic_per_week : (w + 1) * traffic_per_week]) for w in range(weeks)
    )
    return TrafficPlan(seed_set=tuple(seed_set), gate_set=tuple(gate_set), weeks=chunks)


def workflow_outcomes(
    correct: Sequence[bool], *, seed: int, fail_if_wrong: float, fail_if_right: float
) -> list[bool]:
    """Simulated workflow success per prompt: a misrouted prompt fails with probability
    ``fail_if_wrong``, a correctly routed one with ``fail_if_right`` (flaky downstream)."""
    rng = random.Random(seed)
    return [rng.random() >= (fail_if_right if ok else fail_if_wrong) for ok in correct]


# --------------------------------------------------------------------------- reviewer


def fill_review_file(
    review_path: Path, truth: Mapping[str, str], output: Path, *, note: str = REVIEWER_NOTE
) -> int:
    """The stand-in reviewer: copy the review file to ``output`` with ``corrected_intent`` set to
    the true label of every row (confirming or correcting the prediction). Returns the rows."""
    rows = json.loads(review_path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise SimulationError(
            f"{review_path}: expected the review export's JSON list, found {type(rows).__name__}"
        )
    for number, row in enumerate(rows, start=1):
        log_id = str(row.get("id"))
        if log_id not in truth:
            raise SimulationError(
                f"{review_path}: row {number}: id {log_id} is not a prompt this simulation sent"
            )
        row["corrected_intent"] = truth[log_id]
        row["notes"] = note
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, output)
    return len(rows)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class WeekResult:
    """One row of ``simulation.csv``. Week 0 is the first model, before any traffic."""

    strategy: str
    seed: int
    week: int
    accuracy: float
    reviewed: int  # prompts reviewed so far (cumulative)
    errors_found: int  # of those, how many the model had predicted wrong (cumulative)
    labels_used: int  # seed set + reviewed so far
    traffic_accuracy: float | None  # accuracy of the live predictions this week
    candidates: int | None  # review candidates this week
    training_rows: int | None  # rows of this week's training data export
    gate: str  # initial / promoted / rejected / reference
    model_version: str
    week_seconds: float


CSV_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(WeekResult))


def write_csv(rows: Iterable[WeekResult], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(row).items()}
            )
    os.replace(tmp, path)
    return path


def read_csv(path: Path) -> list[WeekResult]:
    """Read back a ``simulation.csv`` (e.g. to re-plot or merge runs)."""
    out = []
    with path.open(encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            out.append(
                WeekResult(
                    strategy=raw["strategy"],
                    seed=int(raw["seed"]),
                    week=int(raw["week"]),
                    accuracy=float(raw["accuracy"]),
                    reviewed=int(raw["reviewed"]),
                    errors_found=int(raw["errors_found"]),
                    labels_used=int(raw["labels_used"]),
                    traffic_accuracy=_opt_float(raw["traffic_accuracy"]),
                    candidates=_opt_int(raw["candidates"]),
                    training_rows=_opt_int(raw["training_rows"]),
                    gate=raw["gate"],
                    model_version=raw["model_version"],
                    week_seconds=float(raw["week_seconds"]),
                )
            )
    return out


def _opt_float(value: str) -> float | None:
    return float(value) if value not in ("", "None") else None


def _opt_int(value: str) -> int | None:
    return int(value) if value not in ("", "None") else None


@dataclass(frozen=True, slots=True)
class StrategySummary:
    """Mean (and spread) over seeds of one strategy at one week."""

    strategy: str
    week: int
    seeds: int
    accuracy: float
    accuracy_min: float
    accuracy_max: float
    reviewed: float
    labels_used: float
    promoted: int
    week_seconds: float


def summarise(rows: Iterable[WeekResult]) -> list[StrategySummary]:
    """Per strategy and week, the mean over seeds (reference rows excluded)."""
    groups: dict[tuple[str, int], list[WeekResult]] = defaultdict(list)
    for row in rows:
        if row.strategy != ALL_LABELS:
            groups[(row.strategy, row.week)].append(row)
    out = []
    for (strategy, week), group in sorted(groups.items()):
        accuracies = [r.accuracy for r in group]
        out.append(
            StrategySummary(
                strategy=strategy,
                week=week,
                seeds=len(group),
                accuracy=sum(accuracies) / len(group),
                accuracy_min=min(accuracies),
                accuracy_max=max(accuracies),
                reviewed=sum(r.reviewed for r in group) / len(group),
                labels_used=sum(r.labels_used for r in group) / len(group),
                promoted=sum(r.gate == "promoted" for r in group),
                week_seconds=sum(r.week_seconds for r in group) / len(group),
            )
        )
    return out


def best_strategy(rows: Iterable[WeekResult]) -> str | None:
    """The strategy with the highest mean accuracy at the last week (None without results)."""
    summary = summarise(rows)
    if not summary:
        return None
    last = max(s.week for s in summary)
    final = [s for s in summary if s.week == last]
    return max(final, key=lambda s: s.accuracy).strategy


def format_table(rows: Sequence[WeekResult]) -> str:
    """A plain-text table of the mean over seeds per strategy and week (+ the reference)."""
    summary = summarise(rows)
    header = (
        f"{'strategy':<13} {'week':>4} {'seeds':>5} {'accuracy':>9} {'min':>7} {'max':>7} "
        f"{'reviewed':>8} {'labels':>7} {'promoted':>8} {'week s':>7}"
    )
    lines = [header, "-" * len(header)]
    for s in summary:
        lines.append(
            f"{s.strategy:<13} {s.week:>4} {s.seeds:>5} {100 * s.accuracy:>8.2f}% "
            f"{100 * s.accuracy_min:>6.2f}% {100 * s.accuracy_max:>6.2f}% {s.reviewed:>8.0f} "
            f"{s.labels_used:>7.0f} {s.promoted:>8} {s.week_seconds:>7.1f}"
        )
    for r in rows:
        if r.strategy == ALL_LABELS:
            lines.append(
                f"{ALL_LABELS:<13} {'-':>4} {'1':>5} {100 * r.accuracy:>8.2f}% {'':>7} {'':>7} "
                f"{'-':>8} {r.labels_used:>7} {'-':>8} {r.week_seconds:>7.1f}"
            )
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[WeekResult], path: Path) -> Path:
    """PNG: test accuracy against prompts reviewed, one line per strategy (mean over seeds, band
    from min to max), the all-labels model as a dashed line when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for strategy in sorted({s.strategy for s in summary}):
        points = [s for s in summary if s.strategy == strategy]
        x = [s.reviewed for s in points]
        ax.plot(x, [100 * s.accuracy for s in points], marker="o", label=strategy)
        if any(s.seeds > 1 for s in points):
            ax.fill_between(
                x,
                [100 * s.accuracy_min for s in points],
                [100 * s.accuracy_max for s in points],
                alpha=0.15,
            )
    for r in rows:
        if r.strategy == ALL_LABELS:
            ax.axhline(
                100 * r.accuracy,
                linestyle="--",
                color="grey",
                label=f"all {r.labels_used} labels",
            )
    ax.set_xlabel("prompts reviewed (cumulative)")
    ax.set_ylabel("test accuracy (%)")
    seeds = max((s.seeds for s in summary), default=0)
    ax.set_title(f"Learning loop: accuracy per reviewed prompt (mean of {seeds} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass(frozen=True, slots=True)
class SimulationOutputs:
    csv: Path
    png: Path
    table: str
    best: str | None


def write_outputs(rows: Sequence[WeekResult], output: Path) -> SimulationOutputs:
    """Write ``simulation.csv`` and ``simulation.png`` under ``output``; return them + the table."""
    csv_path = write_csv(rows, output / "simulation.csv")
    png_path = plot_accuracy(rows, output / "simulation.png")
    return SimulationOutputs(
        csv=csv_path, png=png_path, table=format_table(rows), best=best_strategy(rows)
    )


def check_strategies(strategies: Iterable[str]) -> tuple[str, ...]:
    """Expand ``all`` and validate names; a clear error lists the valid ones."""
    out: list[str] = []
    for name in strategies:
        names = STRATEGIES if name == "all" else (name,)
        for item in names:
            if item not in STRATEGIES:
                raise SimulationError(
                    f"--strategy: expected one of {', '.join(STRATEGIES)} or all, found {item!r}"
                )
            if item not in out:
                out.append(item)
    if not out:
        raise SimulationError("--strategy: give at least one strategy (or all)")
    return tuple(out)


@contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the block and restore them after;
    the cached settings are re-read on entry and exit."""
    from capture.settings import get_settings

    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


# --------------------------------------------------------------------------- one run's space


@dataclass(frozen=True, slots=True)
class LoopSettings:
    """How each simulated week runs (everything but the strategy and the seed).

    ``review_confidence_threshold`` 1.0 and ``review_margin_threshold`` above 1 make every prompt
    of the week a review candidate, so the strategy alone decides what the budget is spent on
    (production's defaults are 0.7 and 0.15: only uncertain or failed prompts are candidates).
    ``hyperparameters`` are ``TrainConfig`` overrides for every training (first model and
    retrains); ``max_pairs``, ``holdout_fraction``, ``min_confidence``, ``quantize`` and the gate
    rules are the weekly cycle's parameters.
    """

    weeks: int = 4
    review_budget: int = 300
    initial_per_intent: int = 5
    traffic_per_week: int = 3000
    gate_per_intent: int = 3
    review_days: int = 7
    review_confidence_threshold: float = 1.0
    review_margin_threshold: float = 1.01
    fail_if_wrong: float = 0.5
    fail_if_right: float = 0.05
    users: int = 200
    hyperparameters: Mapping[str, Any] | None = None
    max_pairs: int = 2000
    holdout_fraction: float = 0.2
    min_confidence: float = 0.9
    max_overall_drop: float = 0.0
    max_intent_drop: float = 0.05
    min_support: int = 10
    quantize: bool = True

    def __post_init__(self) -> None:
        for name in ("weeks", "traffic_per_week", "initial_per_intent", "gate_per_intent"):
            if getattr(self, name) < 1:
                raise SimulationError(f"{name}: expected at least 1, found {getattr(self, name)}")
        if self.review_budget < 0:
            raise SimulationError(f"review_budget: expected >= 0, found {self.review_budget}")
        for name in ("fail_if_wrong", "fail_if_right", "review_confidence_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SimulationError(f"{name}: expected a number in [0, 1], found {value!r}")

    def weekly_cycle_parameters(self, database_url: str) -> dict[str, Any]:
        """Keyword arguments of ``flows.weekly.weekly_cycle`` for this simulation."""
        return {
            "days": None,
            "min_confidence": self.min_confidence,
            "holdout_fraction": self.holdout_fraction,
            "import_inbox": True,
            "max_pairs": self.max_pairs,
            "warm_start": True,
            "hyperparameters": dict(self.hyperparameters or {}),
            "max_overall_drop": self.max_overall_drop,
            "max_intent_drop": self.max_intent_drop,
            "min_support": self.min_support,
            "deploy": True,
            "quantize": self.quantize,
            "database_url": database_url,
        }


@dataclass(frozen=True, slots=True)
class RunSpace:
    """One run's isolated ``PROMPT_CAPTURE_HOME`` and database."""

    name: str
    home: Path
    database_url: str
    own_database: bool  # a PostgreSQL database created for this run (dropped by release_space)

    def env(self) -> dict[str, str | None]:
        return {
            "PROMPT_CAPTURE_HOME": str(self.home),
            "PROMPT_CAPTURE_DATABASE_URL": self.database_url,
        }

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower())


def prepare_space(root: Path, name: str, *, server_url: str | None = None) -> RunSpace:
    """A fresh home under ``root/name`` and a migrated database: an SQLite file in the home, or,
    when ``server_url`` is a PostgreSQL URL, a new database on that server."""
    import shutil

    from capture import db

    home = root / name / "home"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    own = False
    if server_url and db.is_postgres(db.database_url(server_url)):
        url = _create_pg_database(db.database_url(server_url), f"pc_sim_{_safe_name(name)}")
        own = True
    else:
        url = f"sqlite:///{(home / 'prompt_capture.db').resolve()}"
    db.upgrade(url)
    logger.info("run %s: home %s, database %s", name, home, url.rsplit("@", 1)[-1])
    return RunSpace(name=name, home=home.resolve(), database_url=url, own_database=own)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _create_pg_database(server_url: str, prefix: str) -> str:
    import uuid

    import psycopg

    name = f"{prefix[:40]}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(server_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


def release_space(space: RunSpace, *, server_url: str | None = None) -> None:
    """Close the run's engines and drop its PostgreSQL database (files stay for inspection)."""
    import asyncio

    from capture import db

    db.get_sync_engine(space.database_url).dispose()
    asyncio.run(db.get_engine(space.database_url).dispose())
    if space.own_database and server_url:
        import psycopg

        name = space.database_url.rpartition("/")[2]
        with psycopg.connect(_libpq(db.database_url(server_url)), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_base_files(space: RunSpace, plan: TrafficPlan) -> None:
    """The weekly cycle's base data (``home/data``): the seed set is ``base_train``; the gate
    set is ``base_test`` (what the gate scores) and ``base_val`` (calibration and the ONNX
    parity texts)."""
    from flows.common import BASE_FILES
    from tasks.records import write_records

    data = space.home / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_records(data / BASE_FILES["train"], plan.seed_set)
    write_records(data / BASE_FILES["val"], plan.gate_set)
    write_records(data / BASE_FILES["test"], plan.gate_set)


def clone_registry(source: RunSpace, target: RunSpace) -> None:
    """Give ``target`` the same registry (first model deployed) as ``source``."""
    import shutil

    if target.models_dir.exists():
        shutil.rmtree(target.models_dir)
    shutil.copytree(source.models_dir, target.models_dir)


# --------------------------------------------------------------------------- one week's steps


class SimulatedClock:
    """A clock the simulator moves by hand (the service stamps ``created_at`` with it)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def simulation_start(weeks: int, now: datetime | None = None) -> datetime:
    """Week 1 begins ``weeks`` weeks before ``now`` (so the last simulated week ends now)."""
    now = now or datetime.now(UTC)
    return now.replace(minute=0, second=0, microsecond=0) - timedelta(weeks=weeks, hours=1)


def week_end(start: datetime, week: int) -> datetime:
    return start + timedelta(weeks=week)


def serving_classifier(space: RunSpace) -> Any:
    """The ONNX classifier of the version the run's registry serves now."""
    from capture.classifier import OnnxClassifier
    from tasks.registry import current_model_dir

    model_dir = current_model_dir(space.models_dir)
    if model_dir is None:
        raise SimulationError(f"run {space.name}: no model is deployed in {space.models_dir}")
    return OnnxClassifier(model_dir)


@dataclass(frozen=True, slots=True)
class TrafficResult:
    """What one week of traffic did. ``truth``/``predicted`` map log ids to labels."""

    truth: dict[str, str]
    predicted: dict[str, str]
    failed: int
    model_version: str | None

    @property
    def accuracy(self) -> float:
        if not self.truth:
            return 0.0
        right = sum(self.predicted[k] == v for k, v in self.truth.items())
        return right / len(self.truth)


def send_traffic(
    space: RunSpace,
    records: Sequence[Record],
    *,
    start: datetime,
    week: int,
    seed: int,
    settings: LoopSettings,
) -> TrafficResult:
    """Send one week of prompts through the real NLU service (capture logger, serving ONNX
    classifier) into the run's database, with simulated workflow outcomes, stamped across the
    simulated week; returns when everything is committed."""
    import asyncio

    return asyncio.run(
        _send_traffic(space, records, start=start, week=week, seed=seed, settings=settings)
    )


async def _send_traffic(
    space: RunSpace,
    records: Sequence[Record],
    *,
    start: datetime,
    week: int,
    seed: int,
    settings: LoopSettings,
) -> TrafficResult:
    import uuid

    from capture import db
    from capture.service import create_nlu_service

    classifier = serving_classifier(space)
    rng = random.Random(f"{seed}-{week}-users")
    users = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(settings.users)]
    begin = start + timedelta(weeks=week - 1)
    step = timedelta(weeks=1) / max(1, len(records))
    clock = SimulatedClock(begin)
    truth: dict[str, str] = {}
    predicted: dict[str, str] = {}
    results = []
    service = create_nlu_service(classifier, url=space.database_url, clock=clock)
    try:
        async with service:
            for i, record in enumerate(records):
                clock.now = begin + step * (i + 0.5)  # strictly inside the week
                result = await service.process_message(
                    record.text,
                    user_id=users[i % len(users)],
                    conversation_id=uuid.UUID(int=rng.getrandbits(128), version=4),
                    message_index=0,
                )
                results.append(result)
                truth[str(result.log_id)] = record.label
                predicted[str(result.log_id)] = result.intent
            outcomes = workflow_outcomes(
                [r.intent == rec.label for r, rec in zip(results, records, strict=True)],
                seed=seed * 1000 + week,
                fail_if_wrong=settings.fail_if_wrong,
                fail_if_right=settings.fail_if_right,
            )
            for i, (result, ok) in enumerate(zip(results, outcomes, strict=True)):
                clock.now = begin + step * (i + 0.5) + timedelta(seconds=1)
                await service.update_workflow_outcome(
                    result.log_id,
                    was_successful=ok,
                    workflow_type=result.intent,
                    execution_error=None if ok else "simulated workflow failure",
                )
            await service.flush()
    finally:
        await db.get_engine(space.database_url).dispose()
    return TrafficResult(
        truth=truth,
        predicted=predicted,
        failed=sum(not ok for ok in outcomes),
        model_version=getattr(classifier, "version", None),
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
    settings: LoopSettings,
) -> ReviewResult:
    """The production review export (``tasks.review_export``) with ``strategy``, at the end of
    the simulated week; the stand-in reviewer's file goes to the inbox the weekly cycle drains."""
    from tasks.review_export import export_review_task

    classifier = serving_classifier(space)
    review_path = space.home / "exports" / f"review-week-{week:02d}.json"
    export = export_review_task(
        review_path,
        url=space.database_url,
        days=settings.review_days,
        confidence_threshold=settings.review_confidence_threshold,
        margin_threshold=settings.review_margin_threshold,
        limit=settings.review_budget,
        strategy=strategy,
        seed=seed * 1000 + week,
        embed=classifier.embed,
        now=week_end(start, week),
    )
    inbox = space.home / "inbox"
    corrections = inbox / f"corrections-week-{week:02d}.json"
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
    classifier = serving_classifier(space)
    return score_classifier(classifier, test), str(classifier.version)


def score_classifier(classifier: Any, test: Sequence[Record], *, batch: int = 128) -> float:
    """Top-1 accuracy of ``classifier.predict_batch`` on ``test`` (in batches)."""
    right = 0
    for begin in range(0, len(test), batch):
        chunk = test[begin : begin + batch]
        predictions = classifier.predict_batch([r.text for r in chunk])
        right += sum(p.intent == r.label for p, r in zip(predictions, chunk, strict=True))
    return right / len(test)


def train_reference(data: SimulationData, settings: LoopSettings, output: Path) -> WeekResult:
    """The ceiling: a model trained on every train label with the same hyperparameters, exported
    and scored like the loop's models. Cached in ``output/reference`` for the same inputs."""
    import hashlib
    import shutil
    import time

    from flows.retrain import train_config
    from tasks.export_onnx import export_onnx
    from tasks.train import train_model

    config = train_config(dict(settings.hyperparameters or {}))
    key = hashlib.sha256(
        json.dumps(
            [asdict(config), [(r.text, r.label) for r in data.train], settings.quantize]
        ).encode()
    ).hexdigest()[:16]
    folder = output / "reference"
    cached = folder / "reference.json"
    if cached.exists():
        saved = json.loads(cached.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return WeekResult(**saved["row"])
    started = time.perf_counter()
    model_dir = folder / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    train_model(list(data.train), None, model_dir, config=config, progress=True)
    export_onnx(model_dir, quantize=settings.quantize)
    from capture.classifier import OnnxClassifier

    classifier = OnnxClassifier(model_dir)
    accuracy = score_classifier(classifier, data.test)
    row = WeekResult(
        strategy=ALL_LABELS,
        seed=config.seed,
        week=0,
        accuracy=accuracy,
        reviewed=0,
        errors_found=0,
        labels_used=len(data.train),
        traffic_accuracy=None,
        candidates=None,
        training_rows=len(data.train),
        gate="reference",
        model_version=str(classifier.version),
        week_seconds=time.perf_counter() - started,
    )
    folder.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({"key": key, "row": asdict(row)}, indent=2), encoding="utf-8")
    return row


# --------------------------------------------------------------------------- Prefect tasks

load_data_task = task(name="simulate-load-data", cache_policy=NO_CACHE)(load_simulation_data)
plan_traffic_task = task(name="simulate-plan-traffic", cache_policy=NO_CACHE)(plan_traffic)
prepare_space_task = task(name="simulate-prepare-run", cache_policy=NO_CACHE)(prepare_space)
send_traffic_task = task(name="simulate-traffic", cache_policy=NO_CACHE)(send_traffic)
review_week_task = task(name="simulate-review", cache_policy=NO_CACHE)(review_week)
evaluate_task = task(name="simulate-evaluate", cache_policy=NO_CACHE)(evaluate_serving)
reference_task = task(name="simulate-reference", cache_policy=NO_CACHE)(train_reference)
write_outputs_task = task(name="simulate-write-outputs", retries=2, cache_policy=NO_CACHE)(
    write_outputs
)
