"""The model directory format, owned here and nowhere else (torch-free: json, numpy and
``tokenizers`` only).

A model directory (docs/ARCHITECTURE.md, "The model directory")::

    <model dir>/
      metadata.json   ModelMetadata: version, labels, out-of-scope settings, provenance, metrics
      encoder/        the fine-tuned sentence-transformers encoder (training side only)
      head.npz        Head: W (n_labels x dim, float32), b (n_labels,); logits = emb @ W.T + b
      model.onnx      after export: the serving graph; its metadata_props are OnnxMetadata
      tokenizer.json  after export: the serving tokenizer
      fast_path.npz   optional, after export: the fast path (FastPathTables), described by the
                      ``fast_path`` section of metadata.json (FastPathMetadata); a directory
                      without it is valid and serves with the ONNX model alone

The registry's pointers to model directories (``models_dir/current``, ``models_dir/candidate``)
are ``capture.pointers``'.

Training, export, evaluation, the registry and the serving classifier read and write these files
through this module only, so there is one validation: a malformed file raises
:class:`ModelDirError` (a ``UserError``) whose message names the file, the field, what was
expected, what was found and the fix. Writes are atomic (``capture.files``) and shared (the umask's
mode): other processes and users serve these files.
"""

from __future__ import annotations

import io
import json
import logging
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from capture.errors import UserError
from capture.files import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
HEAD_FILE = "head.npz"
ENCODER_DIR = "encoder"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
FAST_PATH_FILE = "fast_path.npz"
# What training writes, and what a directory needs to be exported or loaded with torch.
TRAINED_FILES = (METADATA_FILE, HEAD_FILE, ENCODER_DIR)
# What a registry version needs to serve (deploy refuses a version without them).
SERVING_FILES = (METADATA_FILE, MODEL_FILE, TOKENIZER_FILE)

# The serving graph's interface: int64 [batch, sequence] inputs; probabilities [batch, n_labels]
# (temperature and softmax applied) and L2-normalised embeddings [batch, dim].
INPUT_NAMES = ("input_ids", "attention_mask")
PROBABILITIES = "probabilities"
EMBEDDINGS = "embeddings"
OUTPUT_NAMES = (PROBABILITIES, EMBEDDINGS)
# The ``quantization`` metadata_prop of model.onnx.
QUANTIZATION_INT8 = "int8-dynamic-per-channel"
QUANTIZATION_NONE = "none"

_FORMAT = "docs/ARCHITECTURE.md, 'The model directory'"
_FIX_METADATA = f"fix the file or train the model again (format: {_FORMAT})"
_FIX_ONNX = "export the model again (tasks.export_onnx.export_onnx)"
_FIX_HEAD = "train the model again"
# metadata_props of model.onnx that hold JSON (the others are plain strings).
_JSON_PROPS = ("labels", "oos_threshold", "temperature")
_SERVING_PROPS = ("labels", "version", "oos_label", "oos_threshold", "temperature")


class ModelDirError(UserError, ValueError):
    """A model directory file or the serving pointer is missing or malformed; the message names
    the file, the field, what was expected and found, and the fix."""


