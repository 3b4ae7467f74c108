"""The retrain steps: what the retrain flow trains on, the challenger's training and scoring,
the gate decision, and publishing the challenger with its ``training.json``, ``metrics.json``,
``gate.json`` and model card.

The challenger is published under the next registry version whatever the decision, so its card
and metrics stay inspectable; only a promoted one is exported and deployed (``tasks.deploy``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from capture.errors import UserError
from capture.files import write_json_atomic, write_text_atomic
from tasks.evaluate import EvalReport
from tasks.gate import GateDecision, GateRules, decide, render_model_card
from tasks.layout import HomeLayout, LayoutError
from tasks.records import Record, load_records
from tasks.registry import publish
from tasks.retry import io_task
from tasks.training_data import read_summary

if TYPE_CHECKING:
    from tasks.train import TrainConfig

logger = logging.getLogger(__name__)

ALL = "all"  # the union of the evaluation sets, what the gate decides on
EVAL_BASE_TEST = "base test"
EVAL_HELD_OUT = "held-out corrected"
CARD_FILE, METRICS_FILE, TRAINING_FILE, GATE_FILE = (
    "card.md",
    "metrics.json",
    "training.json",
    "gate.json",
)


def record_metrics(model_dir: Path, key: str, section: Mapping[str, Any]) -> None:
    """Set one ``key`` of a version's ``metrics.json`` (created when missing) to ``section``,
    keeping the other keys; written atomically. Used by the export and fast-path steps."""
    path = model_dir / METRICS_FILE
    metrics: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    metrics[key] = dict(section)
    write_json_atomic(path, metrics)


# Per evaluation set name: (champion report or None when nothing serves, challenger report).
Scores = dict[str, tuple[EvalReport | None, EvalReport]]

#: The name of the final state (a kind of COMPLETED) of a run whose challenger was rejected.
REJECTED_STATE_NAME = "Rejected"
R = TypeVar("R")


class RetrainError(UserError, ValueError):
    """The retrain cannot run as asked (a bad hyperparameter, no evaluation data, a training
    file that changed after its export); the message names the input and the fix."""


def train_config(hyperparameters: Mapping[str, Any] | None) -> TrainConfig:
    """A ``TrainConfig`` from a flow parameter dict; unknown names are refused by name
    (:class:`RetrainError`)."""
    from tasks.train import TrainConfig

    values = dict(hyperparameters or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RetrainError(
            f"hyperparameters: unknown name(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(sorted(known))}"
        )
    return TrainConfig(**values)


def read_eval_records(path: Path | None) -> list[Record]:
    """Records of an evaluation file; an absent or empty file gives none. Read through
    ``tasks.records.load_records`` (one file-level message for UTF-16, CSV, HTML, ...)."""
    if path is None or not path.exists() or not path.read_bytes().strip():  # bytes: any encoding
        return []
    return load_records(path, min_labels=1)


@dataclass(frozen=True, slots=True)
class RetrainInputs:
    """The files one retrain reads. ``summary`` is the training export's ``.meta.json``."""

    training_data: Path
    holdout_data: Path | None
    test_data: Path | None
    val_data: Path | None
    pairs_data: Path | None
    summary: dict[str, Any] | None

    def eval_sets(self) -> dict[str, list[Record]]:
        """The labelled sets both models are scored on (the base test set, the held-out
        corrected prompts); empty ones are skipped by :func:`score_models`."""
        return {
            EVAL_BASE_TEST: read_eval_records(self.test_data),
            EVAL_HELD_OUT: read_eval_records(self.holdout_data),
        }


def retrain_inputs(
    layout: HomeLayout,
    *,
    training_data: str | None = None,
    holdout_data: str | None = None,
    test_data: str | None = None,
    val_data: str | None = None,
    pairs_data: str | None = None,
) -> RetrainInputs:
    """Resolve the retrain's files: ``training_data`` defaults to the newest retraining export;
    ``test_data``/``val_data`` to ``home/data/base_test.jsonl``/``base_val.jsonl`` when present;
    ``holdout_data`` to the export's held-out file named in its summary. A file given but
    missing raises :class:`tasks.layout.LayoutError`."""
    train = Path(training_data) if training_data else layout.latest_training_export()
    if not train.exists():
        raise LayoutError(f"{train}: training data not found; run the export first")
    summary = read_summary(train)
    holdout = layout.optional_file(holdout_data) or (
        Path(summary["holdout_data"]) if summary and summary.get("holdout_data") else None
    )
    return RetrainInputs(
        training_data=train,
        holdout_data=holdout,
        test_data=layout.optional_file(test_data, "test"),
        val_data=layout.optional_file(val_data, "val"),
        pairs_data=layout.optional_file(pairs_data),
        summary=summary,
    )


@task(cache_policy=NO_CACHE, name="train-challenger")
def train_challenger(
    training_data: Path,
    val_data: Path | None,
    output: Path,
    *,
    base_model: Path | None,
    pairs_data: Path | None,
    hyperparameters: Mapping[str, Any] | None,
) -> Path:
    """Train on ``training_data`` into ``output`` (replaced if present; warm start from
    ``base_model`` when given); returns the model directory."""
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
    champion_dir: Path | None, challenger_dir: Path, eval_sets: Mapping[str, list[Record]]
) -> Scores:
    """Score both models (torch, the same code path for both) on every non-empty evaluation
    set and on their union (``all``). The champion's report is None when nothing serves yet.

    Raises :class:`RetrainError` when every set is empty.
    """
    from tasks.evaluate import TorchModel, compute_report

    names = [name for name, rows in eval_sets.items() if rows]
    records = [r for name in names for r in eval_sets[name]]
    if not records:
        raise RetrainError(
            "no evaluation data: pass test_data (the base test set) or produce held-out "
            "corrected prompts; the gate compares models only on labelled data"
        )
    texts = [r.text for r in records]
    truth = [r.label for r in records]
    slices: dict[str, np.ndarray] = {ALL: np.arange(len(records))}
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
    """The decision when no model serves yet: promote, with the reason said."""
    return GateDecision(
        promote=True,
        reasons=["no model serves yet: the first model is promoted without a comparison"],
        champion_accuracy=0.0,
        challenger_accuracy=challenger.accuracy,
        overall_delta=challenger.accuracy,
        rules=rules,
        n=challenger.n,
    )


