"""Export a model directory to one self-contained ONNX file for serving.

``model.onnx`` holds the encoder, mean pooling, L2 normalisation, the linear head of
``head.npz``, the temperature and the softmax; its metadata carries the label list, the version
and the out-of-scope settings, so the serving side needs nothing else but ``tokenizer.json``.

int8 dynamic quantisation (per-channel weights) is published only when its top-1 agreement with
the torch model on validation texts reaches ``min_agreement``; otherwise the fp32 file is
published and the report, the ONNX metadata and the log say why.

torch, transformers, sentence-transformers and onnx are imported inside the functions only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("probabilities", "embeddings")
QUANTIZATION_INT8 = "int8-dynamic-per-channel"
QUANTIZATION_NONE = "none"
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


class ExportError(RuntimeError):
    """The model directory cannot be exported (message names the file and the fix)."""


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
    seconds: float

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {name: getattr(self, name) for name in self.__slots__}
        out["model_dir"] = str(self.model_dir)
        return out


@dataclass(frozen=True, slots=True)
class ModelDirInfo:
    """The parts of ``metadata.json`` and ``head.npz`` the export needs, validated."""

    version: str
    labels: tuple[str, ...]
    oos_label: str
    oos_threshold: float | None
    temperature: float
    max_seq_length: int
    embedding_dim: int
    weight: np.ndarray  # (n_labels, dim) float32
    bias: np.ndarray  # (n_labels,) float32


def read_model_dir(model_dir: Path) -> ModelDirInfo:
    """Read and check ``metadata.json``, ``head.npz`` and ``encoder/`` of a model directory."""
    meta_path = model_dir / "metadata.json"
    head_path = model_dir / "head.npz"
    encoder_dir = model_dir / "encoder"
    for path in (meta_path, head_path, encoder_dir):
        if not path.exists():
            raise ExportError(
                f"{path}: missing; a model directory needs metadata.json, head.npz and encoder/ "
                "(see docs/ARCHITECTURE.md); train or copy a complete model directory first"
            )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{meta_path}: not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ExportError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")

    def field(name: str, kind: type | tuple[type, ...], *, nullable: bool = False) -> Any:
        if name not in meta:
            raise ExportError(f"{meta_path}: field {name!r} is missing")
        value = meta[name]
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ExportError(
                f"{meta_path}: field {name!r} expected {kind}, found {value!r}; fix the file"
            )
        return value

    version = field("version", str)
    labels = field("labels", list)
    if not labels or not all(isinstance(x, str) and x for x in labels):
        raise ExportError(f"{meta_path}: field 'labels' must be a non-empty list of strings")
    if len(set(labels)) != len(labels):
        raise ExportError(f"{meta_path}: field 'labels' has duplicates")
    oos_label = field("oos_label", str)
    oos_threshold = field("oos_threshold", (int, float), nullable=True)
    temperature = float(field("temperature", (int, float)))
    if not np.isfinite(temperature) or temperature <= 0:
        raise ExportError(f"{meta_path}: field 'temperature' must be > 0, found {temperature}")
    max_seq_length = field("max_seq_length", int)
    embedding_dim = field("embedding_dim", int)

    try:
        with np.load(head_path) as head:
            weight = np.asarray(head["W"], dtype=np.float32)
            bias = np.asarray(head["b"], dtype=np.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(
            f"{head_path}: expected an .npz with arrays W and b ({exc}); re-run training"
        ) from exc
    if weight.shape != (len(labels), embedding_dim) or bias.shape != (len(labels),):
        raise ExportError(
            f"{head_path}: expected W {(len(labels), embedding_dim)} and b {(len(labels),)} "
            f"(from metadata.json labels and embedding_dim), found W {weight.shape} and "
            f"b {bias.shape}"
        )
    return ModelDirInfo(
        version=version,
        labels=tuple(labels),
        oos_label=oos_label,
        oos_threshold=None if oos_threshold is None else float(oos_threshold),
        temperature=temperature,
        max_seq_length=max_seq_length,
        embedding_dim=embedding_dim,
        weight=weight,
        bias=bias,
    )


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
        raise ExportError(f"{path}: the padding token {pad_token!r} is not in the vocabulary")
    tokenizer.no_padding()
    tokenizer.enable_padding(
        pad_id=pad_id, pad_token=pad_token, pad_type_id=int(padding.get("pad_type_id") or 0)
    )  # no length: pad to the longest input of each batch
    tokenizer.no_truncation()
    tokenizer.enable_truncation(max_length=max_seq_length)
    return tokenizer


def onnx_metadata(
    info: ModelDirInfo, *, quantization: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The ``metadata_props`` written into ``model.onnx`` (all values are strings)."""
    props = {
        "labels": json.dumps(list(info.labels)),
        "version": info.version,
        "oos_label": info.oos_label,
        "oos_threshold": json.dumps(info.oos_threshold),
        "temperature": json.dumps(info.temperature),
        "quantization": quantization,
        "max_seq_length": str(info.max_seq_length),
        "embedding_dim": str(info.embedding_dim),
    }
    props.update(extra or {})
    return props


