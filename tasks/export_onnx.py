"""Export a model directory to one self-contained ONNX file for serving.

``model.onnx`` holds the encoder, mean pooling, L2 normalisation, the linear head
(``capture.model_dir.Head``), the temperature and the softmax; its metadata carries the label
list, the version and the out-of-scope settings (``capture.model_dir.OnnxMetadata``), so the
serving side needs nothing else but ``tokenizer.json``.

:func:`export_onnx` runs the steps and judges them:

1. read and check the model directory (``capture.model_dir.read_trained``);
2. trace and fuse the fp32 graph (``tasks.onnx_graph``), which must match the torch model
   (``tasks.evaluate.TorchModel``) on the validation texts or nothing is written;
3. try the int8 recipes (``tasks.onnx_int8``): the first whose top-1 agreement with the torch
   model reaches ``min_agreement`` is published; when none does, the fp32 file is published and
   the report, the ONNX metadata and the log say why;
4. remove the fast path fitted to the ``model.onnx`` being replaced (the ``fast_path`` section of
   ``metadata.json``, then ``fast_path.npz``): it imitates that file's decisions, so no process
   may serve it in front of another (``tasks.deploy`` builds one for the new file when the
   settings turn the fast path on);
5. publish ``model.onnx`` and ``tokenizer.json`` into the directory (``os.replace``).

torch, transformers, sentence-transformers and onnx are imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from capture.classifier import input_feeds, onnx_session
from capture.files import shared_file_mode
from capture.model_dir import (
    ENCODER_DIR,
    FAST_PATH_FILE,
    MODEL_FILE,
    PROBABILITIES,
    QUANTIZATION_INT8,
    QUANTIZATION_NONE,
    TOKENIZER_FILE,
    Head,
    ModelDirError,
    ModelMetadata,
    read_trained,
)
from tasks.json_values import json_fields
from tasks.onnx_graph import (
    DEFAULT_OPSET,
    ExportError,
    Fp32Graph,
    build_fp32,
    set_onnx_metadata,
)
from tasks.onnx_int8 import CALIBRATION_TEXTS, INT8_RECIPES, NO_INT8, Int8Outcome, build_int8

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_VALIDATION_TEXTS",
    "INT8_RECIPES",
    "QUANTIZATION_INT8",
    "QUANTIZATION_NONE",
    "ExportError",
    "ExportReport",
    "export_onnx",
    "onnx_predict_proba",
    "parity",
    "serving_tokenizer",
    "set_onnx_metadata",
]

# An fp32 export that differs from torch by more than this is broken, not imprecise.
FP32_MAX_PROB_DIFF = 1e-3
PARITY_BATCH_SIZE = 64

# Used when the caller passes no validation texts: varied, everyday prompts of several lengths.
DEFAULT_VALIDATION_TEXTS: tuple[str, ...] = (
    "schedule time to work on my assignment tomorrow",
    "add a dentist appointment to my calendar on friday at 3pm",
    "what's the weather going to be like this weekend",
    "remind me to call mom when I get home",
    "how much money is left in my checking account",
    "transfer 200 dollars from savings to checking",
    "play some relaxing jazz",
    "set an alarm for 6:30 am",
    "book a table for four at an italian place tonight",
    "what is the capital of australia",
    "translate good morning into spanish",
    "cancel my meeting with the design team",
    "how long will it take to drive to the airport",
    "order more paper towels",
    "my card was declined at the store, why?",
    "tell me a joke",
    "what time is it in tokyo",
    "I need to reset my password",
    "find me a flight to boston next tuesday",
    "turn off the living room lights",
    "hello",
    "thanks, that's all",
    "can you help me plan a study schedule for finals week, with breaks every hour",
    "what's on my agenda today",
    "how many calories are in a banana",
    "report a lost credit card",
    "what is my credit score",
    "change the language to french",
    "roll a six sided die",
    "who made you",
    "I want to pay my electricity bill",
    "is there traffic on the way to work",
    "how do I say thank you in japanese",
    "move my 2pm call to 4pm",
    "what's the exchange rate between dollars and euros",
    "share my location with alex",
    "block out two hours for deep work every morning next week",
    "what should I cook for dinner with chicken and rice",
    "the app keeps crashing when I open my statements",
    "asdf qwerty",
)


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What :func:`export_onnx` did and how close the published file is to the torch model."""

    model_dir: Path
    version: str
    published: str  # "int8" or "fp32"
    quantization: str  # QUANTIZATION_INT8 or QUANTIZATION_NONE
    agreement: float  # top-1 agreement of the published file with torch, on the validation texts
    max_abs_prob_diff: float  # of the published file
    fp32_agreement: float
    fp32_max_abs_prob_diff: float
    int8_agreement: float | None
    int8_max_abs_prob_diff: float | None
    fp32_size_bytes: int
    int8_size_bytes: int | None
    published_size_bytes: int
    n_validation: int
    min_agreement: float
    fallback_reason: str | None
    fused: bool  # attention/layer-norm/GELU fused by ONNX Runtime's transformer optimizer
    int8_recipe: str | None  # the INT8_RECIPES entry published; None when fp32 is
    int8_attempts: tuple[dict[str, object], ...]  # every recipe tried, in order, with parity
    fast_path_removed: bool  # the directory had a fast path, fitted to the model.onnx replaced
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return json_fields(self)