@task(cache_policy=NO_CACHE, name="gate-decision")
def gate_challenger(scores: Scores, rules: GateRules) -> GateDecision:
    """The gate on the union of the evaluation sets (:func:`tasks.gate.decide`), or
    :func:`first_model_decision` when nothing serves."""
    champion, challenger = scores[ALL]
    if champion is None:
        return first_model_decision(challenger, rules)
    return decide(champion, challenger, rules)


def training_info(training_data: Path, summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """``training.json``: the export summary when there is one, and always the file's path,
    sha256 and ``n_train``. Raises :class:`RetrainError` when the file's sha256 differs from
    the summary's (the file changed after the export)."""
    digest = hashlib.sha256(training_data.read_bytes()).hexdigest()
    info = dict(summary or {})
    if info.get("training_data_sha256") not in (None, digest):
        raise RetrainError(
            f"{training_data}: its sha256 {digest[:12]}… differs from the export summary's "
            f"{str(info['training_data_sha256'])[:12]}…; the file changed after the export"
        )
    info["training_data"] = str(training_data)
    info["training_data_sha256"] = digest
    info.setdefault("n_train", sum(1 for line in training_data.open() if line.strip()))
    return info


def evaluation_metrics(scores: Scores, champion_version: str | None) -> dict[str, Any]:
    """``metrics.json`` of a challenger: every evaluation set's reports and the champion."""
    return {
        "evaluation": {
            name: {
                "challenger": new.to_dict(details=True),
                "champion": old.to_dict(details=False) if old else None,
            }
            for name, (old, new) in scores.items()
        },
        "champion_version": champion_version,
    }


@dataclass(frozen=True, slots=True)
class RetrainResult:
    """What the retrain flow did: the challenger's version and the gate's decision."""

    version: str
    decision: GateDecision
    champion_version: str | None
    model_dir: Path
    card: Path
    card_markdown: str

    @property
    def promote(self) -> bool:
        return self.decision.promote

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-able values (``prompt-capture cycle --json``)."""
        decision = self.decision
        return {
            "version": self.version,
            "promote": decision.promote,
            "verdict": decision.verdict,
            "reasons": list(decision.reasons),
            "champion_version": self.champion_version,
            "champion_accuracy": decision.champion_accuracy,
            "challenger_accuracy": decision.challenger_accuracy,
            "model_dir": str(self.model_dir),
            "card": str(self.card),
        }


def final_state(result: R, retrain: RetrainResult) -> R:
    """What a flow that gated a challenger returns: ``result`` when the challenger was
    promoted; when the gate rejected it, a ``Completed`` state named ``Rejected`` holding
    ``result``, whose message says who keeps serving, so a rejection and a promotion look
    different in the run list at a glance. Prefect makes a returned state the run's final state
    and hands the caller its data: whoever calls the flow still receives ``result``."""
    if retrain.promote:
        return result
    from prefect.states import Completed

    keeps = retrain.champion_version or "nothing"
    message = (
        f"challenger {retrain.version} rejected by the gate; version {keeps} keeps serving "
        f"(see {retrain.card})"
    )
    return cast(R, Completed(data=result, name=REJECTED_STATE_NAME, message=message))


@io_task(name="publish-challenger")
def publish_challenger(
    trained: Path,
    models_dir: Path,
    *,
    version: str,
    champion: Path | None,
    warm_start: bool,
    decision: GateDecision,
    scores: Scores,
    inputs: RetrainInputs,
    hyperparameters: Mapping[str, Any] | None,
) -> RetrainResult:
    """Move ``trained`` into the registry as ``version`` with ``training.json``,
    ``metrics.json``, ``gate.json`` and the model card ``card.md``; returns the result."""
    champion_version = champion.name if champion is not None else None
    info = training_info(inputs.training_data, inputs.summary)
    info["hyperparameters"] = dict(hyperparameters or {})
    info["warm_start_from"] = champion_version if warm_start else None
    if trained.exists():
        target = publish(
            trained,
            models_dir,
            version=version,
            metrics=evaluation_metrics(scores, champion_version),
            training=info,
            move=True,
        )
        shutil.rmtree(trained, ignore_errors=True)  # what a copy (not a move) left behind
    else:  # a retry after the move succeeded
        target = models_dir / version
    write_json_atomic(target / GATE_FILE, decision.as_dict())
    card = render_model_card(
        version=version,
        parent_version=champion_version,
        decision=decision,
        reports={name: (old, new) for name, (old, new) in scores.items() if old is not None},
        training=info,
        hyperparameters=info["hyperparameters"],
        files=[str(target / name) for name in (CARD_FILE, METRICS_FILE, TRAINING_FILE)],
    )
    write_text_atomic(target / CARD_FILE, card)
    return RetrainResult(
        version=version,
        decision=decision,
        champion_version=champion_version,
        model_dir=target,
        card=target / CARD_FILE,
        card_markdown=card,
    )
