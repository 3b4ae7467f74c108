"""The simulator's ceiling: a model trained on every train label with the loop's
hyperparameters, exported and scored like the loop's models."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from capture.files import write_text_atomic
from capture.traffic import score_classifier
from tasks.retrain import train_config
from tasks.simulate.data import SimulationData
from tasks.simulate.results import ALL_LABELS, WeekResult
from tasks.simulate.space import LoopSettings

logger = logging.getLogger(__name__)

REFERENCE_DIR = "reference"
REFERENCE_FILE = "reference.json"


def train_reference(data: SimulationData, loop: LoopSettings, output: Path) -> WeekResult:
    """Train on all of ``data.train``, export to ONNX, score on ``data.test``; the row is cached
    in ``output/reference/reference.json`` for the same config, data and quantisation."""
    from capture.classifier import OnnxClassifier
    from tasks.export_onnx import export_onnx
    from tasks.train import train_model

    config = train_config(dict(loop.hyperparameters or {}))
    key = hashlib.sha256(
        json.dumps(
            [asdict(config), [(r.text, r.label) for r in data.train], loop.quantize]
        ).encode()
    ).hexdigest()[:16]
    folder = output / REFERENCE_DIR
    cached = folder / REFERENCE_FILE
    if cached.exists():
        saved = json.loads(cached.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return WeekResult(**saved["row"])
    started = time.perf_counter()
    model_dir = folder / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    train_model(list(data.train), None, model_dir, config=config, progress=True)
    export_onnx(model_dir, quantize=loop.quantize)
    classifier = OnnxClassifier(model_dir)
    row = WeekResult(
        strategy=ALL_LABELS,
        seed=config.seed,
        week=0,
        accuracy=score_classifier(classifier, data.test),
        reviewed=0,
        errors_found=0,
        labels_used=len(data.train),
        traffic_accuracy=None,
        candidates=None,
        training_rows=len(data.train),
        gate="reference",
        model_version=str(classifier.version),
        week_seconds=time.perf_counter() - started,
    )
    write_text_atomic(cached, json.dumps({"key": key, "row": asdict(row)}, indent=2))
    return row


reference_task = task(name="simulate-reference", cache_policy=NO_CACHE)(train_reference)