def serving_tokenizer(encoder_dir: Path, max_seq_length: int) -> Tokenizer:
    """The encoder's tokenizer: pads to the longest input, truncates at ``max_seq_length``."""
    from tokenizers import Tokenizer

    path = encoder_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(
            f"{path}: missing; the encoder must be saved with a fast tokenizer (tokenizer.json)"
        )
    tokenizer = Tokenizer.from_file(str(path))
    padding = tokenizer.padding or {}
    pad_token = str(padding.get("pad_token") or "[PAD]")
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ExportError(
            f"{path}: the padding token {pad_token!r} is not in the vocabulary; save the "
            "encoder with its own tokenizer"
        )
    tokenizer.no_padding()
    tokenizer.enable_padding(
        pad_id=pad_id, pad_token=pad_token, pad_type_id=int(padding.get("pad_type_id") or 0)
    )  # no length: pad to the longest input of each batch
    tokenizer.no_truncation()
    tokenizer.enable_truncation(max_length=max_seq_length)
    return tokenizer


def onnx_predict_proba(
    model_path: Path, tokenizer: Tokenizer, texts: Sequence[str], *, threads: int = 1
) -> np.ndarray:
    """Probabilities of the ONNX file at ``model_path`` for ``texts``, shape
    ``(len(texts), n_labels)``, run in batches of ``PARITY_BATCH_SIZE`` on a session built as
    serving builds it."""
    session = onnx_session(str(model_path), threads=threads)
    rows = []
    for start in range(0, len(texts), PARITY_BATCH_SIZE):
        feeds = input_feeds(tokenizer, texts[start : start + PARITY_BATCH_SIZE])
        rows.append(session.run([PROBABILITIES], feeds)[0])
    return np.concatenate(rows, axis=0)


