"""The learning-loop simulator as a Prefect flow (``tasks.simulate`` holds the steps).

Every strategy × seed run gets its own home (``output/runs/<strategy>-seed-<n>/home``) and
database (an SQLite file there, or a new PostgreSQL database when the simulation's database
setting names a PostgreSQL server), and runs the production flows in it: the weekly cycle is a
subflow of this one, given the run's home and database as parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from capture.settings import Settings, get_settings
from flows.entry import from_parameters
from flows.weekly import weekly_cycle
from tasks.records import Record
from tasks.review_select import DEFAULT_STRATEGY
from tasks.run_settings import configured_database_url
from tasks.simulate.data import TrafficPlan, check_strategies, load_data_task, plan_traffic_task
from tasks.simulate.reference import reference_task
from tasks.simulate.results import WeekResult, write_csv, write_outputs_task
from tasks.simulate.space import (
    LoopSettings,
    RunSpace,
    check_reviewer_files_applied,
    clone_registry,
    prepare_space_task,
    release_space,
    write_base_files,
)
from tasks.simulate.week import (
    evaluate_task,
    initial_row,
    review_week_task,
    send_traffic_task,
    simulation_start,
    week_row,
)
from tasks.weekly import WeeklyResult

SIMULATION_ARTIFACT_KEY = "simulation"


def _cycle(space: RunSpace, loop: LoopSettings, seed: int) -> WeeklyResult:
    """The production weekly cycle inside ``space`` (its home and database)."""
    params = loop.weekly_cycle_parameters()
    params["hyperparameters"] = {"seed": seed, **params["hyperparameters"]}
    result: WeeklyResult = weekly_cycle(**params, **space.flow_params())
    check_reviewer_files_applied(space, result.corrections)
    return result


@dataclass(frozen=True, slots=True)
class _Simulation:
    """What every strategy × seed run of one simulation shares: the output folder (runs under
    ``out/runs``, progress in ``out/simulation.csv``), the test split, the loop settings, the
    start of week 1, the runs' process settings, and the rows so far."""

    out: Path
    test: tuple[Record, ...]
    loop: LoopSettings
    start: datetime
    settings: Settings
    rows: list[WeekResult] = field(default_factory=list)

    def new_space(self, name: str) -> RunSpace:
        """A fresh run space ``out/runs/<name>`` with its own database."""
        return prepare_space_task(
            self.out / "runs", name, settings=self.settings, server_url=self.settings.database_url
        )

    def save_progress(self) -> None:
        """Rewrite ``simulation.csv``: progress survives an interrupted simulation."""
        write_csv(self.rows, self.out / "simulation.csv")


def _first_model(sim: _Simulation, plan: TrafficPlan, seed: int) -> RunSpace:
    """Train, gate (first model: promoted) and deploy the seed-set model once per seed."""
    space = sim.new_space(f"first-model-seed-{seed}")
    write_base_files(space, plan)
    _cycle(space, sim.loop, seed)
    return space


def _run(sim: _Simulation, base: RunSpace, plan: TrafficPlan, *, strategy: str, seed: int) -> None:
    """One strategy with one seed: week 0 (the first model), then ``loop.weeks`` weeks."""
    loop, start = sim.loop, sim.start
    space = sim.new_space(f"{strategy}-seed-{seed}")
    try:
        write_base_files(space, plan)
        clone_registry(base, space)
        row = initial_row(strategy, seed, *evaluate_task(space, sim.test), len(plan.seed_set))
        sim.rows.append(row)
        for week in range(1, loop.weeks + 1):
            began = time.perf_counter()
            traffic = send_traffic_task(
                space, plan.weeks[week - 1], start=start, week=week, seed=seed, loop=loop
            )
            review = review_week_task(
                space, traffic, strategy=strategy, start=start, week=week, seed=seed, loop=loop
            )
            cycle = _cycle(space, loop, seed)
            seconds = time.perf_counter() - began
            accuracy, version = evaluate_task(space, sim.test)
            row = week_row(
                row,
                traffic=traffic,
                review=review,
                cycle=cycle,
                accuracy=accuracy,
                version=version,
                seconds=seconds,
            )
            sim.rows.append(row)
            sim.save_progress()
            get_run_logger().info(
                "%s seed %d week %d: accuracy %.2f%% (%s, version %s), reviewed %d "
                "(%d errors found), live accuracy %.2f%%, week %.0fs",
                strategy,
                seed,
                week,
                100 * row.accuracy,
                row.gate,
                version,
                row.reviewed,
                row.errors_found,
                100 * traffic.accuracy,
                seconds,
            )
    finally:
        release_space(space)