def _short(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


class _Fields:
    """Reads and checks the fields of one source (metadata.json or model.onnx's metadata_props);
    every check of the format is a method here, shared by both sources."""

    def __init__(self, data: Mapping[str, Any], source: Path, *, kind: str, fix: str) -> None:
        self.data, self.source, self.kind, self.fix = data, source, kind, fix

    def fail(self, name: str, expected: str, found: object) -> NoReturn:
        raise ModelDirError(
            f"{self.source}: {self.kind} {name!r} must be {expected}, found {_short(found)}; "
            f"{self.fix}"
        )

    def get(self, name: str, expected: str) -> Any:
        if name not in self.data:
            raise ModelDirError(
                f"{self.source}: {self.kind} {name!r} is missing (expected {expected}); {self.fix}"
            )
        return self.data[name]

    def text(self, name: str) -> str:
        expected = "a non-empty string"
        value = self.get(name, expected)
        if not isinstance(value, str) or not value:
            self.fail(name, expected, value)
        return value

    def optional_text(self, name: str) -> str | None:
        expected = "null or a non-empty string"
        value = self.get(name, expected)
        if value is not None and (not isinstance(value, str) or not value):
            self.fail(name, expected, value)
        return value

    def labels(self) -> tuple[str, ...]:
        expected = "a non-empty list of distinct non-empty strings"
        value = self.get("labels", expected)
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(x, str) and x for x in value)
            or len(set(value)) != len(value)
        ):
            self.fail("labels", expected, value)
        return tuple(value)

    def oos_threshold(self) -> float | None:
        expected = "null or a number in [0, 1]"
        value = self.get("oos_threshold", expected)
        if value is None:
            return None
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            self.fail("oos_threshold", expected, value)
        return float(value)

    def temperature(self) -> float:
        expected = "> 0 (a finite number)"
        value = self.get("temperature", expected)
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            self.fail("temperature", expected, value)
        return float(value)

    def decision(self) -> dict[str, Any]:
        """The fields both sources carry, which decide a prediction: version, labels,
        oos_label, oos_threshold, temperature."""
        return {
            "version": self.text("version"),
            "labels": self.labels(),
            "oos_label": self.text("oos_label"),
            "oos_threshold": self.oos_threshold(),
            "temperature": self.temperature(),
        }

    def positive_int(self, name: str) -> int:
        expected = "a positive integer"
        value = self.get(name, expected)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(name, expected, value)
        return value

    def mapping(self, name: str) -> dict[str, Any]:
        expected = "a JSON object"
        value = self.get(name, expected)
        if not isinstance(value, dict):
            self.fail(name, expected, value)
        return value

    def timestamp(self, name: str) -> str:
        expected = "an ISO 8601 time"
        value = self.get(name, expected)
        try:
            datetime.fromisoformat(value)
        except (TypeError, ValueError):
            self.fail(name, expected, value)
        return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _read_json_object(path: Path, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelDirError(
            f"{path}: missing; expected a model directory written by `prompt-capture train` "
            f"({', '.join(TRAINED_FILES)})"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: not valid UTF-8 JSON ({exc}); {fix}") from exc
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: expected a JSON object, found {type(data).__name__}; {fix}")
    return data


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """``metadata.json``: what a model is, how it decides, and where it came from.

    ``labels`` are the head's rows and the probability columns, in order; below
    ``oos_threshold`` (None: never) the prediction is ``oos_label``. ``temperature`` divides the
    logits before the softmax. ``created_at`` is ISO 8601 text. ``extra`` keeps keys this format
    does not define (e.g. ``train_seconds``), so a rewrite (the registry's version) drops nothing.
    """

    version: str
    labels: tuple[str, ...]
    oos_label: str
    oos_threshold: float | None
    temperature: float
    base_model: str
    parent_version: str | None
    created_at: str
    hyperparameters: Mapping[str, Any]
    metrics: Mapping[str, Any]
    max_seq_length: int
    embedding_dim: int
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The optional ``fast_path`` section (None: the directory has no fast path).
    fast_path: FastPathMetadata | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Path) -> ModelMetadata:
        """The metadata in ``data`` (parsed JSON), checked field by field.

        Raises ``ModelDirError`` naming ``source`` and the first bad field.
        """
        fields = _Fields(data, source, kind="field", fix=_FIX_METADATA)
        known = {name for name in cls.__dataclass_fields__ if name != "extra"}
        section = data.get("fast_path")
        return cls(
            **fields.decision(),
            base_model=fields.text("base_model"),
            parent_version=fields.optional_text("parent_version"),
            created_at=fields.timestamp("created_at"),
            hyperparameters=fields.mapping("hyperparameters"),
            metrics=fields.mapping("metrics"),
            max_seq_length=fields.positive_int("max_seq_length"),
            embedding_dim=fields.positive_int("embedding_dim"),
            extra={key: value for key, value in data.items() if key not in known},
            fast_path=None if section is None else FastPathMetadata.from_dict(section, source),
        )

    @classmethod
    def read(cls, model_dir: Path) -> ModelMetadata:
        """``model_dir/metadata.json``; raises ``ModelDirError`` when missing or malformed."""
        path = Path(model_dir) / METADATA_FILE
        return cls.from_dict(_read_json_object(path, _FIX_METADATA), path)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``metadata.json`` (``extra`` keys included)."""
        out: dict[str, Any] = dict(self.extra)
        for name in self.__dataclass_fields__:
            if name not in ("extra", "fast_path"):
                out[name] = getattr(self, name)
        out["fast_path"] = None if self.fast_path is None else self.fast_path.to_dict()
        out["labels"] = list(self.labels)
        out["hyperparameters"] = dict(self.hyperparameters)
        out["metrics"] = dict(self.metrics)
        return out

    def write(self, model_dir: Path) -> Path:
        """Check (the same validation as :meth:`read`) and write ``model_dir/metadata.json``
        atomically; returns its path. Raises ``ModelDirError`` before writing anything."""
        path = Path(model_dir) / METADATA_FILE
        data = self.to_dict()
        ModelMetadata.from_dict(data, path)
        return write_json_atomic(path, data)

    def onnx_props(
        self, *, quantization: str, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The ``metadata_props`` of ``model.onnx`` (strings; see :class:`OnnxMetadata`)."""
        props = {
            "labels": json.dumps(list(self.labels)),
            "version": self.version,
            "oos_label": self.oos_label,
            "oos_threshold": json.dumps(self.oos_threshold),
            "temperature": json.dumps(self.temperature),
            "quantization": quantization,
            "max_seq_length": str(self.max_seq_length),
            "embedding_dim": str(self.embedding_dim),
        }
        props.update(extra or {})
        return props


@dataclass(frozen=True, slots=True)
class OnnxMetadata:
    """The ``metadata_props`` of ``model.onnx`` that serving reads (written by
    :meth:`ModelMetadata.onnx_props`); ``props`` holds all of them as found, the export's
    ``export_*`` parity figures included."""

    version: str
    labels: tuple[str, ...]
    oos_label: str
    oos_threshold: float | None
    temperature: float
    quantization: str
    props: Mapping[str, str]

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: Path) -> OnnxMetadata:
        """Parse and check ``props`` of the file ``source``; raises ``ModelDirError``."""
        missing = [key for key in _SERVING_PROPS if key not in props]
        if missing:
            raise ModelDirError(
                f"{source}: metadata_props {missing} are missing; the file was not written by "
                f"tasks.export_onnx: {_FIX_ONNX}"
            )
        decoded: dict[str, Any] = dict(props)
        for key in _JSON_PROPS:
            try:
                decoded[key] = json.loads(props[key])
            except json.JSONDecodeError as exc:
                raise ModelDirError(
                    f"{source}: metadata_props {key!r} must be JSON, found {props[key][:80]!r} "
                    f"({exc}); {_FIX_ONNX}"
                ) from exc
        fields = _Fields(decoded, source, kind="metadata_props", fix=_FIX_ONNX)
        return cls(
            **fields.decision(),
            quantization=props.get("quantization", "unknown"),
            props=dict(props),
        )


