"""The model a registry serves now, loaded for offline work (review selection, the simulator).

The online side serves with ``capture.classifier.HotReloadingClassifier``; the flows that need
the serving model's embeddings or predictions load it once per run with
:func:`serving_classifier`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.registry import current_model_dir, is_deployable
from tasks.retry import io_task

if TYPE_CHECKING:
    from capture.classifier import OnnxClassifier

logger = logging.getLogger(__name__)

Embed = Callable[[Sequence[str]], np.ndarray]


def serving_classifier(models_dir: Path) -> OnnxClassifier | None:
    """The ONNX classifier of the version ``models_dir/current`` names; None when nothing
    serves or the serving version has no ONNX export."""
    model_dir = current_model_dir(models_dir)
    if model_dir is None or not is_deployable(model_dir):
        return None
    from capture.classifier import OnnxClassifier

    return OnnxClassifier(model_dir)


@io_task(name="load-serving-embedder")
def serving_embedder(models_dir: Path) -> Embed | None:
    """The serving model's ``embed`` (texts -> unit vectors, shape ``(n, dim)``) for
    near-duplicate collapse, or None when no model serves."""
    classifier = serving_classifier(models_dir)
    if classifier is None:
        return None
    embed: Embed = classifier.embed
    return embed
