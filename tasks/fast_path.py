"""Build the fast path of an exported model directory (the cascade served by
``capture.fast_path``): distil a static embedding table from the fine-tuned encoder, fit a
linear head that imitates the exported model's decisions, and fit the confidence threshold on
validation.

1. **Distillation** (the model2vec method, implemented here: the ``model2vec`` package's
   ``distill`` extra pins ``transformers<5.4``, older than this project's). Every vocabulary token
   goes through the fine-tuned transformer alone, as ``[SEP] token [CLS]`` (model2vec's reversed
   order), and the mean of the three output vectors is its row; PCA to ``pca_dims`` dimensions
   (centred, no whitening); then SIF weighting with Zipf-estimated frequencies: row ``r`` (token
   id order, which follows frequency in WordPiece vocabularies) is scaled by
   ``sif / (sif + p(r))`` with ``p(r)`` proportional to ``1 / (r + 2)``. No data is needed.
2. **Head**: multinomial logistic regression on the static embeddings of the training texts,
   with the **exported model's decision** (``model.onnx``, int8 when published; out-of-scope
   included) as the target, not the gold label: the fast path is meant to agree with the model
   it hands the rest to. ``C`` is chosen from ``head_c`` by the share answered on validation.
3. **Threshold**: validation texts are ranked by the fast path's top probability; the threshold
   is the probability of the last text of the longest prefix whose top-1 agreement with the
   exported model is at least ``target_agreement`` (99.5%). So on validation the answered texts
   agree at >= 99.5%, and the cascade as a whole (answered + handed over) agrees at more. No
   prefix qualifies: no fast path is written. Without validation texts, ``holdout_share`` of the
   training texts are held out for the threshold.

The table, head and threshold are written as ``fast_path.npz`` and the ``fast_path`` section of
``metadata.json`` (``capture.model_dir``, the format's owner). Every export for serving
(``tasks.deploy.export_model``: ``prompt-capture export-onnx``, the deploy and stage-candidate
flows) calls :func:`fast_path_for_serving` after the ONNX export when
``PROMPT_CAPTURE_FAST_PATH`` is on; the export itself removes the fast path fitted to the
``model.onnx`` it replaces.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from capture.errors import UserError
from capture.fast_path import FastPath
from capture.model_dir import (
    ENCODER_DIR,
    SERVING_FILES,
    TOKENIZER_FILE,
    FastPathMetadata,
    FastPathTables,
    ModelMetadata,
    fast_path_labels,
    missing_files,
)
from tasks.json_values import json_fields
from tasks.records import load_records
from tasks.retrain import TRAINING_FILE, record_metrics
from tasks.train import fit_logreg_head

if TYPE_CHECKING:
    from capture.classifier import OnnxClassifier
    from capture.settings import Settings

logger = logging.getLogger(__name__)

METRICS_KEY = "fast_path"  # where metrics.json records the build report


class FastPathError(UserError, ValueError):
    """The fast path cannot be built as asked; the message names the input and the fix."""


@dataclass(frozen=True, slots=True)
class FastPathConfig:
    """How a fast path is built (see the module docstring)."""

    pca_dims: int = 256
    sif_coefficient: float = 1e-4
    head_c: tuple[float, ...] = (10.0, 100.0)
    target_agreement: float = 0.995
    holdout_share: float = 0.2  # of the training texts, when there are no validation texts
    vocab_batch: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pca_dims < 1:
            raise FastPathError(f"pca_dims: expected >= 1, found {self.pca_dims}")
        if not 0.0 < self.sif_coefficient < 1.0:
            raise FastPathError(
                f"sif_coefficient: expected in (0, 1), found {self.sif_coefficient}"
            )
        if not self.head_c or any(c <= 0 for c in self.head_c):
            raise FastPathError(f"head_c: expected positive numbers, found {self.head_c}")
        if not 0.0 < self.target_agreement <= 1.0:
            raise FastPathError(
                f"target_agreement: expected in (0, 1], found {self.target_agreement}"
            )
        if not 0.0 < self.holdout_share < 1.0:
            raise FastPathError(f"holdout_share: expected in (0, 1), found {self.holdout_share}")


@dataclass(frozen=True, slots=True)
class FastPathReport:
    """What one build did. ``published`` is False (and nothing was written) when no threshold
    reaches the target agreement on validation; ``reason`` says why."""

    model_dir: Path
    published: bool
    reason: str
    threshold: float | None
    head_c: float | None
    val_share: float  # share of validation texts the fast path answers
    val_agreement_answered: float | None  # agreement with the model on those
    val_agreement_cascade: float  # the cascade's agreement on all validation texts
    n_train: int
    n_val: int
    distill_seconds: float
    total_seconds: float
    candidates: list[dict[str, float | None]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_fields(self)


# 1. Distillation.


def distill_static_table(
    encoder_dir: Path,
    tokenizer_file: Path,
    *,
    pca_dims: int = 256,
    sif_coefficient: float = 1e-4,
    token_ids: Sequence[int] | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """The static table (vocab_size x dims, float32) of the encoder in ``encoder_dir`` (a
    sentence-transformers directory) over the vocabulary of ``tokenizer_file``.

    ``token_ids`` limits the forward passes to those tokens (the other rows stay zero: they add
    nothing to a mean that is L2-normalised afterwards); None is the whole vocabulary. ``dims``
    is ``pca_dims``, or fewer when there are fewer tokens or hidden dimensions.
    """
    import torch
    from tokenizers import Tokenizer

    from tasks.evaluate import load_encoder

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    vocab_size = tokenizer.get_vocab_size()
    bos, *_, eos = tokenizer.encode("a").ids  # [CLS] a [SEP]: the special tokens around a text
    ids = np.arange(vocab_size) if token_ids is None else np.unique(np.asarray(token_ids))
    if ids.size == 0 or ids.min() < 0 or ids.max() >= vocab_size:
        raise FastPathError(f"token_ids: expected ids in [0, {vocab_size}), found {ids[:5]}…")
    transformer = load_encoder(encoder_dir)[0].auto_model.eval()
    rows = []
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            chunk = torch.as_tensor(ids[start : start + batch_size], dtype=torch.long)
            batch = torch.stack(
                [torch.full_like(chunk, eos), chunk, torch.full_like(chunk, bos)], dim=1
            )
            out = transformer(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                token_type_ids=torch.zeros_like(batch),
            ).last_hidden_state
            rows.append(out.mean(dim=1).float().numpy())
    vectors = np.concatenate(rows).astype(np.float64)
    dims = min(pca_dims, vectors.shape[1], max(1, len(ids) - 1))
    centred = vectors - vectors.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ components[:dims].T
    table = np.zeros((vocab_size, dims), dtype=np.float64)
    table[ids] = projected
    inv_rank = 1.0 / np.arange(2, vocab_size + 2)
    frequency = inv_rank / inv_rank.sum()
    table *= (sif_coefficient / (sif_coefficient + frequency))[:, None]
    # As served: the file stores float16, so the head is fitted on the same rounded values.
    return table.astype(np.float16).astype(np.float32)


# 2. Head and 3. threshold.


def teacher_decisions(classifier: OnnxClassifier, texts: Sequence[str]) -> list[str]:
    """The served model's intent for each text (its OOS threshold applied), in order."""
    out: list[str] = []
    for start in range(0, len(texts), 256):
        out.extend(p.intent for p in classifier.predict_batch(texts[start : start + 256]))
    return out


