"""Fine-tune the sentence encoder for intent classification and write a model directory.

Recipe (defaults in :class:`TrainConfig`; measured on CLINC150 and HWU64 in bench/RESULTS.md):

1. The encoder is fine-tuned with plain cross-entropy on single labelled texts (batches of 64,
   sorted by length within chunks) against a cosine classifier head started at the class
   centroids (``tasks.fine_tune``): AdamW at 1e-4, a linear warm-up over 10% of the steps and a
   linear decay to 0, the word-embedding matrix frozen. Two passes over the texts; with few
   examples per intent more passes (8 passes at 8 per intent: ``tasks.fine_tune.epochs_for``).
2. The published head (``head``): the ensemble (``ensemble``, the default: the mean of the
   logits of the trained cosine head and of a logistic regression (C=10) on the tuned
   embeddings, each divided by its own temperature fitted on validation, one linear layer
   again), the logistic regression alone (``logreg``) or the cosine head alone (``cosine``).
3. A temperature is fitted on validation (NLL) — jointly with an offset on the out-of-scope
   logit when validation has out-of-scope rows — and the out-of-scope threshold is chosen on
   validation when it has out-of-scope rows.

``device``: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``, for the fine-tuning
and the embedding; the written encoder loads on CPU as always.

The output is a model directory (format: ``capture.model_dir``): the encoder, the head and the
metadata, written to a private temporary folder and renamed into place with the shared modes
(folders ``0o777 & ~umask``), so a service running as another Unix user can read it.

Inputs are checked before any model is loaded, and every refusal is a ``UserError`` naming the
real cause: fewer than two labels, a pair budget or pairs file that covers fewer than two
intents, a bad hyperparameter, ``cuda`` asked without CUDA, an output directory that is not
empty, a base model that is not a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from capture.files import shared_dir_mode
from capture.model_dir import ENCODER_DIR, Head, ModelMetadata
from tasks.calibration import (
    choose_oos_threshold,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_and_offset,
    softmax,
)
from tasks.evaluate import compute_report, encode_texts, load_encoder
from tasks.fine_tune import epochs_for, fine_tune, format_eta, plan_steps, seed_everything
from tasks.pairs import Pair
from tasks.records import Record
from tasks.train_inputs import (
    BaseModelError,
    TrainConfigError,
    TrainingDataError,
    TrainOutputError,
    check_output,
    resolve_base,
    resolve_device,
    training_rows,
    training_texts,
)

logger = logging.getLogger(__name__)

BUNDLED_BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"
__all__ = [
    "BUNDLED_BASE_NAME",
    "BaseModelError",
    "CandidateHead",
    "TrainConfig",
    "TrainConfigError",
    "TrainOutputError",
    "TrainResult",
    "TrainingDataError",
    "fit_logreg_head",
    "train_model",
]


HEADS = ("logreg", "cosine", "ensemble")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Every training hyperparameter (recorded as ``hyperparameters`` in the model metadata).

    The defaults are the recipe chosen on CLINC150 and HWU64 (bench/accuracy.py, numbers in
    bench/RESULTS.md): cross-entropy on single texts against a cosine head, 2 passes (8 with 8
    examples per intent), lr 1e-4 with linear warm-up and decay, frozen word embeddings, and the
    ensemble of the cosine head and the logistic-regression head on the tuned embeddings (on
    full data it matched or beat the LR head on both domains, at no serving cost).
    """

    seed: int = 0
    # Budget: passes over the training texts, with the few-shot rule of
    # tasks.fine_tune.epochs_for (at least few_shot_epochs * few_shot_examples passes per
    # intent, at most few_shot_epochs passes); step bounds; max_pairs: train on the texts of at
    # most this many same-intent pairs (the weekly cycle's budget) instead of every row.
    epochs: float = 2.0
    few_shot_epochs: float = 8.0
    few_shot_examples: int = 8
    min_steps: int = 0
    max_steps: int | None = None
    max_pairs: int | None = None
    batch_size: int = 64  # texts per batch
    learning_rate: float = 1e-4
    head_learning_rate: float = 1e-2
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # linear warm-up over this share of the steps, then linear decay
    freeze_word_embeddings: bool = True
    max_seq_length: int = 48
    # Objective: cross-entropy of scale x cosine(text, class row), optionally label-smoothed.
    label_smoothing: float = 0.0
    scale: float = 20.0
    head: Literal["logreg", "cosine", "ensemble"] = "ensemble"
    head_c: float = 10.0
    oos_label: str = "oos"
    oos_as_class: bool = True
    calibrate: bool = True
    # With out-of-scope rows in validation: fit an offset on the out-of-scope logit jointly with
    # the temperature (tasks.calibration.fit_temperature_and_offset), folded into the head's bias.
    calibrate_oos_offset: bool = True
    centroid_examples: int = 16
    log_every: int = 25
    torch_threads: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        """Raises :class:`TrainConfigError` naming the first value out of range."""
        if self.batch_size < 2:
            raise TrainConfigError(f"batch_size: expected >= 2, found {self.batch_size}")
        if self.learning_rate <= 0 or self.head_learning_rate <= 0:
            raise TrainConfigError(
                f"learning_rate and head_learning_rate: expected > 0, found "
                f"{self.learning_rate} and {self.head_learning_rate}"
            )
        if self.epochs <= 0 or self.few_shot_epochs < self.epochs:
            raise TrainConfigError(
                f"epochs and few_shot_epochs: expected 0 < epochs <= few_shot_epochs, found "
                f"{self.epochs} and {self.few_shot_epochs}"
            )
        if self.max_pairs is not None and self.max_pairs < 0:
            raise TrainConfigError(f"max_pairs: expected >= 0 or unset, found {self.max_pairs}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TrainConfigError(
                f"label_smoothing: expected 0 <= value < 1, found {self.label_smoothing}"
            )
        if self.head not in HEADS:
            raise TrainConfigError(
                f"head: expected 'logreg', 'cosine' or 'ensemble', found {self.head!r}"
            )
        if self.device not in DEVICES:
            raise TrainConfigError(
                f"device: expected 'auto', 'cpu' or 'cuda', found {self.device!r}"
            )


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_model` wrote (``model_dir``) and measured (seconds, loss history)."""

    model_dir: Path
    version: str
    labels: list[str]
    temperature: float
    oos_threshold: float | None
    metrics: dict[str, Any]
    steps: int
    train_seconds: float
    total_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    #: Every head built in this run (``cosine``; ``logreg`` and ``ensemble`` unless the head
    #: is ``cosine``), calibrated on validation like the published one (``config.head``).
    candidate_heads: dict[str, CandidateHead] = field(default_factory=dict)


@dataclass(frozen=True)
class CandidateHead:
    """A head calibrated on validation: ``softmax((emb @ W.T + b) / temperature)``."""

    head: Head
    temperature: float
    oos_threshold: float | None
    metrics: dict[str, Any]


# --------------------------------------------------------------------------------------------
# helpers


def fit_logreg_head(
    embeddings: np.ndarray,
    y: np.ndarray,
    n_labels: int,
    *,
    c: float,
    seed: int,
    max_iter: int = 300,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial L2 logistic regression on ``embeddings`` (n, dim) with class ids ``y`` (n,);
    returns (W (n_labels, dim), b (n_labels,)) float32 for all ``n_labels`` classes. A class
    absent from ``y`` gets bias -1e4 (it never wins); a single class present always wins."""
    from sklearn.linear_model import LogisticRegression

    W = np.zeros((n_labels, embeddings.shape[1]), dtype=np.float32)
    b = np.full(n_labels, -1e4, dtype=np.float32)
    present = np.unique(y)
    if len(present) == 1:
        b[int(present[0])] = 0.0
        return W, b
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    clf.fit(embeddings, y)
    classes = clf.classes_.astype(int)
    if len(classes) == 2:  # sklearn returns one row for binary problems
        W[classes[1]], b[classes[1]] = clf.coef_[0] / 2, clf.intercept_[0] / 2
        W[classes[0]], b[classes[0]] = -clf.coef_[0] / 2, -clf.intercept_[0] / 2
    else:
        W[classes], b[classes] = clf.coef_, clf.intercept_
    return W, b


def _make_version(W: np.ndarray, config: TrainConfig, labels: Sequence[str]) -> str:
    digest = hashlib.sha256()
    digest.update(W.tobytes())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update("\n".join(labels).encode())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{digest.hexdigest()[:8]}"


def train_model(
    train: Sequence[Record],
    val: Sequence[Record] | None,
    output_dir: str | os.PathLike[str],
    *,
    config: TrainConfig | None = None,
    base_model: str | os.PathLike[str] | None = None,
    extra_pairs: Sequence[Pair] | None = None,
    pairs: Sequence[Pair] | None = None,
    progress: bool = True,
    on_encoder_ready: Callable[[Any], None] | None = None,
) -> TrainResult:
    """Train a classifier on ``train``, calibrate and pick the OOS threshold on ``val``, and write
    the model directory ``output_dir`` (must not exist or be empty; written all-or-nothing).

    ``base_model``: None for the bundled all-MiniLM-L6-v2; a model directory warm-starts from its
    encoder/ (its version becomes ``parent_version``); any sentence-transformers directory works.
    The encoder is fine-tuned on every training row, or, when ``pairs`` are given (the weekly
    cycle passes the pairs flow's budgeted file) or ``config.max_pairs`` is set, on the texts of
    those pairs only, so a retrain costs the budget, not the size of the training data; the
    texts of ``extra_pairs`` (e.g. from ``convert-to-pairs``) are added. The logistic-regression
    head is fitted on every training row.
    Without ``val``, the temperature is 1 and there is no OOS threshold.

    Every input is checked before the encoder is loaded. Raises (all ``UserError``s)
    :class:`TrainOutputError` (output not empty; a ``FileExistsError``),
    :class:`TrainingDataError` (a ``ValueError``: fewer than two labels; a pair budget or
    ``pairs`` covering fewer than two intents), :class:`TrainConfigError` (``device='cuda'``
    without CUDA), :class:`BaseModelError` and ``capture.model_dir.ModelDirError`` (a base
    model that is not a model directory).
    """
    import torch

    config = config or TrainConfig()
    t_start = time.perf_counter()
    out = Path(output_dir)
    check_output(out)
    device = resolve_device(config.device)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    seed_everything(config.seed)

    rows, labels = training_rows(train, config)
    examples = training_texts(rows, labels, config, pairs=pairs, extra_pairs=extra_pairs)
    label_index = {lab: i for i, lab in enumerate(labels)}
    encoder_path, parent = resolve_base(base_model)
    encoder = load_encoder(encoder_path, max_seq_length=config.max_seq_length)
    encoder.to(device)
    if on_encoder_ready is not None:
        on_encoder_ready(encoder)
    texts = [r.text for r in examples]
    y = np.array([label_index[r.label] for r in examples])
    centroids = _centroids(encoder, texts, y, len(labels), config)
    steps = plan_steps(len(texts), len(labels), config)
    logger.info(
        "fine-tuning on %d texts of %d labels (%d training rows) on %s: %d steps of %d texts "
        "(%.1f passes)",
        len(texts),
        len(labels),
        len(rows),
        device,
        steps,
        config.batch_size,
        epochs_for(len(texts), len(labels), config),
    )
    t_train = time.perf_counter()
    cos_head, history = fine_tune(
        encoder,
        texts=texts,
        y=y,
        centroids=centroids,
        config=config,
        steps=steps,
        device=device,
        progress=progress,
    )
    train_seconds = time.perf_counter() - t_train

    validation = (
        _Validation.of(val, encode_texts(encoder, [r.text for r in val]), labels) if val else None
    )
    heads = _candidate_heads(
        encoder,
        [r.text for r in rows],
        np.array([label_index[r.label] for r in rows]),
        cos_head,
        validation=validation,
        n_labels=len(labels),
        config=config,
    )
    candidates = {
        name: _calibrate(name, validation, W, b, labels=labels, config=config)
        for name, (W, b) in heads.items()
    }
    chosen = candidates[config.head]
    metrics = {
        "train_examples": len(rows),
        "fine_tune_texts": len(texts),
        "steps": steps,
        "device": device,
        **chosen.metrics,
    }
    if val:
        metrics["val_heads"] = {
            name: {
                "closed_set_accuracy": c.metrics["val"]["closed_set_accuracy"],
                "ece": c.metrics["val"]["ece"],
            }
            for name, c in candidates.items()
        }
    metadata = _model_metadata(
        chosen,
        labels,
        metrics,
        config,
        base_model=base_model,
        parent=parent,
        train_seconds=train_seconds,
    )
    _write_model_dir(out, encoder, chosen.head, metadata)
    total = time.perf_counter() - t_start
    logger.info("wrote model %s to %s in %s", metadata.version, out, format_eta(total))
    return TrainResult(
        model_dir=out,
        version=metadata.version,
        labels=labels,
        temperature=chosen.temperature,
        oos_threshold=chosen.oos_threshold,
        metrics=metrics,
        steps=steps,
        train_seconds=train_seconds,
        total_seconds=total,
        history=history,
        candidate_heads=candidates,
    )


# --------------------------------------------------------------------------------------------
# the steps of train_model


def _centroids(
    encoder: Any, texts: Sequence[str], y: np.ndarray, n_labels: int, config: TrainConfig
) -> np.ndarray:
    """L2-normalised class centroids of the starting encoder (the cosine head's start),
    estimated on at most ``centroid_examples`` examples per class (cheap on big data sets); a
    class without training texts keeps a zero row."""
    rng = np.random.default_rng(config.seed)
    sample = np.concatenate(
        [
            rng.permutation(np.flatnonzero(y == i))[: config.centroid_examples]
            for i in range(n_labels)
        ]
    ).astype(int)
    embeddings = encode_texts(encoder, [texts[i] for i in sample])
    y_sample = y[sample]
    centroids = np.zeros((n_labels, embeddings.shape[1]), dtype=np.float32)
    for i in range(n_labels):
        if (y_sample == i).any():
            c = embeddings[y_sample == i].mean(axis=0)
            centroids[i] = c / (np.linalg.norm(c) + 1e-12)
    return centroids


@dataclass(frozen=True, slots=True)
class _Validation:
    """The validation rows as the heads are calibrated on them: their embeddings and labels,
    and the rows whose label the model has (``known``) with those labels' indices."""

    emb: np.ndarray
    labels: list[str]
    index: dict[str, int]  # the model's label -> its column
    known: np.ndarray
    targets: np.ndarray

    @classmethod
    def of(cls, rows: Sequence[Record], emb: np.ndarray, labels: Sequence[str]) -> _Validation:
        index = {lab: i for i, lab in enumerate(labels)}
        y = [r.label for r in rows]
        known = np.array([lab in index for lab in y])
        return cls(emb, y, index, known, np.array([index[lab] for lab in y if lab in index]))

    def logits(self, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.emb @ W.T + b


def _candidate_heads(
    encoder: Any,
    texts: Sequence[str],
    y: np.ndarray,
    cos_head: np.ndarray,
    *,
    validation: _Validation | None,
    n_labels: int,
    config: TrainConfig,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Uncalibrated (W, b) of the heads: ``cosine`` (the trained head scaled by ``scale``) and,
    unless the published head is ``cosine``, ``logreg`` (C=``head_c`` on the tuned embeddings
    of ``texts``) and ``ensemble`` (the mean of both heads' logits, each divided by its own
    temperature on validation: one linear layer)."""
    cosine = (config.scale * cos_head).astype(np.float32), np.zeros(n_labels, np.float32)
    heads = {"cosine": cosine}
    if config.head == "cosine":
        return heads
    emb = encode_texts(encoder, texts)
    heads["logreg"] = fit_logreg_head(emb, y, n_labels, c=config.head_c, seed=config.seed)
    (w_cos, b_cos), (w_lr, b_lr) = heads["cosine"], heads["logreg"]
    t_cos = _component_temperature(validation, w_cos, b_cos, config=config)
    t_lr = _component_temperature(validation, w_lr, b_lr, config=config)
    heads["ensemble"] = (
        ((w_cos / t_cos + w_lr / t_lr) / 2).astype(np.float32),
        ((b_cos / t_cos + b_lr / t_lr) / 2).astype(np.float32),
    )
    return heads


def _component_temperature(
    validation: _Validation | None, W: np.ndarray, b: np.ndarray, *, config: TrainConfig
) -> float:
    """The NLL temperature of one head on the in-label validation rows (1 without them)."""
    if validation is None or not config.calibrate or not validation.known.any():
        return 1.0
    return fit_temperature(validation.logits(W, b)[validation.known], validation.targets)


def _calibrate(
    name: str,
    validation: _Validation | None,
    W: np.ndarray,
    b: np.ndarray,
    *,
    labels: list[str],
    config: TrainConfig,
) -> CandidateHead:
    """Temperature (and out-of-scope logit offset, folded into the bias), OOS threshold and
    validation metrics of the head ``name`` = (W, b)."""
    if validation is None:
        return CandidateHead(Head(W, b), 1.0, None, {})
    oos = config.oos_label
    known, targets = validation.known, validation.targets
    temperature = 1.0
    metrics: dict[str, Any] = {}
    val_logits = validation.logits(W, b)
    raw = softmax(val_logits)
    oos_column = validation.index.get(oos)
    if (
        config.calibrate
        and config.calibrate_oos_offset
        and oos_column is not None
        and (targets == oos_column).any()
    ):
        temperature, beta = fit_temperature_and_offset(val_logits[known], targets, oos_column)
        b = b.copy()
        b[oos_column] += np.float32(temperature * beta)  # folded into the head
        val_logits = validation.logits(W, b)
        metrics["oos_logit_offset"] = float(temperature * beta)
    elif config.calibrate and known.any():
        temperature = fit_temperature(val_logits[known], targets)
    probs = softmax(val_logits / temperature)
    ece_before = expected_calibration_error(
        raw[known].max(axis=1), raw[known].argmax(axis=1) == targets
    )
    y_val = validation.labels
    threshold = choose_oos_threshold(probs, labels, y_val, oos)
    report = compute_report(labels, probs, y_val, oos_label=oos, oos_threshold=threshold)
    metrics.update(
        {
            "val": report.to_dict(details=False),
            "val_ece_before_calibration": ece_before,
            "val_ece_after_calibration": report.ece,
        }
    )
    logger.info(
        "validation, %s head: accuracy %.4f, closed-set %s, macro-F1 %.4f, ECE %.4f -> %.4f "
        "(T=%.3f), OOS threshold %s",
        name,
        report.accuracy,
        "n/a" if report.closed_set_accuracy is None else f"{report.closed_set_accuracy:.4f}",
        report.macro_f1,
        ece_before,
        report.ece,
        temperature,
        threshold,
    )
    return CandidateHead(Head(W, b), temperature, threshold, metrics)


def _model_metadata(
    chosen: CandidateHead,
    labels: list[str],
    metrics: dict[str, Any],
    config: TrainConfig,
    *,
    base_model: str | os.PathLike[str] | None,
    parent: ModelMetadata | None,
    train_seconds: float,
) -> ModelMetadata:
    """The metadata of the trained model; its version hashes the head, config and labels.
    ``train_seconds`` (the fine-tuning time) is kept as an extra key, as it always was."""
    return ModelMetadata(
        version=_make_version(chosen.head.weight, config, labels),
        labels=tuple(labels),
        oos_label=config.oos_label,
        oos_threshold=chosen.oos_threshold,
        temperature=chosen.temperature,
        base_model=_base_model_name(base_model, parent),
        parent_version=parent.version if parent is not None else None,
        created_at=datetime.now(UTC).isoformat(),
        hyperparameters=asdict(config),
        metrics=metrics,
        max_seq_length=config.max_seq_length,
        embedding_dim=chosen.head.weight.shape[1],
        extra={"train_seconds": round(train_seconds, 1)},
    )


def _base_model_name(
    base_model: str | os.PathLike[str] | None, parent: ModelMetadata | None
) -> str:
    """What the metadata records as ``base_model``: the parent's base model on a warm
    start, the bundled model's name, or the directory trained from."""
    if parent is not None:
        return parent.base_model
    return BUNDLED_BASE_NAME if base_model is None else str(base_model)


def _write_model_dir(out: Path, encoder: Any, head: Head, metadata: ModelMetadata) -> None:
    """Write to a temporary sibling, then rename: readers never see a partial directory. The
    sibling is made by ``mkdtemp`` (0700), so it gets the shared folder mode before the rename
    (files inside are created with the umask's mode already)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, shared_dir_mode())
        encoder.save(str(tmp / ENCODER_DIR))
        head.write(tmp)
        metadata.write(tmp)
        if out.exists():
            out.rmdir()  # empty (checked by the caller)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