def set_onnx_metadata(path: Path, props: Mapping[str, str]) -> None:
    """Replace the ``metadata_props`` of the ONNX file at ``path`` with ``props``."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value
    onnx.save(model, str(path))


def _torch_classifier_module(model_dir: Path, info: ModelDirInfo) -> torch.nn.Module:
    """encoder + mean pooling + L2 normalisation + head + temperature + softmax, as one module."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

    st = SentenceTransformer(str(model_dir / "encoder"), device="cpu")
    pooling = next((m for m in st if isinstance(m, Pooling)), None)
    mode = pooling.get_config_dict().get("pooling_mode") if pooling is not None else None
    if mode != "mean":
        raise ExportError(
            f"{model_dir / 'encoder'}: the export supports mean pooling only, found {mode!r}"
        )
    bert = st[0].auto_model
    if not isinstance(bert, torch.nn.Module):
        raise ExportError(f"{model_dir / 'encoder'}: the first module holds no transformer model")
    encoder: torch.nn.Module = bert.eval()
    weight = torch.from_numpy(info.weight.copy())
    bias = torch.from_numpy(info.bias.copy())

    class _ServingModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                self.head.weight.copy_(weight)
                self.head.bias.copy_(bias)
            self.inv_temperature = 1.0 / info.temperature

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            # Keyword arguments: transformers 5's BertModel breaks tracing when called positionally.
            out = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            )
            hidden = out[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            embeddings = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            logits = self.head(embeddings)
            probabilities = torch.softmax(logits * self.inv_temperature, dim=-1)
            return probabilities, embeddings

    return _ServingModule().eval()


def export_fp32(model_dir: Path, info: ModelDirInfo, output: Path, *, opset: int) -> None:
    """Write the fp32 ONNX graph of ``model_dir`` to ``output`` (no metadata yet)."""
    import torch

    module = _torch_classifier_module(model_dir, info)
    # A padded second row, so the traced graph keeps the attention-mask path.
    input_ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.long)
    dynamic = {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and tracer warnings about the
        # transformers mask helpers (constant for an encoder: verified by the parity check).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
        torch.onnx.export(
            module,
            (input_ids, attention_mask),
            str(output),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "input_ids": dynamic,
                "attention_mask": dynamic,
                "probabilities": {0: "batch"},
                "embeddings": {0: "batch"},
            },
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )


def quantize_int8(source: Path, output: Path) -> None:
    """Dynamic int8 quantisation with per-channel weights (activations quantised at run time)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(output),
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def onnx_predict_proba(
    model_path: Path, tokenizer: Tokenizer, texts: Sequence[str], *, threads: int = 1
) -> np.ndarray:
    """Probabilities of the ONNX file at ``model_path`` for ``texts`` (batches of 64)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    rows = []
    for start in range(0, len(texts), PARITY_BATCH_SIZE):
        encodings = tokenizer.encode_batch(list(texts[start : start + PARITY_BATCH_SIZE]))
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        rows.append(session.run(["probabilities"], feeds)[0])
    return np.concatenate(rows, axis=0)