@dataclass(frozen=True, slots=True)
class Head:
    """``head.npz``: the linear head, ``logits = embeddings @ weight.T + bias``."""

    weight: np.ndarray  # (n_labels, embedding_dim) float32
    bias: np.ndarray  # (n_labels,) float32

    @classmethod
    def read(cls, model_dir: Path, metadata: ModelMetadata) -> Head:
        """``model_dir/head.npz``, checked against ``metadata`` (one row per label, rows of
        ``embedding_dim``); raises ``ModelDirError``."""
        path = Path(model_dir) / HEAD_FILE
        if not path.is_file():
            raise ModelDirError(f"{path}: missing; {_FIX_HEAD}")
        try:
            with np.load(path) as head:
                weight = np.asarray(head["W"], dtype=np.float32)
                bias = np.asarray(head["b"], dtype=np.float32)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise ModelDirError(
                f"{path}: expected an .npz with arrays W and b ({exc}); {_FIX_HEAD}"
            ) from exc
        n_labels = len(metadata.labels)
        if weight.shape != (n_labels, metadata.embedding_dim) or bias.shape != (n_labels,):
            raise ModelDirError(
                f"{path}: expected W {(n_labels, metadata.embedding_dim)} and b {(n_labels,)} "
                f"(from {METADATA_FILE} labels and embedding_dim), found W {weight.shape} and "
                f"b {bias.shape}; the directory mixes two models: {_FIX_HEAD}"
            )
        return cls(weight, bias)

    def write(self, model_dir: Path) -> Path:
        """Write ``model_dir/head.npz`` (float32) atomically; returns its path."""
        buffer = io.BytesIO()
        np.savez(buffer, W=self.weight.astype(np.float32), b=self.bias.astype(np.float32))
        return write_bytes_atomic(Path(model_dir) / HEAD_FILE, buffer.getvalue())


# The fast path (capture.fast_path serves it, tasks.fast_path builds it).

