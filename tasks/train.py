"""Fine-tune the sentence encoder for intent classification and write a model directory.

Recipe (defaults in :class:`TrainConfig`):

1. Pairs of same-intent examples (``tasks.pairs.build_pairs``, budget linear in the data) are
   packed into batches whose pairs all have different intents, so in-batch negatives are true
   negatives.
2. One compact torch loop (``tasks.fine_tune``: AdamW, linear warm-up then linear decay,
   dynamic padding, short ``max_seq_length``) optimises the encoder jointly with a cosine
   classifier head (cross-entropy, head initialised from class centroids) plus
   MultipleNegativesRankingLoss on the pairs.
3. The final head is an L2-regularised logistic regression on the tuned embeddings.
4. A temperature is fitted on validation (NLL) — jointly with an offset on the out-of-scope
   logit when validation has out-of-scope rows — and the out-of-scope threshold is chosen on
   validation when it has out-of-scope rows.

The output is a model directory (format: ``capture.model_dir``): the encoder, the head and the
metadata, written to a private temporary folder and renamed into place with the shared modes
(folders ``0o777 & ~umask``), so a service running as another Unix user can read it.

Inputs are checked before any model is loaded, and every refusal is a ``UserError`` naming the
real cause: fewer than two labels, intents with too few distinct examples to form a pair (and
which ones), a pair budget or pairs file that covers fewer than two intents, a bad
hyperparameter, an output directory that is not empty, a base model that is not a model.
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
from tasks.evaluate import (
    choose_oos_threshold,
    compute_report,
    encode_texts,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_and_offset,
    load_encoder,
    softmax,
)
from tasks.fine_tune import fine_tune, format_eta, plan_steps, seed_everything
from tasks.pairs import Pair, build_pairs
from tasks.records import Record
from tasks.train_inputs import (
    BaseModelError,
    TrainConfigError,
    TrainingDataError,
    TrainOutputError,
    check_output,
    check_pairs_possible,
    pair_budget,
    resolve_base,
    training_rows,
)

logger = logging.getLogger(__name__)

BUNDLED_BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"
__all__ = [
    "BUNDLED_BASE_NAME",
    "BaseModelError",
    "TrainConfig",
    "TrainConfigError",
    "TrainOutputError",
    "TrainResult",
    "TrainingDataError",
    "fit_logreg_head",
    "train_model",
]


@dataclass(frozen=True)
class TrainConfig:
    """Every training hyperparameter (recorded as ``hyperparameters`` in the model metadata)."""

    seed: int = 0
    # Budget: pairs per example (max_pairs overrides), passes over the pairs, step bounds.
    pairs_per_example: float = 1.0
    max_pairs: int | None = None
    epochs: float = 1.0
    min_steps: int = 150
    max_steps: int | None = None
    batch_size: int = 32  # pairs per batch (2x texts)
    learning_rate: float = 1e-4
    head_learning_rate: float = 1e-2
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_seq_length: int = 48
    loss: Literal["ce", "mnrl", "ce+mnrl"] = "ce+mnrl"
    scale: float = 20.0  # cosine-similarity scale for both losses
    hard_negatives: bool = False
    head: Literal["logreg", "cosine"] = "logreg"
    head_c: float = 10.0
    oos_label: str = "oos"
    oos_as_class: bool = True
    calibrate: bool = True
    # With out-of-scope rows in validation: fit an offset on the out-of-scope logit jointly with
    # the temperature (tasks.evaluate.fit_temperature_and_offset), folded into the head's bias.
    calibrate_oos_offset: bool = True
    centroid_examples: int = 16
    log_every: int = 25
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        """Raises :class:`TrainConfigError` naming the first value out of range."""
        if self.batch_size < 2:
            raise TrainConfigError(f"batch_size: expected >= 2, found {self.batch_size}")
        if self.learning_rate <= 0 or self.head_learning_rate <= 0:
            raise TrainConfigError(
                f"learning_rate and head_learning_rate: expected > 0, found "
                f"{self.learning_rate} and {self.head_learning_rate}"
            )
        if self.max_pairs is not None and self.max_pairs < 0:
            raise TrainConfigError(f"max_pairs: expected >= 0 or unset, found {self.max_pairs}")
        if self.loss not in ("ce", "mnrl", "ce+mnrl"):
            raise TrainConfigError(f"loss: expected 'ce', 'mnrl' or 'ce+mnrl', found {self.loss!r}")
        if self.head not in ("logreg", "cosine"):
            raise TrainConfigError(f"head: expected 'logreg' or 'cosine', found {self.head!r}")


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


# --------------------------------------------------------------------------------------------
# helpers


def fit_logreg_head(
    embeddings: np.ndarray, y: np.ndarray, n_labels: int, *, c: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial L2 logistic regression; returns (W, b) for all ``n_labels`` classes."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=300, random_state=seed)
    clf.fit(embeddings, y)
    W = np.zeros((n_labels, embeddings.shape[1]), dtype=np.float32)
    b = np.full(n_labels, -1e4, dtype=np.float32)  # a class absent from training never wins
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
    ``extra_pairs`` (e.g. from ``convert-to-pairs``) are added to the generated pairs.
    ``pairs``, when given, are the contrastive pairs to train on instead of generated ones (the
    weekly cycle passes the pairs flow's budgeted file, so a retrain costs ``max_pairs``, not
    the size of the training data); ``extra_pairs`` are still added.
    Without ``val``, the temperature is 1 and there is no OOS threshold.

    Every input is checked before the encoder is loaded. Raises (all ``UserError``s)
    :class:`TrainOutputError` (output not empty; a ``FileExistsError``),
    :class:`TrainingDataError` (a ``ValueError``: fewer than two labels; fewer than two intents
    with :data:`tasks.pairs.MIN_EXAMPLES_PER_INTENT` distinct examples, naming those short of
    it; a pair budget or ``pairs`` covering fewer than two intents), :class:`BaseModelError`
    and ``capture.model_dir.ModelDirError`` (a base model that is not a model directory).
    """
    import torch

    config = config or TrainConfig()
    t_start = time.perf_counter()
    out = Path(output_dir)
    check_output(out)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    seed_everything(config.seed)

    rows, labels = training_rows(train, config)
    check_pairs_possible(rows, labels, config, pairs=pairs, extra_pairs=extra_pairs)
    label_index = {lab: i for i, lab in enumerate(labels)}
    encoder_path, parent = resolve_base(base_model)
    encoder = load_encoder(encoder_path, max_seq_length=config.max_seq_length)
    if on_encoder_ready is not None:
        on_encoder_ready(encoder)
    texts = [r.text for r in rows]
    y = np.array([label_index[r.label] for r in rows])
    start = _starting_point(encoder, texts, y, labels, config)
    training_pairs = _training_pairs(
        rows, labels, start, config, pairs=pairs, extra_pairs=extra_pairs
    )
    steps = plan_steps(len(training_pairs), config)
    logger.info(
        "training %d labels on %d examples: %d pairs, %d steps of %d pairs (%s)",
        len(labels),
        len(rows),
        len(training_pairs),
        steps,
        config.batch_size,
        config.loss,
    )
    t_train = time.perf_counter()
    cos_head, history = fine_tune(
        encoder,
        pairs=training_pairs,
        label_index=label_index,
        centroids=start.centroids,
        config=config,
        steps=steps,
        progress=progress,
        oos_label=config.oos_label,
    )
    train_seconds = time.perf_counter() - t_train

    W, b = _final_head(encoder, texts, y, n_labels=len(labels), cos_head=cos_head, config=config)
    calibration = _calibrate(encoder, val, W, b, cos_head=cos_head, labels=labels, config=config)
    metrics = {"train_examples": len(rows), "steps": steps, **calibration.metrics}
    metadata = _model_metadata(
        W,
        labels,
        calibration,
        metrics,
        config,
        base_model=base_model,
        parent=parent,
        train_seconds=train_seconds,
    )
    _write_model_dir(out, encoder, Head(W, calibration.bias), metadata)
    total = time.perf_counter() - t_start
    logger.info("wrote model %s to %s in %s", metadata.version, out, format_eta(total))
    return TrainResult(
        model_dir=out,
        version=metadata.version,
        labels=labels,
        temperature=calibration.temperature,
        oos_threshold=calibration.oos_threshold,
        metrics=metrics,
        steps=steps,
        train_seconds=train_seconds,
        total_seconds=total,
        history=history,
    )


