"""Review export: the spec's ``review`` file, a JSON list of
``{id, prompt, predicted_intent, confidence, created_at, corrected_intent: "", notes: ""}``.

Candidates are the uncorrected prompts of the window that are uncertain: confidence below the
threshold, a workflow that failed, or a small gap between the top-1 and top-2 confidences. The
review budget (``limit``) is spent by ``tasks.review_select.select_for_review`` (ranking by the
chosen strategy, near-duplicates collapsed).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy import Connection, or_, select

from capture import queries
from capture.db import database_url, get_sync_engine
from capture.models import PromptLog
from tasks.review_select import DEFAULT_STRATEGY, ReviewCandidate, select_for_review

logger = logging.getLogger(__name__)

_LOGS = PromptLog.__table__

#: The fields of one review row, in the spec's order; nothing else is written.
REVIEW_FIELDS: tuple[str, ...] = (
    "id",
    "prompt",
    "predicted_intent",
    "confidence",
    "created_at",
    "corrected_intent",
    "notes",
)


@dataclass(slots=True)
class ReviewExport:
    """What :func:`export_review` wrote and why each row was a candidate."""

    path: Path
    n_candidates: int
    selected: list[ReviewCandidate] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def n_selected(self) -> int:
        return len(self.selected)


def candidate_reasons(
    candidate: ReviewCandidate, *, confidence_threshold: float, margin_threshold: float
) -> list[str]:
    """Why a prompt is worth a reviewer's time (empty: it is not)."""
    reasons = []
    if candidate.was_successful is False:
        reasons.append("failed")
    if candidate.confidence < confidence_threshold:
        reasons.append("low-confidence")
    if candidate.secondary_intents and candidate.margin < margin_threshold:
        reasons.append("small-margin")
    return reasons


def fetch_candidates(
    conn: Connection,
    *,
    days: int | None,
    confidence_threshold: float,
    margin_threshold: float,
    now: datetime,
) -> list[tuple[ReviewCandidate, list[str]]]:
    """Uncorrected prompts of the window that fail, are unsure, or nearly tie, oldest first."""
    # margin >= 2 * confidence - 1, so a margin below m needs confidence below (1 + m) / 2.
    confidence_bound = max(confidence_threshold, (1.0 + margin_threshold) / 2.0)
    stmt = (
        select(
            _LOGS.c.id,
            _LOGS.c.prompt,
            _LOGS.c.predicted_intent,
            _LOGS.c.confidence,
            _LOGS.c.secondary_intents,
            _LOGS.c.was_successful,
            _LOGS.c.created_at,
        )
        .where(_LOGS.c.corrected_intent.is_(None))
        .where(or_(_LOGS.c.confidence < confidence_bound, _LOGS.c.was_successful.is_(False)))
        .order_by(_LOGS.c.created_at, _LOGS.c.id)
    )
    since = queries.since_days(now, days)
    if since is not None:
        stmt = stmt.where(_LOGS.c.created_at > since)
    out = []
    for row in conn.execute(stmt).mappings():
        candidate = ReviewCandidate.from_row(dict(row))
        reasons = candidate_reasons(
            candidate,
            confidence_threshold=confidence_threshold,
            margin_threshold=margin_threshold,
        )
        if reasons:
            out.append((candidate, reasons))
    return out


def review_row(candidate: ReviewCandidate) -> dict[str, Any]:
    """One row of the review file, exactly the spec's fields."""
    created = queries.from_db_datetime(candidate.created_at)  # aware UTC on both databases
    return {
        "id": str(candidate.id),
        "prompt": candidate.prompt,
        "predicted_intent": candidate.predicted_intent,
        "confidence": round(float(candidate.confidence), 4),
        "created_at": created.isoformat() if created is not None else None,
        "corrected_intent": "",
        "notes": "",
    }


def write_review_file(path: Path, candidates: Sequence[ReviewCandidate]) -> None:
    """Write the review JSON list atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    rows = [review_row(c) for c in candidates]
    tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def export_review(
    output: Path,
    *,
    url: str | None = None,
    days: int | None = 7,
    confidence_threshold: float = 0.7,
    margin_threshold: float = 0.15,
    limit: int = 200,
    strategy: str = DEFAULT_STRATEGY,
    seed: int = 0,
    embed: Callable[[Sequence[str]], np.ndarray] | None = None,
    now: datetime | None = None,
) -> ReviewExport:
    """Select up to ``limit`` prompts for review and write them to ``output``.

    ``embed`` (e.g. the serving classifier's ``.embed``) enables near-duplicate collapse by
    cosine similarity; without it only prompts equal after normalisation are collapsed.
    """
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(
            f"confidence_threshold: expected a number in [0, 1], found {confidence_threshold!r}"
        )
    now = now or datetime.now(UTC)
    with get_sync_engine(database_url(url)).connect() as conn:
        found = fetch_candidates(
            conn,
            days=days,
            confidence_threshold=confidence_threshold,
            margin_threshold=margin_threshold,
            now=now,
        )
    candidates = [c for c, _ in found]
    why = {str(c.id): reasons for c, reasons in found}
    selected = select_for_review(candidates, strategy=strategy, limit=limit, seed=seed, embed=embed)
    write_review_file(output, selected)
    counts: dict[str, int] = {}
    for c in selected:
        for reason in why[str(c.id)]:
            counts[reason] = counts.get(reason, 0) + 1
    logger.info(
        "review export: %d of %d candidates to %s (%s)",
        len(selected),
        len(candidates),
        output,
        ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none",
    )
    return ReviewExport(
        path=output, n_candidates=len(candidates), selected=selected, reasons=counts
    )


def review_table(export: ReviewExport, *, max_rows: int = 50) -> list[dict[str, Any]]:
    """Rows for the Prefect table artifact: the selected prompts with margin and outcome."""
    return [
        {
            "id": str(c.id),
            "prompt": c.prompt[:80],
            "predicted_intent": c.predicted_intent,
            "confidence": round(c.confidence, 3),
            "margin": round(c.margin, 3),
            "workflow_failed": c.was_successful is False,
        }
        for c in export.selected[:max_rows]
    ]


export_review_task = task(
    cache_policy=NO_CACHE, name="export-review", retries=2, retry_delay_seconds=2
)(export_review)