_FIX_FAST_PATH = (
    "build the fast path again (tasks.fast_path.build_fast_path) or delete fast_path.npz and the "
    "fast_path section of metadata.json to serve without it"
)


@dataclass(frozen=True, slots=True)
class FastPathMetadata:
    """The ``fast_path`` section of ``metadata.json``: a static-embedding model with a linear
    head in front of ``model.onnx`` (a cascade), whose arrays are in ``fast_path.npz``
    (:class:`FastPathTables`).

    A prompt's ``model.onnx`` tokens (``tokenizer.json``, no special tokens) index rows of the
    static table; their mean, L2-normalised, goes through the head and a softmax over
    ``labels``: the served model's labels, plus its ``oos_label`` last when that is not one of
    them (the fast path imitates the full model's decisions, out-of-scope included). The fast
    path answers when its top probability is at least ``threshold``; otherwise ``model.onnx``
    does. ``teacher_version`` is the model whose decisions it was fitted to: serving refuses a
    fast path fitted to another version. ``metrics`` holds what the build measured (agreement
    and share answered on validation), ``hyperparameters`` how it was built.
    """

    labels: tuple[str, ...]
    threshold: float
    embedding_dim: int
    vocab_size: int
    teacher_version: str
    teacher_quantization: str
    created_at: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: object, source: Path) -> FastPathMetadata:
        """The section ``data`` of ``source``, checked field by field; raises
        ``ModelDirError`` naming the field."""
        if not isinstance(data, dict):
            raise ModelDirError(
                f"{source}: field 'fast_path' must be a JSON object or absent, found "
                f"{_short(data)}; {_FIX_FAST_PATH}"
            )
        fields = _Fields(data, source, kind="fast_path field", fix=_FIX_FAST_PATH)
        threshold = fields.get("threshold", "a number in (0, 1]")
        if not _is_number(threshold) or not 0.0 < threshold <= 1.0:
            fields.fail("threshold", "a number in (0, 1]", threshold)
        return cls(
            labels=fields.labels(),
            threshold=float(threshold),
            embedding_dim=fields.positive_int("embedding_dim"),
            vocab_size=fields.positive_int("vocab_size"),
            teacher_version=fields.text("teacher_version"),
            teacher_quantization=fields.text("teacher_quantization"),
            created_at=fields.timestamp("created_at"),
            metrics=fields.mapping("metrics") if "metrics" in data else {},
            hyperparameters=(
                fields.mapping("hyperparameters") if "hyperparameters" in data else {}
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the section."""
        return {
            "labels": list(self.labels),
            "threshold": self.threshold,
            "embedding_dim": self.embedding_dim,
            "vocab_size": self.vocab_size,
            "teacher_version": self.teacher_version,
            "teacher_quantization": self.teacher_quantization,
            "created_at": self.created_at,
            "metrics": dict(self.metrics),
            "hyperparameters": dict(self.hyperparameters),
        }

    def check_against(self, metadata: ModelMetadata | OnnxMetadata, source: Path) -> None:
        """Raise ``ModelDirError`` unless this fast path belongs to the model ``metadata``
        describes: fitted to its version, over its labels (plus its ``oos_label`` last)."""
        expected = fast_path_labels(metadata.labels, metadata.oos_label)
        if self.labels != expected:
            raise ModelDirError(
                f"{source}: fast_path field 'labels' ({len(self.labels)}) must be the model's "
                f"{len(metadata.labels)} labels{'' if expected == metadata.labels else ' + oos'}"
                f" in order; the fast path belongs to another model: {_FIX_FAST_PATH}"
            )
        quantization = getattr(metadata, "quantization", self.teacher_quantization)
        if self.teacher_quantization != quantization:
            raise ModelDirError(
                f"{source}: fast_path field 'teacher_quantization' must be the quantization of "
                f"{MODEL_FILE}, {quantization!r}, found {self.teacher_quantization!r}; the model "
                f"was exported again after the fast path was built: {_FIX_FAST_PATH}"
            )
        if self.teacher_version != metadata.version:
            raise ModelDirError(
                f"{source}: fast_path field 'teacher_version' must be the model's version "
                f"{metadata.version!r}, found {self.teacher_version!r}; the fast path imitates "
                f"another model: {_FIX_FAST_PATH}"
            )


def fast_path_labels(labels: tuple[str, ...], oos_label: str) -> tuple[str, ...]:
    """The fast path's classes for a model with ``labels``: its decisions (``oos_label`` last
    when the model reaches it only through its threshold)."""
    return labels if oos_label in labels else (*labels, oos_label)


@dataclass(frozen=True, slots=True)
class FastPathTables:
    """``fast_path.npz``: ``embeddings`` (vocab_size x dim; stored float16, read as float32),
    one static row per token id, and the head ``weight`` (n_labels x dim) and ``bias``
    (n_labels,): ``logits = normalise(mean(embeddings[ids])) @ weight.T + bias``."""

    embeddings: np.ndarray
    weight: np.ndarray
    bias: np.ndarray

    @classmethod
    def read(cls, model_dir: Path, section: FastPathMetadata) -> FastPathTables:
        """``model_dir/fast_path.npz`` checked against ``section`` (shapes, finite values);
        raises ``ModelDirError``."""
        path = Path(model_dir) / FAST_PATH_FILE
        if not path.is_file():
            raise ModelDirError(
                f"{path}: missing, but {METADATA_FILE} has a fast_path section; {_FIX_FAST_PATH}"
            )
        try:
            with np.load(path) as arrays:
                embeddings = np.asarray(arrays["embeddings"], dtype=np.float32)
                weight = np.asarray(arrays["W"], dtype=np.float32)
                bias = np.asarray(arrays["b"], dtype=np.float32)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise ModelDirError(
                f"{path}: expected an .npz with arrays embeddings, W and b ({exc}); "
                f"{_FIX_FAST_PATH}"
            ) from exc
        n, dim = len(section.labels), section.embedding_dim
        expected = {"embeddings": (section.vocab_size, dim), "W": (n, dim), "b": (n,)}
        found = {"embeddings": embeddings.shape, "W": weight.shape, "b": bias.shape}
        if found != expected:
            raise ModelDirError(
                f"{path}: expected shapes {expected} (from the fast_path section of "
                f"{METADATA_FILE}), found {found}; {_FIX_FAST_PATH}"
            )
        for name, array in (("embeddings", embeddings), ("W", weight), ("b", bias)):
            if not np.all(np.isfinite(array)):
                raise ModelDirError(f"{path}: array {name} has non-finite values; {_FIX_FAST_PATH}")
        return cls(embeddings, weight, bias)

    def write(self, model_dir: Path) -> Path:
        """Write ``model_dir/fast_path.npz`` atomically (the table as float16); returns its
        path. Write it before the metadata section that describes it."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            embeddings=self.embeddings.astype(np.float16),
            W=self.weight.astype(np.float32),
            b=self.bias.astype(np.float32),
        )
        return write_bytes_atomic(Path(model_dir) / FAST_PATH_FILE, buffer.getvalue())