# --------------------------------------------------------------------------------------------
# the steps of train_model


@dataclass(frozen=True)
class _Start:
    """The starting encoder's view of the data: embeddings of a per-class sample, and the class
    centroids the cosine head starts from."""

    embeddings: np.ndarray  # (n_sample, dim) L2-normalised
    y: np.ndarray  # (n_sample,) label indices
    centroids: np.ndarray  # (n_labels, dim) L2-normalised


def _starting_point(
    encoder: Any, texts: Sequence[str], y: np.ndarray, labels: Sequence[str], config: TrainConfig
) -> _Start:
    """Class centroids of the starting encoder, estimated on at most ``centroid_examples``
    examples per class (cheap on big data sets)."""
    rng = np.random.default_rng(config.seed)
    sample = np.concatenate(
        [
            rng.permutation(np.flatnonzero(y == i))[: config.centroid_examples]
            for i in range(len(labels))
        ]
    )
    embeddings = encode_texts(encoder, [texts[i] for i in sample])
    y_sample = y[sample]
    centroids = np.zeros((len(labels), embeddings.shape[1]), dtype=np.float32)
    for i in range(len(labels)):
        c = embeddings[y_sample == i].mean(axis=0)
        centroids[i] = c / (np.linalg.norm(c) + 1e-12)
    return _Start(embeddings, y_sample, centroids)