def fit_threshold(
    confidence: np.ndarray, agree: np.ndarray, target: float
) -> tuple[float, int] | None:
    """The lowest top probability at which the texts at or above it agree with the model at
    ``target`` or more (the longest qualifying prefix of the texts ranked by confidence), and
    how many texts that answers; None when not even the most confident text qualifies."""
    if len(confidence) == 0:
        return None
    order = np.argsort(-confidence, kind="stable")
    running = np.cumsum(agree[order]) / np.arange(1, len(order) + 1)
    qualifying = np.flatnonzero(running >= target)
    if qualifying.size == 0:
        return None
    last = int(qualifying[-1])
    threshold = float(confidence[order[last]])
    if threshold <= 0.0:
        return None
    return threshold, int(np.sum(confidence >= threshold))


def _fast_path(
    table: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    section: FastPathMetadata,
    model_dir: Path,
) -> FastPath:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / TOKENIZER_FILE))
    tokenizer.no_padding()
    return FastPath(section, FastPathTables(table, weight, bias), tokenizer, top_k=1)


def build_fast_path(
    model_dir: Path | str,
    train_texts: Sequence[str],
    val_texts: Sequence[str] | None = None,
    *,
    config: FastPathConfig | None = None,
    threads: int = 1,
    token_ids: Sequence[int] | None = None,
) -> FastPathReport:
    """Build and write the fast path of the exported ``model_dir`` (see the module docstring);
    returns the report. ``token_ids`` limits the distillation to those tokens (tests).

    Raises :class:`FastPathError` when the directory is not exported or there are no texts.
    """
    from capture.classifier import OnnxClassifier

    config = config or FastPathConfig()
    started = time.perf_counter()
    model_dir = Path(model_dir)
    missing = missing_files(model_dir, SERVING_FILES)
    if not (model_dir / ENCODER_DIR).is_dir():
        missing.append(ENCODER_DIR)
    if missing:
        raise FastPathError(
            f"{model_dir}: missing {', '.join(missing)}; the fast path is built from an exported "
            "model directory with its encoder (train, then export-onnx)"
        )
    train = [t for t in train_texts if t.strip()]
    val = [t for t in (val_texts or []) if t.strip()]
    if not val:
        rng = random.Random(config.seed)
        shuffled = rng.sample(train, len(train))
        cut = max(1, int(len(shuffled) * config.holdout_share))
        val, train = shuffled[:cut], shuffled[cut:]
    if len(train) < 2 or not val:
        raise FastPathError(
            f"{model_dir}: the fast path needs training texts (found {len(train)}) and "
            "validation texts; pass the model's training data"
        )
    meta = ModelMetadata.read(model_dir)
    labels = fast_path_labels(meta.labels, meta.oos_label)
    index = {label: i for i, label in enumerate(labels)}
    teacher = OnnxClassifier(model_dir, threads=threads, fast_path=False)
    logger.info(
        "fast path of %s: teacher decisions on %d + %d texts", model_dir.name, len(train), len(val)
    )
    y_train = np.array([index[x] for x in teacher_decisions(teacher, train)])
    y_val = np.array([index[x] for x in teacher_decisions(teacher, val)])

    distill_started = time.perf_counter()
    table = distill_static_table(
        model_dir / ENCODER_DIR,
        model_dir / TOKENIZER_FILE,
        pca_dims=config.pca_dims,
        sif_coefficient=config.sif_coefficient,
        token_ids=token_ids,
        batch_size=config.vocab_batch,
    )
    distill_seconds = time.perf_counter() - distill_started
    logger.info("distilled a %s static table in %.1fs", table.shape, distill_seconds)
    section = FastPathMetadata(
        labels=labels,
        threshold=1.0,
        embedding_dim=table.shape[1],
        vocab_size=table.shape[0],
        teacher_version=meta.version,
        teacher_quantization=teacher.quantization,
        created_at=datetime.now(UTC).isoformat(),
        hyperparameters={**asdict(config), "head_c": list(config.head_c)},
    )
    zero = np.zeros((len(labels), table.shape[1]), dtype=np.float32)
    featuriser = _fast_path(table, zero, np.zeros(len(labels), np.float32), section, model_dir)
    x_train = featuriser.embed(train)

    best: tuple[int, float, float, np.ndarray, np.ndarray] | None = None
    candidates: list[dict[str, float | None]] = []
    for c in config.head_c:
        weight, bias = fit_logreg_head(
            x_train, y_train, len(labels), c=c, seed=config.seed, max_iter=500
        )
        probs = _fast_path(table, weight, bias, section, model_dir).predict_proba(val)
        fitted = fit_threshold(
            probs.max(axis=1), probs.argmax(axis=1) == y_val, config.target_agreement
        )
        answered = fitted[1] if fitted else 0
        candidates.append(
            {"C": c, "threshold": fitted[0] if fitted else None, "val_share": answered / len(val)}
        )
        logger.info("fast path head C=%g: answers %d/%d validation texts", c, answered, len(val))
        if fitted is not None and (best is None or answered > best[0]):
            best = (answered, c, fitted[0], weight, bias)

    if best is None:
        return FastPathReport(
            model_dir=model_dir,
            published=False,
            reason=(
                f"no threshold reaches {config.target_agreement:.1%} agreement with the model on "
                f"{len(val)} validation texts; nothing written"
            ),
            threshold=None,
            head_c=None,
            val_share=0.0,
            val_agreement_answered=None,
            val_agreement_cascade=1.0,
            n_train=len(train),
            n_val=len(val),
            distill_seconds=distill_seconds,
            total_seconds=time.perf_counter() - started,
            candidates=candidates,
        )
    _, c, threshold, weight, bias = best
    probs = _fast_path(table, weight, bias, section, model_dir).predict_proba(val)
    answered = probs.max(axis=1) >= threshold
    agree = probs.argmax(axis=1) == y_val
    report = FastPathReport(
        model_dir=model_dir,
        published=True,
        reason="published",
        threshold=threshold,
        head_c=c,
        val_share=float(answered.mean()),
        val_agreement_answered=float(agree[answered].mean()),
        val_agreement_cascade=float(np.where(answered, agree, True).mean()),
        n_train=len(train),
        n_val=len(val),
        distill_seconds=distill_seconds,
        total_seconds=time.perf_counter() - started,
        candidates=candidates,
    )
    section = replace(
        section,
        threshold=threshold,
        metrics={
            "val_share": report.val_share,
            "val_agreement_answered": report.val_agreement_answered,
            "val_agreement_cascade": report.val_agreement_cascade,
            "n_train": len(train),
            "n_val": len(val),
            "head_c": c,
        },
    )
    FastPathTables(table, weight, bias).write(model_dir)  # before the section that names it
    replace(meta, fast_path=section).write(model_dir)
    logger.info(
        "fast path of %s: threshold %.4f answers %.1f%% of validation texts at %.2f%% agreement",
        model_dir.name,
        threshold,
        100 * report.val_share,
        100 * (report.val_agreement_answered or 0.0),
    )
    return report


