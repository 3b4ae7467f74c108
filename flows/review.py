"""Review export flow: pick this week's prompts for human review and write the review file."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import models_dir, stamp
from tasks.registry import current_model_dir, is_deployable
from tasks.review_export import export_review_task, review_table
from tasks.review_select import DEFAULT_STRATEGY

logger = logging.getLogger(__name__)


@task(cache_policy=NO_CACHE, name="load-serving-embedder", retries=2, retry_delay_seconds=2)
def serving_embedder() -> Callable[[Sequence[str]], np.ndarray] | None:
    """The serving model's ``embed`` (for near-duplicate collapse), or None when none serves."""
    model_dir = current_model_dir(models_dir())
    if model_dir is None or not is_deployable(model_dir):
        return None
    from capture.classifier import OnnxClassifier

    classifier = OnnxClassifier(model_dir)
    embed: Callable[[Sequence[str]], np.ndarray] = classifier.embed
    return embed


@flow(name="review-export", log_prints=False)
def review_export_flow(
    *,
    days: int | None = 7,
    confidence_threshold: float = 0.7,
    margin_threshold: float = 0.15,
    limit: int = 200,
    strategy: str = DEFAULT_STRATEGY,
    seed: int = 0,
    use_embeddings: bool = True,
    output: str | None = None,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Write the spec's review file (default ``exports/review-<UTC stamp>.json``) and a table
    artifact of what was selected. Returns the path and counts."""
    from capture.settings import get_settings

    run_logger = get_run_logger()
    path = Path(output) if output else get_settings().exports_dir / f"review-{stamp()}.json"
    embed = serving_embedder() if use_embeddings else None
    export = export_review_task(
        path,
        url=database_url,
        days=days,
        confidence_threshold=confidence_threshold,
        margin_threshold=margin_threshold,
        limit=limit,
        strategy=strategy,
        seed=seed,
        embed=embed,
    )
    create_table_artifact(
        key="review-export",
        table=review_table(export),
        description=(
            f"{export.n_selected} of {export.n_candidates} candidates selected for review "
            f"({strategy}, limit {limit}); reasons: "
            + (", ".join(f"{k} {v}" for k, v in sorted(export.reasons.items())) or "none")
            + f"; file {export.path}"
        ),
    )
    run_logger.info(
        "review file %s: %d prompts selected of %d candidates",
        export.path,
        export.n_selected,
        export.n_candidates,
    )
    return {
        "path": str(export.path),
        "selected": export.n_selected,
        "candidates": export.n_candidates,
        "reasons": export.reasons,
    }
