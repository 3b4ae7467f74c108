"""Fine-tune the sentence encoder for intent classification and write a model directory.

Recipe (defaults in :class:`TrainConfig`):

1. Pairs of same-intent examples (``tasks.pairs.build_pairs``, budget linear in the data) are
   packed into batches whose pairs all have different intents, so in-batch negatives are true
   negatives.
2. One compact torch loop (AdamW, linear warm-up then linear decay, dynamic padding, short
   ``max_seq_length``) optimises the encoder jointly with a cosine classifier head (cross-entropy,
   head initialised from class centroids) plus MultipleNegativesRankingLoss on the pairs.
3. The final head is an L2-regularised logistic regression on the tuned embeddings.
4. A temperature is fitted on validation (NLL) — jointly with an offset on the out-of-scope
   logit when validation has out-of-scope rows — and the out-of-scope threshold is chosen on
   validation when it has out-of-scope rows.

The output follows docs/ARCHITECTURE.md (metadata.json, encoder/, head.npz).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tasks.evaluate import (
    EvalReport,
    bundled_base_model,
    choose_oos_threshold,
    compute_report,
    encode_texts,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_and_offset,
    load_encoder,
    read_metadata,
    softmax,
)
from tasks.pairs import Pair, build_pairs
from tasks.records import Record

logger = logging.getLogger(__name__)

BUNDLED_BASE_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class TrainConfig:
    """Every training hyperparameter (recorded in metadata.json)."""

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
        if self.batch_size < 2:
            raise ValueError(f"batch_size: expected >= 2, found {self.batch_size}")
        if self.learning_rate <= 0 or self.head_learning_rate <= 0:
            raise ValueError("learning rates must be positive")
        if self.loss not in ("ce", "mnrl", "ce+mnrl"):
            raise ValueError(f"loss: expected 'ce', 'mnrl' or 'ce+mnrl', found {self.loss!r}")
        if self.head not in ("logreg", "cosine"):
            raise ValueError(f"head: expected 'logreg' or 'cosine', found {self.head!r}")


@dataclass(frozen=True)
class TrainResult:
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
# batching


def distinct_label_batches(
    pairs: Sequence[Pair], batch_size: int, rng: random.Random
) -> list[list[Pair]]:
    """Shuffle ``pairs`` into batches where no two pairs share a label (a batch is cut short
    when fewer labels are left than ``batch_size``)."""
    pending = list(pairs)
    rng.shuffle(pending)
    batches: list[list[Pair]] = []
    while pending:
        batch: list[Pair] = []
        used: set[str] = set()
        rest: list[Pair] = []
        for pair in pending:
            if len(batch) < batch_size and pair.label not in used:
                batch.append(pair)
                used.add(pair.label)
            else:
                rest.append(pair)
        batches.append(batch)
        pending = rest
    return batches


def _epoch_batches(
    pairs: Sequence[Pair], config: TrainConfig, steps: int, seed: int
) -> list[list[Pair]]:
    """``steps`` batches, reshuffling the pairs each pass."""
    rng = random.Random(seed)
    out: list[list[Pair]] = []
    while len(out) < steps:
        # Cheap greedy packing; full batches first (the short tail batches go last).
        epoch = distinct_label_batches(pairs, config.batch_size, rng)
        epoch.sort(key=len, reverse=True)
        full = [b for b in epoch if len(b) >= min(config.batch_size, 2)]
        if not full:
            raise ValueError("cannot form a batch of two pairs: need at least two intents")
        rng.shuffle(full)
        out.extend(full)
    return out[:steps]


# --------------------------------------------------------------------------------------------
# helpers


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _resolve_base(base_model: str | os.PathLike[str] | None) -> tuple[str, dict[str, Any] | None]:
    """(encoder path, parent metadata or None) for a base model argument."""
    if base_model is None:
        return bundled_base_model(), None
    p = Path(base_model)
    if (p / "metadata.json").exists():
        if not (p / "encoder").is_dir():
            raise FileNotFoundError(
                f"{p}: has metadata.json but no encoder/ directory; expected a model "
                "directory written by `prompt-capture train`"
            )
        return str(p / "encoder"), read_metadata(p)
    if p.is_dir():
        return str(p), None
    raise FileNotFoundError(
        f"{p}: not a directory; expected a model directory (metadata.json + encoder/) or a "
        "sentence-transformers model directory"
    )


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


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


# --------------------------------------------------------------------------------------------
# training


def _fine_tune(
    encoder: Any,
    *,
    pairs: Sequence[Pair],
    label_index: dict[str, int],
    centroids: np.ndarray,
    config: TrainConfig,
    steps: int,
    progress: bool,
    oos_label: str,
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """The training loop; returns the trained cosine head (rows L2-normalised) and history."""
    import torch
    import torch.nn.functional as F

    encoder.train()
    head = torch.nn.Parameter(torch.tensor(centroids, dtype=torch.float32))
    no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
    named = list(encoder.named_parameters())
    groups = [
        {
            "params": [p for n, p in named if not any(k in n for k in no_decay)],
            "weight_decay": config.weight_decay,
            "lr": config.learning_rate,
        },
        {
            "params": [p for n, p in named if any(k in n for k in no_decay)],
            "weight_decay": 0.0,
            "lr": config.learning_rate,
        },
        {"params": [head], "weight_decay": 0.0, "lr": config.head_learning_rate},
    ]
    optimizer = torch.optim.AdamW(groups)
    warmup = max(1, int(steps * config.warmup_ratio))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = _epoch_batches(pairs, config, steps, config.seed)
    use_ce = config.loss in ("ce", "ce+mnrl")
    use_mnrl = config.loss in ("mnrl", "ce+mnrl")
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    running = 0.0
    for step, batch in enumerate(batches):
        texts = [p.anchor for p in batch] + [p.positive for p in batch]
        with_neg = use_mnrl and all(p.negative is not None for p in batch)
        if with_neg:
            texts += [str(p.negative) for p in batch]
        features = encoder.preprocess(texts)
        emb = F.normalize(encoder(features)["sentence_embedding"], dim=-1)
        m = len(batch)
        loss = torch.zeros(())
        if use_ce:
            targets = torch.tensor([label_index[p.label] for p in batch] * 2)
            logits = config.scale * emb[: 2 * m] @ F.normalize(head, dim=-1).T
            loss = loss + F.cross_entropy(logits, targets)
        if use_mnrl:
            keep = torch.tensor([p.label != oos_label for p in batch])
            if int(keep.sum()) >= 2:
                anchors = emb[:m][keep]
                candidates = emb[m : 2 * m][keep]
                if with_neg:
                    candidates = torch.cat([candidates, emb[2 * m :][keep]])
                sims = config.scale * anchors @ candidates.T
                target = torch.arange(anchors.shape[0])
                loss = loss + F.cross_entropy(sims, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += float(loss.detach())
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            eta = elapsed / (step + 1) * (steps - step - 1)
            avg = running / ((step % config.log_every) + 1)
            history.append({"step": step + 1, "loss": avg, "elapsed_s": elapsed})
            if progress:
                logger.info(
                    "step %d/%d loss %.4f elapsed %s eta %s",
                    step + 1,
                    steps,
                    avg,
                    _format_eta(elapsed),
                    _format_eta(eta),
                )
            running = 0.0
    encoder.eval()
    trained = F.normalize(head.detach(), dim=-1).numpy().astype(np.float32)
    return trained, history


def _make_version(W: np.ndarray, config: TrainConfig, labels: Sequence[str]) -> str:
    digest = hashlib.sha256()
    digest.update(W.tobytes())
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update("\n".join(labels).encode())
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{digest.hexdigest()[:8]}"


def plan_steps(n_pairs: int, config: TrainConfig) -> int:
    """Optimiser steps: ``epochs`` passes over the pairs, at least ``min_steps``, at most
    ``max_steps``."""
    per_epoch = math.ceil(n_pairs / config.batch_size)
    steps = max(config.min_steps, math.ceil(per_epoch * config.epochs))
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    return max(steps, 1)


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
    """
    import torch

    config = config or TrainConfig()
    t_start = time.perf_counter()
    out = Path(output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out}: already exists and is not empty; choose a new output directory"
        )
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    _seed_everything(config.seed)

    oos = config.oos_label
    train_rows = [r for r in train if config.oos_as_class or r.label != oos]
    labels = sorted({r.label for r in train_rows})
    if len(labels) < 2:
        raise ValueError(
            f"training data: expected at least 2 labels, found {labels}; add examples of more "
            "intents"
        )
    label_index = {lab: i for i, lab in enumerate(labels)}
    encoder_path, parent = _resolve_base(base_model)
    encoder = load_encoder(encoder_path, max_seq_length=config.max_seq_length)
    if on_encoder_ready is not None:
        on_encoder_ready(encoder)
    dim = int(encoder.get_embedding_dimension() or 0)

    texts = [r.text for r in train_rows]
    y = np.array([label_index[r.label] for r in train_rows])
    # Cosine head initialised from class centroids of the starting encoder, estimated on at most
    # `centroid_examples` examples per class (cheap on big data sets).
    rng = np.random.default_rng(config.seed)
    sample = np.concatenate(
        [
            rng.permutation(np.flatnonzero(y == i))[: config.centroid_examples]
            for i in range(len(labels))
        ]
    )
    base_emb = encode_texts(encoder, [texts[i] for i in sample])
    y_sample = y[sample]
    centroids = np.zeros((len(labels), dim), dtype=np.float32)
    for i in range(len(labels)):
        c = base_emb[y_sample == i].mean(axis=0)
        centroids[i] = c / (np.linalg.norm(c) + 1e-12)

    if pairs is not None:
        training_pairs = [p for p in pairs if p.label in label_index]
        if not training_pairs:
            raise ValueError(
                f"pairs: expected pairs whose labels occur in the training data, found none of "
                f"{len(pairs)}; rebuild the pairs from this training file"
            )
    else:
        n_pairs = config.max_pairs
        if n_pairs is None:
            n_pairs = max(round(config.pairs_per_example * len(train_rows)), len(labels))
        training_pairs = build_pairs(
            train_rows,
            max_pairs=n_pairs,
            seed=config.seed,
            with_negatives=config.hard_negatives,
            hard_negatives=_confusions(base_emb, y_sample, centroids, labels)
            if config.hard_negatives
            else None,
        )
    if extra_pairs:
        training_pairs += [p for p in extra_pairs if p.label in label_index]
    steps = plan_steps(len(training_pairs), config)
    logger.info(
        "training %d labels on %d examples: %d pairs, %d steps of %d pairs (%s)",
        len(labels),
        len(train_rows),
        len(training_pairs),
        steps,
        config.batch_size,
        config.loss,
    )
    t_train = time.perf_counter()
    cos_head, history = _fine_tune(
        encoder,
        pairs=training_pairs,
        label_index=label_index,
        centroids=centroids,
        config=config,
        steps=steps,
        progress=progress,
        oos_label=oos,
    )
    train_seconds = time.perf_counter() - t_train

    emb = encode_texts(encoder, texts)
    if config.head == "logreg":
        W, b = fit_logreg_head(emb, y, len(labels), c=config.head_c, seed=config.seed)
    else:
        W, b = (config.scale * cos_head).astype(np.float32), np.zeros(len(labels), np.float32)

    temperature = 1.0
    threshold: float | None = None
    metrics: dict[str, Any] = {"train_examples": len(train_rows), "steps": steps}
    if val:
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
        report: EvalReport = compute_report(
            labels, probs, y_val, oos_label=oos, oos_threshold=threshold
        )
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
            "validation: accuracy %.4f, closed-set %.4s, macro-F1 %.4f, ECE %.4f -> %.4f "
            "(T=%.3f), OOS threshold %s",
            report.accuracy,
            report.closed_set_accuracy,
            report.macro_f1,
            ece_before,
            report.ece,
            temperature,
            threshold,
        )

    version = _make_version(W, config, labels)
    metadata = {
        "version": version,
        "labels": labels,
        "oos_label": oos,
        "oos_threshold": threshold,
        "temperature": temperature,
        "base_model": (parent or {}).get("base_model")
        or (BUNDLED_BASE_NAME if base_model is None else str(base_model)),
        "parent_version": (parent or {}).get("version"),
        "created_at": datetime.now(UTC).isoformat(),
        "hyperparameters": asdict(config),
        "metrics": metrics,
        "max_seq_length": config.max_seq_length,
        "embedding_dim": dim,
        "train_seconds": round(train_seconds, 1),
    }
    _write_model_dir(out, encoder, W, b, metadata)
    total = time.perf_counter() - t_start
    logger.info("wrote model %s to %s in %s", version, out, _format_eta(total))
    return TrainResult(
        model_dir=out,
        version=version,
        labels=labels,
        temperature=temperature,
        oos_threshold=threshold,
        metrics=metrics,
        steps=steps,
        train_seconds=train_seconds,
        total_seconds=total,
        history=history,
    )


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


def _write_model_dir(
    out: Path, encoder: Any, W: np.ndarray, b: np.ndarray, metadata: dict[str, Any]
) -> None:
    """Write to a temporary sibling, then rename: readers never see a partial directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        encoder.save(str(tmp / "encoder"))
        np.savez(tmp / "head.npz", W=W.astype(np.float32), b=b.astype(np.float32))
        (tmp / "metadata.json").write_text(
            json.dumps(metadata, indent=2, sort_keys=True), encoding="utf-8"
        )
        if out.exists():
            out.rmdir()  # empty (checked by the caller)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
