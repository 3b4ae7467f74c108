"""Pairs flow: contrastive pairs from the production part of a retraining file (the spec's
``convert_to_pairs`` step); the retrain flow trains on them."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.entry import open_run
from tasks.training_pairs import PairsResult, make_pairs, pairs_path_for, read_training_rows


@flow(name="pairs")
def pairs_flow(
    input: str | None = None,
    output: str | None = None,
    max_pairs: int = 2000,
    seed: int = 0,
    *,
    production_only: bool = True,
    home: str | None = None,
) -> PairsResult:
    """Write same-intent pairs (``{anchor, positive, label}`` JSONL) for ``input`` to ``output``
    (default: ``<input stem>.pairs.jsonl``); ``input`` defaults to the newest retraining export
    under ``home`` (default PROMPT_CAPTURE_HOME)."""
    run = open_run(home)
    source = Path(input) if input else run.layout.latest_training_export()
    target = Path(output) if output else pairs_path_for(source)
    records = read_training_rows(source, production_only)
    n = make_pairs(records, target, max_pairs, seed)
    get_run_logger().info("%d pairs from %d rows of %s -> %s", n, len(records), source, target)
    return PairsResult(input=source, output=target, pairs=n, rows=len(records))