def require_files(model_dir: Path, names: tuple[str, ...] = TRAINED_FILES) -> None:
    """Raise ``ModelDirError`` naming the first of ``names`` missing from ``model_dir``."""
    for name in names:
        path = Path(model_dir) / name
        if not path.exists():
            raise ModelDirError(
                f"{path}: missing; a model directory needs {', '.join(names)} ({_FORMAT}); "
                "train or copy a complete model directory first"
            )


def read_trained(model_dir: Path) -> tuple[ModelMetadata, Head]:
    """``metadata.json`` and ``head.npz`` of a trained model directory, checked against each
    other (``encoder/`` must be there too); raises ``ModelDirError`` naming the first problem."""
    require_files(model_dir, TRAINED_FILES)
    metadata = ModelMetadata.read(model_dir)
    return metadata, Head.read(model_dir, metadata)


def missing_files(model_dir: Path, names: tuple[str, ...] = SERVING_FILES) -> list[str]:
    """The file names of ``names`` that ``model_dir`` lacks, in order."""
    return [name for name in names if not (Path(model_dir) / name).is_file()]


def read_tokenizer(model_dir: Path, *, fix_missing: str) -> Tokenizer:
    """``model_dir/tokenizer.json`` (the exported serving tokenizer) as a ``tokenizers``
    ``Tokenizer``, as found: the caller checks its settings. Raises ``ModelDirError`` when it is
    missing (the message ends with ``fix_missing``) or cannot be parsed."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ModelDirError(f"{path}: missing; {fix_missing}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for any parse error
        raise ModelDirError(f"{path}: cannot be read as a tokenizer ({exc})") from exc
