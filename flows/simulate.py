"""The learning-loop simulator as a Prefect flow (see ``tasks/simulate.py`` for the loop).

Every strategy × seed run gets its own ``PROMPT_CAPTURE_HOME`` (``output/runs/<strategy>-seed-
<n>/home``) and database (an SQLite file there, or a new PostgreSQL database when
``PROMPT_CAPTURE_DATABASE_URL`` or ``database_url`` names a PostgreSQL server), and runs the
production flows in it: the weekly cycle is a subflow of this one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.weekly import weekly_cycle
from tasks.review_select import DEFAULT_STRATEGY
from tasks.simulate import (
    LoopSettings,
    RunSpace,
    SimulationError,
    TrafficPlan,
    WeekResult,
    check_strategies,
    clone_registry,
    environment,
    evaluate_task,
    load_data_task,
    plan_traffic_task,
    prepare_space_task,
    reference_task,
    release_space,
    review_week_task,
    send_traffic_task,
    simulation_start,
    write_base_files,
    write_csv,
    write_outputs_task,
)

logger = logging.getLogger(__name__)

SIMULATION_ARTIFACT_KEY = "simulation"


def _cycle(space: RunSpace, settings: LoopSettings, seed: int) -> dict[str, Any]:
    """The production weekly cycle inside ``space`` (its home and database)."""
    params = settings.weekly_cycle_parameters(space.database_url)
    params["hyperparameters"] = {"seed": seed, **params["hyperparameters"]}
    with environment(space.env()):
        summary: dict[str, Any] = weekly_cycle(**params)
    rejected = [r for r in summary.get("corrections", []) if r.get("rejected")]
    if rejected:
        raise SimulationError(
            f"run {space.name}: the corrections import refused the stand-in reviewer's file: "
            f"{rejected[0]['rejected'][:3]}"
        )
    return summary


def _first_model(
    root: Path, plan: TrafficPlan, settings: LoopSettings, seed: int, server_url: str | None
) -> RunSpace:
    """Train, gate (first model: promoted) and deploy the seed-set model once per seed."""
    space = prepare_space_task(root, f"first-model-seed-{seed}", server_url=server_url)
    write_base_files(space, plan)
    _cycle(space, settings, seed)
    return space


def _run(
    *,
    base: RunSpace,
    root: Path,
    strategy: str,
    seed: int,
    plan: TrafficPlan,
    test: Any,
    settings: LoopSettings,
    start: Any,
    server_url: str | None,
    rows: list[WeekResult],
    csv_path: Path,
) -> None:
    """One strategy with one seed: week 0 (the first model), then ``settings.weeks`` weeks."""
    run_logger = get_run_logger()
    space = prepare_space_task(root, f"{strategy}-seed-{seed}", server_url=server_url)
    try:
        write_base_files(space, plan)
        clone_registry(base, space)
        with environment(space.env()):
            accuracy, version = evaluate_task(space, test)
        seed_labels = len(plan.seed_set)
        rows.append(
            WeekResult(
                strategy,
                seed,
                0,
                accuracy,
                0,
                0,
                seed_labels,
                None,
                None,
                seed_labels,
                "initial",
                version,
                0.0,
            )
        )
        reviewed = errors = 0
        for week in range(1, settings.weeks + 1):
            began = time.perf_counter()
            with environment(space.env()):
                traffic = send_traffic_task(
                    space,
                    plan.weeks[week - 1],
                    start=start,
                    week=week,
                    seed=seed,
                    settings=settings,
                )
                review = review_week_task(
                    space,
                    traffic,
                    strategy=strategy,
                    start=start,
                    week=week,
                    seed=seed,
                    settings=settings,
                )
            cycle = _cycle(space, settings, seed)
            seconds = time.perf_counter() - began
            with environment(space.env()):
                accuracy, version = evaluate_task(space, test)
            reviewed += review.selected
            errors += review.errors_found
            gate = "promoted" if cycle["retrain"]["promote"] else "rejected"
            rows.append(
                WeekResult(
                    strategy=strategy,
                    seed=seed,
                    week=week,
                    accuracy=accuracy,
                    reviewed=reviewed,
                    errors_found=errors,
                    labels_used=seed_labels + reviewed,
                    traffic_accuracy=traffic.accuracy,
                    candidates=review.candidates,
                    training_rows=int(cycle["training_data"]["n_train"]),
                    gate=gate,
                    model_version=version,
                    week_seconds=seconds,
                )
            )
            write_csv(rows, csv_path)  # progress survives an interrupted simulation
            run_logger.info(
                "%s seed %d week %d: accuracy %.2f%% (%s, version %s), reviewed %d "
                "(%d errors found), live accuracy %.2f%%, week %.0fs",
                strategy,
                seed,
                week,
                100 * accuracy,
                gate,
                version,
                reviewed,
                errors,
                100 * traffic.accuracy,
                seconds,
            )
    finally:
        release_space(space, server_url=server_url)


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
) -> dict[str, Any]:
    """Simulate ``weeks`` weeks of the learning loop for each strategy and seed on ``dataset``
    (a folder with ``train.jsonl`` and ``test.jsonl``); write ``output/simulation.csv`` and
    ``output/simulation.png``. ``strategies`` may hold ``all``; default: the default strategy.
    ``reference`` also trains the all-labels model (the ceiling)."""
    from capture.settings import get_settings

    run_logger = get_run_logger()
    names = check_strategies(strategies or [DEFAULT_STRATEGY])
    seed_list = list(dict.fromkeys(seeds if seeds is not None else [0]))
    settings = LoopSettings(
        weeks=weeks,
        review_budget=review_budget,
        initial_per_intent=initial_per_intent,
        traffic_per_week=traffic_per_week,
        gate_per_intent=gate_per_intent,
        review_confidence_threshold=review_confidence_threshold,
        review_margin_threshold=review_margin_threshold,
        fail_if_wrong=fail_if_wrong,
        fail_if_right=fail_if_right,
        hyperparameters=hyperparameters,
        max_pairs=max_pairs,
        quantize=quantize,
    )
    server_url = database_url or get_settings().database_url or None
    data = load_data_task(
        Path(dataset),
        exclude_labels=tuple(exclude_labels if exclude_labels is not None else ["oos"]),
        max_intents=max_intents,
    )
    out = Path(output).resolve()
    root = out / "runs"
    csv_path = out / "simulation.csv"
    start = simulation_start(weeks)
    run_logger.info(
        "simulating %d week(s) of %d prompts, review budget %d, on %d intents (%d train, %d "
        "test): strategies %s, seeds %s",
        weeks,
        traffic_per_week,
        review_budget,
        len(data.labels),
        len(data.train),
        len(data.test),
        ", ".join(names),
        seed_list,
    )
    rows: list[WeekResult] = []
    if reference:
        rows.append(reference_task(data, settings, out))
    for seed in seed_list:
        plan = plan_traffic_task(
            data,
            seed=seed,
            initial_per_intent=initial_per_intent,
            traffic_per_week=traffic_per_week,
            weeks=weeks,
            gate_per_intent=gate_per_intent,
        )
        base = _first_model(root, plan, settings, seed, server_url)
        try:
            for strategy in names:
                _run(
                    base=base,
                    root=root,
                    strategy=strategy,
                    seed=seed,
                    plan=plan,
                    test=data.test,
                    settings=settings,
                    start=start,
                    server_url=server_url,
                    rows=rows,
                    csv_path=csv_path,
                )
        finally:
            release_space(base, server_url=server_url)
    outputs = write_outputs_task(rows, out)
    create_markdown_artifact(
        key=SIMULATION_ARTIFACT_KEY,
        markdown=f"# Learning-loop simulation\n\n```\n{outputs.table}\n```\n\n"
        f"- CSV: `{outputs.csv}`\n- plot: `{outputs.png}`\n- best strategy: {outputs.best}\n",
        description=f"best strategy: {outputs.best}",
    )
    run_logger.info("simulation table:\n%s", outputs.table)
    return {
        "csv": str(outputs.csv),
        "png": str(outputs.png),
        "table": outputs.table,
        "best": outputs.best,
        "rows": len(rows),
        "gate_labels": len(data.labels) * gate_per_intent,
    }