# The weekly cycle.


def _training_texts(model_dir: Path) -> list[str]:
    """The texts the registry version was trained on (``training.json``'s ``training_data``)."""
    path = model_dir / TRAINING_FILE
    if not path.is_file():
        raise FastPathError(f"{path}: missing; the fast path needs the model's training data")
    info = json.loads(path.read_text(encoding="utf-8"))
    data = info.get("training_data") if isinstance(info, dict) else None
    if not isinstance(data, str) or not Path(data).is_file():
        raise FastPathError(
            f"{path}: field 'training_data' must name an existing training file, found {data!r}"
        )
    return [r.text for r in load_records(Path(data))]


@task(cache_policy=NO_CACHE, name="build-fast-path")
def fast_path_for_serving(
    model_dir: Path,
    *,
    settings: Settings,
    validation_data: Path | None,
    training_data: Path | None = None,
) -> FastPathReport | None:
    """When ``settings.fast_path`` is on, build the fast path of the exported registry version
    ``model_dir`` (training texts from ``training_data``, default the file its
    ``training.json`` names; validation texts from ``validation_data``) and record the report
    under ``fast_path`` in its ``metrics.json``. Off: None, nothing done. A version whose fast
    path cannot be built serves without one (logged as a warning)."""
    if not settings.fast_path:
        return None
    try:
        train = (
            [r.text for r in load_records(training_data)]
            if training_data is not None
            else _training_texts(model_dir)
        )
        val = [r.text for r in load_records(validation_data)] if validation_data else None
        report = build_fast_path(model_dir, train, val, threads=settings.onnx_threads)
    except UserError as exc:
        logger.warning("%s serves without a fast path: %s", model_dir.name, exc)
        return None
    record_metrics(model_dir, METRICS_KEY, report.to_dict())
    if not report.published:
        logger.warning("%s serves without a fast path: %s", model_dir.name, report.reason)
    return report
