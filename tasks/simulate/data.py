"""The simulator's data: the labelled splits, each seed's traffic plan, the strategy names.

The train split feeds the seed set (the first model's training data and every retrain's base
set), the gate set (what the promotion gate scores on) and the weekly traffic; the test split
only scores. One seed gives the same plan for every strategy, so strategies are compared on the
same prompts.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from capture.errors import UserError
from tasks.records import Record, load_records
from tasks.review_select import STRATEGIES

logger = logging.getLogger(__name__)


class SimulationError(UserError, ValueError):
    """The simulation cannot run as configured; the message names the setting and the fix."""


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


load_data_task = task(name="simulate-load-data", cache_policy=NO_CACHE)(load_simulation_data)
plan_traffic_task = task(name="simulate-plan-traffic", cache_policy=NO_CACHE)(plan_traffic)
