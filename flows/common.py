"""What the weekly-cycle flows share: where things live under PROMPT_CAPTURE_HOME.

``home/data/base_{train,val,test}.jsonl`` hold the base data set of the first model (written by
``prompt-capture demo``, or copied there by whoever trained the first model): the training data
export adds ``base_train`` so the model does not forget, retraining calibrates on ``base_val``,
and the gate scores both models on ``base_test`` plus the held-out corrected prompts.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from capture.settings import get_settings

logger = logging.getLogger(__name__)

BASE_FILES = {"train": "base_train.jsonl", "val": "base_val.jsonl", "test": "base_test.jsonl"}


def home() -> Path:
    return get_settings().home


def models_dir() -> Path:
    return get_settings().models_dir


def data_dir() -> Path:
    return get_settings().home / "data"


def work_dir() -> Path:
    return get_settings().home / "work"


def base_file(kind: str) -> Path:
    """``home/data/base_<kind>.jsonl`` (kind: train, val, test)."""
    return data_dir() / BASE_FILES[kind]


def resolve_optional(path: str | None, default_kind: str | None = None) -> Path | None:
    """``path`` when given; else the base file of ``default_kind`` when it exists; else None."""
    if path:
        resolved = Path(path)
        if not resolved.exists():
            raise FileNotFoundError(f"{resolved}: not found; pass an existing file")
        return resolved
    if default_kind is not None and base_file(default_kind).exists():
        return base_file(default_kind)
    return None


def stamp(now: datetime | None = None) -> str:
    """A file-name-safe UTC timestamp."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def latest_training_export() -> Path:
    """The newest ``exports/retraining-*.jsonl`` (what the training-data flow writes)."""
    exports = get_settings().exports_dir
    found = sorted(
        p
        for p in exports.glob("retraining-*.jsonl")
        if not p.name.endswith((".holdout.jsonl", ".pairs.jsonl"))
    )
    if not found:
        raise FileNotFoundError(
            f"no retraining export in {exports}; run the training-data flow "
            "(`prompt-capture export --mode retraining`) first or pass the file"
        )
    return found[-1]