@flow(name="simulate")
def simulate_flow(
    dataset: str,
    *,
    strategies: list[str] | None = None,
    seeds: list[int] | None = None,
    weeks: int = 4,
    review_budget: int = 300,
    initial_per_intent: int = 5,
    traffic_per_week: int = 3000,
    output: str = "simulation",
    gate_per_intent: int = 3,
    max_intents: int | None = None,
    exclude_labels: list[str] | None = None,
    reference: bool = False,
    hyperparameters: dict[str, Any] | None = None,
    max_pairs: int = 2000,
    quantize: bool = True,
    review_confidence_threshold: float = 1.0,
    review_margin_threshold: float = 1.01,
    fail_if_wrong: float = 0.5,
    fail_if_right: float = 0.05,
    database_url: str | None = None,
    database_secret: str | None = None,
) -> dict[str, Any]:
    """Simulate ``weeks`` weeks of the learning loop for each strategy and seed on ``dataset``
    (a folder with ``train.jsonl`` and ``test.jsonl``); write ``output/simulation.csv`` and
    ``output/simulation.png``. ``strategies`` may hold ``all``; default: the default strategy.
    ``reference`` also trains the all-labels model (the ceiling).

    The runs' databases: new PostgreSQL databases on the server ``database_url`` (no password),
    the Secret block ``database_secret`` or PROMPT_CAPTURE_DATABASE_URL names; SQLite files in
    the runs' homes when none names a server.
    """
    loop = from_parameters(LoopSettings, locals())  # the flow's parameters of its fields
    names = check_strategies(strategies or [DEFAULT_STRATEGY])
    env = get_settings()
    server_url = configured_database_url(
        env, database_url=database_url, database_secret=database_secret
    )
    # The runs' settings: the environment's, with the server (or none: SQLite per run).
    settings = env.model_copy(update={"database_url": server_url or ""})
    data = load_data_task(
        Path(dataset),
        exclude_labels=tuple(exclude_labels if exclude_labels is not None else ["oos"]),
        max_intents=max_intents,
    )
    out = Path(output).resolve()
    sim = _Simulation(
        out=out, test=data.test, loop=loop, start=simulation_start(weeks), settings=settings
    )
    get_run_logger().info(
        "simulating %d week(s) of %d prompts, review budget %d, on %d intents (%d train, %d "
        "test): strategies %s, seeds %s",
        weeks,
        traffic_per_week,
        review_budget,
        len(data.labels),
        len(data.train),
        len(data.test),
        ", ".join(names),
        seeds if seeds is not None else [0],
    )
    if reference:
        sim.rows.append(reference_task(data, loop, out))
    for seed in dict.fromkeys(seeds if seeds is not None else [0]):
        plan = plan_traffic_task(
            data,
            seed=seed,
            initial_per_intent=initial_per_intent,
            traffic_per_week=traffic_per_week,
            weeks=weeks,
            gate_per_intent=gate_per_intent,
        )
        base = _first_model(sim, plan, seed)
        try:
            for strategy in names:
                _run(sim, base, plan, strategy=strategy, seed=seed)
        finally:
            release_space(base)
    outputs = write_outputs_task(sim.rows, out)
    create_markdown_artifact(
        key=SIMULATION_ARTIFACT_KEY,
        markdown=outputs.markdown(),
        description=f"best strategy: {outputs.best}",
    )
    get_run_logger().info("simulation table:\n%s", outputs.table)
    return {
        "csv": str(outputs.csv),
        "png": str(outputs.png),
        "table": outputs.table,
        "best": outputs.best,
        "rows": len(sim.rows),
        "gate_labels": len(data.labels) * gate_per_intent,
    }
