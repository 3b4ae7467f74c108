"""Retrain flow: train a challenger (warm start from the serving model), score it against the
champion on the same data, apply the gate, and put it in the registry with its model card.

The challenger is published under the next registry version whatever the decision, so its card
and metrics stay inspectable; only a promoted one is exported and deployed (``flows.deploy``).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import latest_training_export, models_dir, resolve_optional, work_dir
from flows.training_data import read_summary
from tasks.evaluate import EvalReport
from tasks.gate import GateDecision, GateRules, decide_task, render_model_card
from tasks.records import Record, load_records
from tasks.registry import (
    current_model_dir,
    next_version,
    publish_task,
    write_json_atomic,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

MODEL_CARD_KEY = "model-card"


def train_config(hyperparameters: dict[str, Any] | None) -> Any:
    """A ``TrainConfig`` from a flow parameter dict; unknown names are refused by name."""
    from tasks.train import TrainConfig

    values = dict(hyperparameters or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"hyperparameters: unknown name(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(sorted(known))}"
        )
    return TrainConfig(**values)


def read_eval_records(path: Path | None) -> list[Record]:
    """Records of an evaluation file; an absent or empty file gives none."""
    if path is None or not path.exists() or not path.read_text(encoding="utf-8").strip():
        return []
    return load_records(path, min_labels=1)


@task(cache_policy=NO_CACHE, name="train-challenger")
def train_challenger(
    training_data: Path,
    val_data: Path | None,
    output: Path,
    *,
    base_model: Path | None,
    pairs_data: Path | None,
    hyperparameters: dict[str, Any] | None,
) -> Path:
    """Train on ``training_data`` into ``output`` (warm start from ``base_model`` when given)."""
    from tasks.pairs import read_pairs
    from tasks.train import train_model

    config = train_config(hyperparameters)
    train = load_records(training_data)
    val = read_eval_records(val_data) or None
    # The pairs flow's file is the contrastive budget (max_pairs): train on it, not on top of it.
    pairs = read_pairs(pairs_data) if pairs_data is not None else None
    if output.exists():
        shutil.rmtree(output)
    result = train_model(train, val, output, config=config, base_model=base_model, pairs=pairs)
    return result.model_dir


@task(cache_policy=NO_CACHE, name="score-models")
def score_models(
    champion_dir: Path | None, challenger_dir: Path, eval_sets: dict[str, list[Record]]
) -> dict[str, tuple[EvalReport | None, EvalReport]]:
    """Score both models (torch, the same code path for both) on every evaluation set and on
    their union (``all``). The champion's report is None when nothing serves yet."""
    from tasks.evaluate import TorchModel, compute_report

    names = [name for name, rows in eval_sets.items() if rows]
    records = [r for name in names for r in eval_sets[name]]
    if not records:
        raise ValueError(
            "no evaluation data: pass test_data (the base test set) or produce held-out "
            "corrected prompts; the gate compares models only on labelled data"
        )
    texts = [r.text for r in records]
    truth = [r.label for r in records]
    slices: dict[str, np.ndarray] = {"all": np.arange(len(records))}
    start = 0
    for name in names:
        slices[name] = np.arange(start, start + len(eval_sets[name]))
        start += len(eval_sets[name])

    def reports(model_dir: Path) -> dict[str, EvalReport]:
        model = TorchModel.load(model_dir)
        probs = np.asarray(model.predict_proba(texts), dtype=np.float64)
        return {
            name: compute_report(
                model.labels,
                probs[idx],
                [truth[i] for i in idx],
                oos_label=model.oos_label,
                oos_threshold=model.oos_threshold,
            )
            for name, idx in slices.items()
        }

    new = reports(challenger_dir)
    old = reports(champion_dir) if champion_dir is not None else None
    return {name: (old[name] if old else None, new[name]) for name in slices}


def first_model_decision(challenger: EvalReport, rules: GateRules) -> GateDecision:
    return GateDecision(
        promote=True,
        reasons=["no model serves yet: the first model is promoted without a comparison"],
        champion_accuracy=0.0,
        challenger_accuracy=challenger.accuracy,
        overall_delta=challenger.accuracy,
        rules=rules,
        n=challenger.n,
    )


