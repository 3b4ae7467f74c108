"""Training data export flow: the spec's retraining JSONL plus the held-out slice."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.entry import open_run
from tasks.training_data import TrainingDataExport, export_training_data_task, write_summary


@flow(name="training-data")
def training_data_flow(
    *,
    days: int | None = 30,
    min_confidence: float = 0.9,
    holdout_fraction: float = 0.2,
    base_data: str | None = None,
    include_store: bool = True,
    output: str | None = None,
    home: str | None = None,
    database_url: str | None = None,
    database_secret: str | None = None,
) -> TrainingDataExport:
    """Write ``exports/retraining-<stamp>.jsonl`` (or ``output``), its ``.holdout.jsonl`` and a
    ``.meta.json`` summary. ``base_data`` defaults to ``home/data/base_train.jsonl`` if present.

    ``home`` defaults to PROMPT_CAPTURE_HOME; the database to ``database_url`` (no password),
    the Secret block ``database_secret``, PROMPT_CAPTURE_DATABASE_URL, or the home's SQLite file.
    """
    run = open_run(home, database_url, database_secret)
    url = run.require_database()
    export = export_training_data_task(
        Path(output) if output else run.layout.training_export_path(),
        url=url,
        days=days,
        min_confidence=min_confidence,
        base_data=run.layout.optional_file(base_data, "train"),
        base_default=run.layout.base_file("train"),
        include_store=include_store,
        holdout_fraction=holdout_fraction,
    )
    write_summary(export)
    get_run_logger().info(
        "training data %s: %d rows (%s); %d held out in %s",
        export.path,
        export.n_train,
        ", ".join(f"{k} {v}" for k, v in sorted(export.counts.items())),
        export.n_holdout,
        export.holdout_path,
    )
    return export