def parity(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, max absolute probability difference) of two probability matrices."""
    if reference.shape != candidate.shape:
        raise ExportError(
            f"parity check: expected probabilities of shape {reference.shape}, "
            f"found {candidate.shape}; the exported graph is broken: report it as a bug"
        )
    agreement = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    return agreement, float(np.abs(reference - candidate).max())


def _read_source(model_dir: Path) -> tuple[ModelMetadata, Head]:
    try:
        return read_trained(model_dir)
    except ModelDirError as exc:
        raise ExportError(str(exc)) from exc


def _parity_texts(validation_texts: Sequence[str] | None) -> list[str]:
    texts = list(validation_texts) if validation_texts is not None else []
    texts = texts or list(DEFAULT_VALIDATION_TEXTS)
    if not all(isinstance(t, str) for t in texts):
        raise ExportError("validation_texts: expected strings only; pass the texts, not records")
    return texts


def _check_fp32(
    model_dir: Path, graph: Fp32Graph, agreement_of: Callable[[Path], tuple[float, float]]
) -> tuple[float, float]:
    """Parity of the fp32 graph with torch; raises ``ExportError`` when the export is broken."""
    agreement, max_diff = agreement_of(graph.path)
    logger.info("fp32 parity: agreement %.4f, max prob diff %.2e", agreement, max_diff)
    if max_diff > FP32_MAX_PROB_DIFF:
        raise ExportError(
            f"{model_dir}: the fp32 ONNX export differs from the torch model by "
            f"{max_diff:.2e} in probability (limit {FP32_MAX_PROB_DIFF}); the export is "
            "broken, nothing was published"
        )
    return agreement, max_diff


def _export_props(
    published: tuple[float, float], fp32: Fp32Graph, int8: Int8Outcome, texts: int, minimum: float
) -> dict[str, str]:
    """The ``export_*`` metadata_props: the parity figures of the published file."""
    props = {
        "export_agreement": json.dumps(published[0]),
        "export_max_abs_prob_diff": json.dumps(published[1]),
        "export_n_validation": str(texts),
        "export_min_agreement": json.dumps(minimum),
        "export_int8_agreement": json.dumps(int8.agreement),
        "export_fused_attention": json.dumps(fp32.fusion.fused),
        "export_int8_recipe": json.dumps(int8.recipe),
    }
    if int8.fallback:
        props["export_fallback"] = int8.fallback
    return props


def export_onnx(
    model_dir: Path | str,
    *,
    quantize: bool = True,
    validation_texts: Sequence[str] | None = None,
    min_agreement: float = 0.99,
    opset: int = DEFAULT_OPSET,
) -> ExportReport:
    """Write ``model.onnx`` and ``tokenizer.json`` into ``model_dir``; see the module docstring.

    ``validation_texts`` are the texts of the parity check (the validation split of training, as
    a rule); without them a fixed set of everyday prompts is used. The fp32 export must match
    torch (max probability difference <= ``FP32_MAX_PROB_DIFF``) or nothing is written.
    Raises ``ExportError`` naming the file and the fix when the directory cannot be exported.
    """
    from tasks.evaluate import TorchModel

    started = time.perf_counter()
    model_dir = Path(model_dir)
    metadata, head = _read_source(model_dir)
    texts = _parity_texts(validation_texts)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=model_dir))
    try:
        tokenizer = serving_tokenizer(model_dir / ENCODER_DIR, metadata.max_seq_length)
        tokenizer.save(str(work / TOKENIZER_FILE))
        logger.info("exporting %s (version %s) to ONNX fp32", model_dir, metadata.version)
        graph = build_fp32(model_dir, metadata, head, work, opset=opset)
        reference = TorchModel.load(model_dir).predict_proba(texts)

        def agreement_of(path: Path) -> tuple[float, float]:
            return parity(reference, onnx_predict_proba(path, tokenizer, texts))

        fp32 = _check_fp32(model_dir, graph, agreement_of)
        int8 = NO_INT8
        if quantize:
            int8 = build_int8(
                graph,
                work,
                tokenizer=tokenizer,
                calibration_texts=texts[:CALIBRATION_TEXTS],
                agreement_of=agreement_of,
                min_agreement=min_agreement,
                n_validation=len(texts),
            )
            if int8.fallback:
                logger.warning("%s: %s", model_dir, int8.fallback)
        report = _publish(
            model_dir,
            work,
            metadata=metadata,
            graph=graph,
            fp32=fp32,
            int8=int8,
            n_validation=len(texts),
            min_agreement=min_agreement,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = dataclasses.replace(report, seconds=time.perf_counter() - started)
    logger.info(
        "published %s model.onnx for %s (%.1f MB, agreement %.4f) in %.1fs",
        report.published,
        report.version,
        report.published_size_bytes / 1e6,
        report.agreement,
        report.seconds,
    )
    return report


def _publish(
    model_dir: Path,
    work: Path,
    *,
    metadata: ModelMetadata,
    graph: Fp32Graph,
    fp32: tuple[float, float],
    int8: Int8Outcome,
    n_validation: int,
    min_agreement: float,
) -> ExportReport:
    """Write the metadata into the chosen file and move it and the tokenizer into
    ``model_dir``; returns the report (``seconds`` 0: the caller times the whole export)."""
    chosen = int8.path or graph.path
    published = fp32
    if int8.path is not None and int8.agreement is not None and int8.max_abs_prob_diff is not None:
        published = (int8.agreement, int8.max_abs_prob_diff)
    quantization = QUANTIZATION_INT8 if int8.path is not None else QUANTIZATION_NONE
    extra = _export_props(published, graph, int8, n_validation, min_agreement)
    set_onnx_metadata(chosen, metadata.onnx_props(quantization=quantization, extra=extra))
    fp32_size = graph.path.stat().st_size
    published_size = chosen.stat().st_size
    for path in (chosen, work / TOKENIZER_FILE):  # written in a 0700 mkdtemp: mode for sharing
        os.chmod(path, shared_file_mode())
    fast_path_removed = _remove_fast_path(model_dir)  # before the model it imitates is replaced
    os.replace(chosen, model_dir / MODEL_FILE)
    os.replace(work / TOKENIZER_FILE, model_dir / TOKENIZER_FILE)
    return ExportReport(
        model_dir=model_dir,
        version=metadata.version,
        published="int8" if int8.path is not None else "fp32",
        quantization=quantization,
        agreement=published[0],
        max_abs_prob_diff=published[1],
        fp32_agreement=fp32[0],
        fp32_max_abs_prob_diff=fp32[1],
        int8_agreement=int8.agreement,
        int8_max_abs_prob_diff=int8.max_abs_prob_diff,
        fp32_size_bytes=fp32_size,
        int8_size_bytes=int8.size_bytes,
        published_size_bytes=published_size,
        n_validation=n_validation,
        min_agreement=min_agreement,
        fallback_reason=int8.fallback,
        fused=graph.fusion.fused,
        int8_recipe=int8.recipe,
        int8_attempts=int8.attempts,
        fast_path_removed=fast_path_removed,
        seconds=0.0,
    )


def _remove_fast_path(model_dir: Path) -> bool:
    """Remove the fast path of ``model_dir``: the ``fast_path`` section of ``metadata.json``
    first (a section without its table would fail to load), then ``fast_path.npz``. True when
    there was one."""
    metadata = ModelMetadata.read(model_dir)  # as it is now, not as the export started
    if metadata.fast_path is not None:
        dataclasses.replace(metadata, fast_path=None).write(model_dir)
    table = model_dir / FAST_PATH_FILE
    removed = metadata.fast_path is not None or table.is_file()
    table.unlink(missing_ok=True)
    if removed:
        logger.info("%s: removed the fast path fitted to the previous %s", model_dir, MODEL_FILE)
    return removed
