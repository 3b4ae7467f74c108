"""Training data export flow: the spec's retraining JSONL plus the held-out slice."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from capture.settings import get_settings
from flows.common import resolve_optional, stamp
from tasks.registry import write_json_atomic
from tasks.training_data import TrainingDataExport, export_training_data_task

logger = logging.getLogger(__name__)


def summary_path(training_file: Path) -> Path:
    """The sidecar with the export's summary (hash, counts, corrected ids): ``<file>.meta.json``."""
    return training_file.with_name(training_file.name + ".meta.json")


def read_summary(training_file: Path) -> dict[str, Any] | None:
    path = summary_path(training_file)
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


@task(cache_policy=NO_CACHE, name="write-training-summary", retries=2, retry_delay_seconds=1)
def write_summary(export: TrainingDataExport) -> Path:
    path = summary_path(export.path)
    write_json_atomic(path, export.summary())
    return path


@flow(name="training-data")
def training_data_flow(
    *,
    days: int | None = 30,
    min_confidence: float = 0.9,
    holdout_fraction: float = 0.2,
    base_data: str | None = None,
    include_store: bool = True,
    output: str | None = None,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Write ``exports/retraining-<stamp>.jsonl`` (or ``output``), its ``.holdout.jsonl`` and a
    ``.meta.json`` summary. ``base_data`` defaults to ``home/data/base_train.jsonl`` if present."""
    run_logger = get_run_logger()
    path = Path(output) if output else get_settings().exports_dir / f"retraining-{stamp()}.jsonl"
    export = export_training_data_task(
        path,
        url=database_url,
        days=days,
        min_confidence=min_confidence,
        base_data=resolve_optional(base_data, "train"),
        include_store=include_store,
        holdout_fraction=holdout_fraction,
    )
    write_summary(export)
    run_logger.info(
        "training data %s: %d rows (%s); %d held out in %s",
        export.path,
        export.n_train,
        ", ".join(f"{k} {v}" for k, v in sorted(export.counts.items())),
        export.n_holdout,
        export.holdout_path,
    )
    return export.summary()