def _training_pairs(
    rows: Sequence[Record],
    labels: Sequence[str],
    start: _Start,
    config: TrainConfig,
    *,
    pairs: Sequence[Pair] | None,
    extra_pairs: Sequence[Pair] | None,
) -> list[Pair]:
    """The given ``pairs`` (those of known labels), or pairs built from ``rows`` within the
    budget; plus ``extra_pairs`` of known labels."""
    known = set(labels)
    if pairs is not None:
        training_pairs = [p for p in pairs if p.label in known]  # checked non-empty before
    else:
        training_pairs = build_pairs(
            rows,
            max_pairs=pair_budget(rows, labels, config),
            seed=config.seed,
            with_negatives=config.hard_negatives,
            hard_negatives=_confusions(start.embeddings, start.y, start.centroids, labels)
            if config.hard_negatives
            else None,
        )
    if extra_pairs:
        training_pairs += [p for p in extra_pairs if p.label in known]
    return training_pairs


def _final_head(
    encoder: Any,
    texts: Sequence[str],
    y: np.ndarray,
    *,
    n_labels: int,
    cos_head: np.ndarray,
    config: TrainConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the published head: logistic regression on the tuned embeddings, or the
    trained cosine head scaled by ``config.scale``."""
    if config.head == "logreg":
        emb = encode_texts(encoder, texts)
        return fit_logreg_head(emb, y, n_labels, c=config.head_c, seed=config.seed)
    return (config.scale * cos_head).astype(np.float32), np.zeros(n_labels, np.float32)


@dataclass(frozen=True)
class _Calibration:
    temperature: float
    oos_threshold: float | None
    bias: np.ndarray  # the head's bias, the out-of-scope offset folded in
    metrics: dict[str, Any]


def _calibrate(
    encoder: Any,
    val: Sequence[Record] | None,
    W: np.ndarray,
    b: np.ndarray,
    *,
    cos_head: np.ndarray,
    labels: list[str],
    config: TrainConfig,
) -> _Calibration:
    """Temperature (and out-of-scope logit offset), OOS threshold and validation metrics."""
    if not val:
        return _Calibration(1.0, None, b, {})
    oos = config.oos_label
    label_index = {lab: i for i, lab in enumerate(labels)}
    temperature = 1.0
    metrics: dict[str, Any] = {}
    val_emb = encode_texts(encoder, [r.text for r in val])
    val_logits = val_emb @ W.T + b
    known = np.array([r.label in label_index for r in val])
    targets = np.array([label_index[r.label] for r in val if r.label in label_index])
    raw = softmax(val_logits)
    oos_column = label_index.get(oos)
    if (
        config.calibrate
        and config.calibrate_oos_offset
        and oos_column is not None
        and (targets == oos_column).any()
    ):
        temperature, beta = fit_temperature_and_offset(val_logits[known], targets, oos_column)
        b = b.copy()
        b[oos_column] += np.float32(temperature * beta)  # folded into the head
        val_logits = val_emb @ W.T + b
        metrics["oos_logit_offset"] = float(temperature * beta)
    elif config.calibrate and known.any():
        temperature = fit_temperature(val_logits[known], targets)
    probs = softmax(val_logits / temperature)
    ece_before = expected_calibration_error(
        raw[known].max(axis=1), raw[known].argmax(axis=1) == targets
    )
    y_val = [r.label for r in val]
    threshold = choose_oos_threshold(probs, labels, y_val, oos)
    report = compute_report(labels, probs, y_val, oos_label=oos, oos_threshold=threshold)
    cos_pred = (val_emb @ cos_head.T).argmax(axis=1)
    metrics["val_cosine_head_accuracy"] = float(
        np.mean([labels[p] == r.label for p, r in zip(cos_pred, val, strict=True)])
    )
    metrics.update(
        {
            "val": report.to_dict(details=False),
            "val_ece_before_calibration": ece_before,
            "val_ece_after_calibration": report.ece,
        }
    )
    logger.info(
        "validation: accuracy %.4f, closed-set %s, macro-F1 %.4f, ECE %.4f -> %.4f "
        "(T=%.3f), OOS threshold %s",
        report.accuracy,
        "n/a" if report.closed_set_accuracy is None else f"{report.closed_set_accuracy:.4f}",
        report.macro_f1,
        ece_before,
        report.ece,
        temperature,
        threshold,
    )
    return _Calibration(temperature, threshold, b, metrics)


def _model_metadata(
    W: np.ndarray,
    labels: list[str],
    calibration: _Calibration,
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
        version=_make_version(W, config, labels),
        labels=tuple(labels),
        oos_label=config.oos_label,
        oos_threshold=calibration.oos_threshold,
        temperature=calibration.temperature,
        base_model=_base_model_name(base_model, parent),
        parent_version=parent.version if parent is not None else None,
        created_at=datetime.now(UTC).isoformat(),
        hyperparameters=asdict(config),
        metrics=metrics,
        max_seq_length=config.max_seq_length,
        embedding_dim=W.shape[1],
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


def _confusions(
    emb: np.ndarray, y: np.ndarray, centroids: np.ndarray, labels: Sequence[str], top: int = 3
) -> dict[str, list[str]]:
    """{label: the labels whose centroids its examples are closest to, most confused first}."""
    sims = emb @ centroids.T
    counts = np.zeros((len(labels), len(labels)))
    for i in range(len(labels)):
        rows = sims[y == i].copy()
        rows[:, i] = -np.inf
        counts[i] = rows.mean(axis=0)
    counts[np.arange(len(labels)), np.arange(len(labels))] = -np.inf
    return {
        labels[i]: [labels[j] for j in np.argsort(-counts[i])[:top]] for i in range(len(labels))
    }


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