def parity(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, max absolute probability difference) of two probability matrices."""
    if reference.shape != candidate.shape:
        raise ExportError(
            f"parity check: expected probabilities of shape {reference.shape}, "
            f"found {candidate.shape}"
        )
    agreement = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    return agreement, float(np.abs(reference - candidate).max())


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
    torch (max probability difference <= 1e-3) or nothing is written.
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    info = read_model_dir(model_dir)
    texts = list(validation_texts) if validation_texts is not None else []
    texts = texts or list(DEFAULT_VALIDATION_TEXTS)
    if not all(isinstance(t, str) for t in texts):
        raise ExportError("validation_texts: expected strings only")

    work = Path(tempfile.mkdtemp(prefix=".export-", dir=model_dir))
    try:
        tokenizer = serving_tokenizer(model_dir / "encoder", info.max_seq_length)
        tokenizer_tmp = work / "tokenizer.json"
        tokenizer.save(str(tokenizer_tmp))
        fp32_path = work / "model.fp32.onnx"
        logger.info("exporting %s (version %s) to ONNX fp32", model_dir, info.version)
        export_fp32(model_dir, info, fp32_path, opset=opset)

        from tasks.evaluate import TorchModel

        reference = TorchModel.load(model_dir).predict_proba(texts)
        fp32_agreement, fp32_diff = parity(
            reference, onnx_predict_proba(fp32_path, tokenizer, texts)
        )
        logger.info("fp32 parity: agreement %.4f, max prob diff %.2e", fp32_agreement, fp32_diff)
        if fp32_diff > FP32_MAX_PROB_DIFF:
            raise ExportError(
                f"{model_dir}: the fp32 ONNX export differs from the torch model by "
                f"{fp32_diff:.2e} in probability (limit {FP32_MAX_PROB_DIFF}); the export is "
                "broken, nothing was published"
            )

        int8_path = work / "model.int8.onnx"
        int8_agreement: float | None = None
        int8_diff: float | None = None
        int8_size: int | None = None
        fallback: str | None = None
        chosen = fp32_path
        if quantize:
            quantize_int8(fp32_path, int8_path)
            int8_size = int8_path.stat().st_size
            int8_agreement, int8_diff = parity(
                reference, onnx_predict_proba(int8_path, tokenizer, texts)
            )
            logger.info(
                "int8 parity: agreement %.4f, max prob diff %.2e", int8_agreement, int8_diff
            )
            if int8_agreement >= min_agreement:
                chosen = int8_path
            else:
                fallback = (
                    f"int8 top-1 agreement {int8_agreement:.4f} with the torch model on "
                    f"{len(texts)} validation texts is below {min_agreement}; published fp32"
                )
                logger.warning("%s: %s", model_dir, fallback)

        if chosen == int8_path and int8_agreement is not None and int8_diff is not None:
            published, agreement, max_diff = "int8", int8_agreement, int8_diff
        else:
            published, agreement, max_diff = "fp32", fp32_agreement, fp32_diff
        extra = {
            "export_agreement": json.dumps(agreement),
            "export_max_abs_prob_diff": json.dumps(max_diff),
            "export_n_validation": str(len(texts)),
            "export_min_agreement": json.dumps(min_agreement),
            "export_int8_agreement": json.dumps(int8_agreement),
        }
        if fallback:
            extra["export_fallback"] = fallback
        set_onnx_metadata(
            chosen,
            onnx_metadata(
                info,
                quantization=QUANTIZATION_INT8 if published == "int8" else QUANTIZATION_NONE,
                extra=extra,
            ),
        )
        fp32_size = fp32_path.stat().st_size
        published_size = chosen.stat().st_size
        os.replace(chosen, model_dir / "model.onnx")
        os.replace(tokenizer_tmp, model_dir / "tokenizer.json")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = ExportReport(
        model_dir=model_dir,
        version=info.version,
        published=published,
        quantization=QUANTIZATION_INT8 if published == "int8" else QUANTIZATION_NONE,
        agreement=agreement,
        max_abs_prob_diff=max_diff,
        fp32_agreement=fp32_agreement,
        fp32_max_abs_prob_diff=fp32_diff,
        int8_agreement=int8_agreement,
        int8_max_abs_prob_diff=int8_diff,
        fp32_size_bytes=fp32_size,
        int8_size_bytes=int8_size,
        published_size_bytes=published_size,
        n_validation=len(texts),
        min_agreement=min_agreement,
        fallback_reason=fallback,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "published %s model.onnx for %s (%.1f MB, agreement %.4f) in %.1fs",
        published,
        info.version,
        published_size / 1e6,
        agreement,
        report.seconds,
    )
    return report