def training_info(training_data: Path, summary: dict[str, Any] | None) -> dict[str, Any]:
    """training.json: the export summary when there is one, and always the file's sha256."""
    import hashlib

    digest = hashlib.sha256(training_data.read_bytes()).hexdigest()
    info = dict(summary or {})
    if info.get("training_data_sha256") not in (None, digest):
        raise ValueError(
            f"{training_data}: its sha256 {digest[:12]}… differs from the export summary's "
            f"{str(info['training_data_sha256'])[:12]}…; the file changed after the export"
        )
    info["training_data"] = str(training_data)
    info["training_data_sha256"] = digest
    info.setdefault("n_train", sum(1 for line in training_data.open() if line.strip()))
    return info


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
) -> dict[str, Any]:
    """Train, score, gate and publish a challenger; returns the decision and where things are.

    ``training_data`` defaults to the newest retraining export; ``test_data`` and ``val_data``
    to ``home/data/base_test.jsonl`` and ``base_val.jsonl`` when present; ``holdout_data`` to
    the export's ``.holdout.jsonl``.
    """
    run_logger = get_run_logger()
    rules = GateRules(
        max_overall_drop=max_overall_drop,
        max_intent_drop=max_intent_drop,
        min_support=min_support,
    )
    train_config(hyperparameters)  # fail fast on a misspelt hyperparameter
    train_path = Path(training_data) if training_data else latest_training_export()
    if not train_path.exists():
        raise FileNotFoundError(f"{train_path}: training data not found; run the export first")
    summary = read_summary(train_path)
    holdout = resolve_optional(holdout_data) or (
        Path(summary["holdout_data"]) if summary and summary.get("holdout_data") else None
    )
    test = resolve_optional(test_data, "test")
    val = resolve_optional(val_data, "val")
    registry = models_dir()
    champion = current_model_dir(registry)
    version = next_version(registry)
    candidate_dir = work_dir() / f"candidate-{version}"
    run_logger.info(
        "training challenger %s (warm start from %s)",
        version,
        champion.name if champion is not None and warm_start else "the bundled base model",
    )
    trained = train_challenger(
        train_path,
        val,
        candidate_dir,
        base_model=champion if warm_start else None,
        pairs_data=resolve_optional(pairs_data),
        hyperparameters=hyperparameters,
    )
    eval_sets = {
        "base test": read_eval_records(test),
        "held-out corrected": read_eval_records(holdout),
    }
    scored = score_models(champion, trained, eval_sets)
    champion_all, challenger_all = scored["all"]
    if champion_all is None:
        decision = first_model_decision(challenger_all, rules)
    else:
        decision = decide_task(champion_all, challenger_all, rules)

    info = training_info(train_path, summary)
    info["hyperparameters"] = dict(hyperparameters or {})
    info["warm_start_from"] = champion.name if champion is not None and warm_start else None
    metrics: dict[str, Any] = {
        "evaluation": {
            name: {
                "challenger": new.to_dict(details=True),
                "champion": old.to_dict(details=False) if old else None,
            }
            for name, (old, new) in scored.items()
        },
        "champion_version": champion.name if champion is not None else None,
    }
    target = publish_task(
        trained, registry, version=version, metrics=metrics, training=info, move=True
    )
    shutil.rmtree(candidate_dir, ignore_errors=True)
    write_json_atomic(target / "gate.json", decision.as_dict())
    card = render_model_card(
        version=version,
        parent_version=champion.name if champion is not None else None,
        decision=decision,
        reports={name: (old, new) for name, (old, new) in scored.items() if old is not None},
        training=info,
        hyperparameters=info["hyperparameters"],
        files=[str(target / name) for name in ("card.md", "metrics.json", "training.json")],
    )
    write_text_atomic(target / "card.md", card)
    create_markdown_artifact(
        key=MODEL_CARD_KEY,
        markdown=card,
        description=f"version {version}: {decision.verdict}",
    )
    run_logger.info(
        "challenger %s: %s — %s", version, decision.verdict, "; ".join(decision.reasons)
    )
    return {
        "version": version,
        "promote": decision.promote,
        "verdict": decision.verdict,
        "reasons": decision.reasons,
        "champion_version": champion.name if champion is not None else None,
        "champion_accuracy": decision.champion_accuracy,
        "challenger_accuracy": decision.challenger_accuracy,
        "model_dir": str(target),
        "card": str(target / "card.md"),
    }
