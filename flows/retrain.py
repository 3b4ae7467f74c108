"""Retrain flow: train a challenger (warm start from the serving model), score it against the
champion on the same data, apply the gate, and put it in the registry with its model card.

The steps live in ``tasks.retrain``; only a promoted challenger is exported and deployed
(``flows.deploy``).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.entry import from_parameters, open_run
from tasks.gate import GateRules
from tasks.registry import current_model_dir, next_version, registry_lock
from tasks.retrain import (
    RetrainResult,
    final_state,
    gate_challenger,
    publish_challenger,
    retrain_inputs,
    score_models,
    train_challenger,
    train_config,
)

MODEL_CARD_KEY = "model-card"


@flow(name="retrain")
def retrain_flow(
    training_data: str | None = None,
    *,
    holdout_data: str | None = None,
    test_data: str | None = None,
    val_data: str | None = None,
    pairs_data: str | None = None,
    warm_start: bool = True,
    hyperparameters: dict[str, Any] | None = None,
    max_overall_drop: float = 0.0,
    max_intent_drop: float = 0.05,
    min_support: int = 10,
    home: str | None = None,
) -> RetrainResult:
    """Train, score, gate and publish a challenger; returns the decision and where things are.
    A rejected challenger ends the run COMPLETED in a state named ``Rejected``.

    ``training_data`` defaults to the newest retraining export; ``test_data`` and ``val_data``
    to ``home/data/base_test.jsonl`` and ``base_val.jsonl`` when present; ``holdout_data`` to
    the export's ``.holdout.jsonl``. ``home`` defaults to PROMPT_CAPTURE_HOME. Holds the
    registry lock from choosing the version to publishing it.
    """
    rules = from_parameters(GateRules, locals())  # max_overall_drop, max_intent_drop, min_support
    run = open_run(home)
    run.require_registry()  # never a new, empty registry in a home nobody set up
    layout = run.layout
    train_config(hyperparameters)  # fail fast on a misspelt hyperparameter
    inputs = retrain_inputs(
        layout,
        training_data=training_data,
        holdout_data=holdout_data,
        test_data=test_data,
        val_data=val_data,
        pairs_data=pairs_data,
    )
    # Held from choosing the version and champion to publishing: no other run takes the same
    # version or changes the champion while this one trains and scores (re-entered when the
    # weekly cycle holds it already).
    with registry_lock(layout.models_dir):
        champion = current_model_dir(layout.models_dir)
        base_model = champion if warm_start else None
        version = next_version(layout.models_dir)
        get_run_logger().info(
            "training challenger %s (warm start from %s)",
            version,
            base_model.name if base_model is not None else "the bundled base model",
        )
        trained = train_challenger(
            inputs.training_data,
            inputs.val_data,
            layout.work_dir / f"candidate-{version}",
            base_model=base_model,
            pairs_data=inputs.pairs_data,
            hyperparameters=hyperparameters,
        )
        scores = score_models(champion, trained, inputs.eval_sets())
        decision = gate_challenger(scores, rules)
        result = publish_challenger(
            trained,
            layout.models_dir,
            version=version,
            champion=champion,
            warm_start=warm_start,
            decision=decision,
            scores=scores,
            inputs=inputs,
            hyperparameters=hyperparameters,
        )
    create_markdown_artifact(
        key=MODEL_CARD_KEY,
        markdown=result.card_markdown,
        description=f"version {version}: {decision.verdict}",
    )
    get_run_logger().info(
        "challenger %s: %s — %s", version, decision.verdict, "; ".join(decision.reasons)
    )
    return final_state(result, result)  # a rejection ends the run in a "Rejected" state
