"""Review export: this week's uncertain prompts, selected within a budget, as the review file.

Candidates are the uncorrected prompts of the window that are uncertain: confidence below the
threshold, a workflow that failed, or a small gap between the top-1 and top-2 confidences
(``capture.offline_statements.select_review_candidates``, then :func:`candidate_reasons`). The
review budget (``limit``) is spent by ``tasks.review_select.select_for_review`` (ranking by the
chosen strategy, near-duplicates collapsed). The file is ``tasks.review_file``'s format.

What to select is one value, :class:`ReviewSelection`, checked when it is built: a flow builds it
from its parameters and calls :func:`export_review` (the Prefect task
``export_review_task``), then :func:`publish_review_artifact`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from sqlalchemy import Connection

from capture.db import database_url, get_sync_engine
from capture.offline_statements import (
    ParameterError,
    check_count,
    check_days,
    check_fraction,
    select_review_candidates,
    window_start,
)
from capture.values import from_db_datetime, to_utc
from tasks.ab_readout import select_shadow_disagreements
from tasks.retry import io_task
from tasks.review_file import REVIEW_FIELDS, ReviewRow, write_review_file
from tasks.review_select import (
    DEFAULT_STRATEGY,
    EmbedFn,
    ReviewCandidate,
    check_strategy,
    select_for_review,
)

logger = logging.getLogger(__name__)

__all__ = [
    "REVIEW_ARTIFACT_KEY",
    "REVIEW_FIELDS",
    "ReviewExport",
    "ReviewSelection",
    "candidate_reasons",
    "export_review",
    "export_review_task",
    "fetch_candidates",
    "publish_review_artifact",
    "review_row",
    "review_table",
]

REVIEW_ARTIFACT_KEY = "review-export"


@dataclass(frozen=True, slots=True)
class ReviewSelection:
    """What goes into a review file: the window (``days``; None: all time), what counts as
    uncertain (confidence below ``confidence_threshold``, top-1/top-2 gap below
    ``margin_threshold``), the budget (``limit`` prompts) and the ranking ``strategy`` (with its
    ``seed``). Checked when built: ``ParameterError`` (a ``UserError``) names a bad value."""

    days: int | None = 7
    confidence_threshold: float = 0.7
    margin_threshold: float = 0.15
    limit: int = 200
    strategy: str = DEFAULT_STRATEGY
    seed: int = 0

    def __post_init__(self) -> None:
        check_days(self.days)
        check_fraction(self.confidence_threshold, "confidence_threshold")
        # A top-1/top-2 gap lies in [0, 1]; a threshold above 1 selects every prompt that has a
        # runner-up (the simulator's reviewers see everything that way), so only >= 0 is required.
        if not self.margin_threshold >= 0:
            raise ParameterError(
                f"margin_threshold: expected a number >= 0, found {self.margin_threshold!r}; "
                "pass a gap between the top two probabilities, e.g. 0.15"
            )
        check_count(self.limit, "limit", minimum=0)
        check_strategy(self.strategy)

    def ranking(self) -> Ranking:
        """The arguments of ``tasks.review_select.select_for_review`` this selection fixes."""
        return {"strategy": self.strategy, "limit": self.limit, "seed": self.seed}

    def candidates(
        self, conn: Connection, *, now: datetime
    ) -> list[tuple[ReviewCandidate, list[str]]]:
        """:func:`fetch_candidates` of this selection's window and thresholds, ending at
        ``now``: what the review file and a review round select from."""
        return fetch_candidates(
            conn,
            days=self.days,
            confidence_threshold=self.confidence_threshold,
            margin_threshold=self.margin_threshold,
            now=now,
        )


class Ranking(TypedDict):
    strategy: str
    limit: int
    seed: int


@dataclass(slots=True)
class ReviewExport:
    """What :func:`export_review` wrote and why each row was a candidate."""

    path: Path
    n_candidates: int
    selected: list[ReviewCandidate] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    selection: ReviewSelection = field(default_factory=ReviewSelection)

    @property
    def n_selected(self) -> int:
        return len(self.selected)

    def reasons_text(self) -> str:
        """``"failed 1, low-confidence 3"`` (or ``"none"``)."""
        return ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items())) or "none"


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
    """Uncorrected prompts of the window (the last ``days`` days ending at ``now``; rows dated
    after ``now`` are left out) that fail, are unsure, or nearly tie, oldest first, each with
    its :func:`candidate_reasons`; then those a shadow candidate disagreed on (reason
    ``shadow-disagreement``, ``shadow_intent`` set; docs/AB_TESTING.md)."""
    # margin >= 2 * confidence - 1, so a margin below m needs confidence below (1 + m) / 2.
    stmt = select_review_candidates(
        confidence_below=max(confidence_threshold, (1.0 + margin_threshold) / 2.0),
        since=window_start(now, days),
        until=now,
    )
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
    # Production A/B: prompts a shadow candidate disagreed on are candidates too (flagged
    # ``shadow-disagreement``); select_for_review spends part of the budget on them first.
    index = {str(c.id): k for k, (c, _) in enumerate(out)}
    for row in conn.execute(
        select_shadow_disagreements(since=window_start(now, days), until=now)
    ).mappings():
        candidate = ReviewCandidate.from_row(dict(row))
        k = index.get(str(candidate.id))
        if k is None:
            index[str(candidate.id)] = len(out)
            out.append((candidate, ["shadow-disagreement"]))
        elif out[k][0].shadow_intent is None:
            flagged = replace(out[k][0], shadow_intent=candidate.shadow_intent)
            out[k] = (flagged, [*out[k][1], "shadow-disagreement"])
    return out


def review_row(candidate: ReviewCandidate) -> ReviewRow:
    """The review-file row of a candidate (not reviewed yet)."""
    created = from_db_datetime(candidate.created_at)  # aware UTC on both databases
    return ReviewRow(
        id=str(candidate.id),
        prompt=candidate.prompt,
        predicted_intent=candidate.predicted_intent,
        confidence=float(candidate.confidence),
        created_at=created.isoformat() if created is not None else None,
    )


def _count_reasons(
    selected: Sequence[ReviewCandidate], why: dict[str, list[str]]
) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in selected:
        for reason in why[str(c.id)]:
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def export_review(
    output: Path,
    selection: ReviewSelection | None = None,
    *,
    url: str | None = None,
    embed: EmbedFn | None = None,
    now: datetime | None = None,
) -> ReviewExport:
    """Select up to ``selection.limit`` prompts for review and write them to ``output``
    (:func:`tasks.review_file.write_review_file`: a private JSON list).

    ``selection`` defaults to :class:`ReviewSelection`'s defaults. ``embed`` (e.g. the serving
    classifier's ``.embed``) enables near-duplicate collapse by cosine similarity; without it
    only prompts equal after normalisation are collapsed.
    """
    selection = selection or ReviewSelection()
    if selection.strategy == "diverse" and embed is None:  # refused before any I/O
        raise ParameterError(
            "strategy 'diverse' clusters prompt embeddings: it needs the serving model "
            "(`embed`); deploy a model first, or pick another strategy"
        )
    now = to_utc(now or datetime.now(UTC), "now")
    with get_sync_engine(database_url(url)).connect() as conn:
        found = selection.candidates(conn, now=now)
    candidates = [c for c, _ in found]
    selected = select_for_review(candidates, embed=embed, **selection.ranking())
    write_review_file(output, [review_row(c) for c in selected])
    export = ReviewExport(
        path=output,
        n_candidates=len(candidates),
        selected=selected,
        reasons=_count_reasons(selected, {str(c.id): reasons for c, reasons in found}),
        selection=selection,
    )
    logger.info(
        "review export: %d of %d candidates to %s (%s)",
        export.n_selected,
        export.n_candidates,
        output,
        export.reasons_text(),
    )
    return export


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


def publish_review_artifact(export: ReviewExport) -> None:
    """The Prefect table artifact (key ``review-export``) of what :func:`export_review` selected
    and why. Call it inside a flow or task run."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        key=REVIEW_ARTIFACT_KEY,
        table=review_table(export),
        description=(
            f"{export.n_selected} of {export.n_candidates} candidates selected for review "
            f"({export.selection.strategy}, limit {export.selection.limit}); reasons: "
            f"{export.reasons_text()}; file {export.path}"
        ),
    )


export_review_task = io_task(export_review, name="export-review")
