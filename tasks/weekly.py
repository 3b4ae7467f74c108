"""The weekly cycle's result: what each stage did, the message that says it, and its summary
artifact (markdown, readable in the Prefect UI).

A challenger the gate rejects ends the cycle COMPLETED with a message saying so (the champion
keeps serving); any error fails the run before this is built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tasks.corrections import ImportResult, import_summary_markdown
from tasks.deploy import DeployResult
from tasks.retrain import RetrainResult
from tasks.training_data import TrainingDataExport
from tasks.training_pairs import PairsResult

logger = logging.getLogger(__name__)

WEEKLY_SUMMARY_KEY = "weekly-cycle"


def cycle_message(retrain: RetrainResult, deployed: DeployResult | None) -> str:
    """One paragraph: the gate's decision, what serves now, and where the model card is
    (``deployed`` None for a promoted challenger: the cycle ran with ``deploy=False``)."""
    if not retrain.promote:
        return (
            f"challenger {retrain.version} rejected by the gate; version "
            f"{retrain.champion_version} keeps serving. Reasons: "
            + "; ".join(retrain.decision.reasons)
            + f". Model card: {retrain.card}"
        )
    if deployed is not None:
        return (
            f"challenger {retrain.version} promoted and deployed (was "
            f"{deployed.previous}): accuracy {retrain.decision.challenger_accuracy:.2%} vs "
            f"{retrain.decision.champion_accuracy:.2%}. Model card: {retrain.card}"
        )
    return (
        f"challenger {retrain.version} promoted, not deployed (deploy=False); run the "
        f"deploy flow for version {retrain.version}. Model card: {retrain.card}"
    )


def summary_markdown(
    message: str,
    data: TrainingDataExport,
    pairs: PairsResult,
    corrections: Sequence[ImportResult] | None = None,
) -> str:
    """The weekly cycle's markdown artifact (with the inbox import's counts and each rejected
    file and its reason, when the inbox was drained)."""
    return (
        f"# Weekly cycle\n\n{message}\n\n"
        + import_summary_markdown(corrections)
        + f"- training rows: {data.n_train} ({data.counts})\n"
        f"- held out: {data.n_holdout}\n- pairs: {pairs.pairs}\n"
    )


@dataclass(frozen=True, slots=True)
class WeeklyResult:
    """What one weekly cycle did. ``corrections`` is None when the inbox was not drained;
    ``deployed`` is None when nothing was deployed (rejected, or ``deploy=False``);
    ``monitoring`` holds the headline figures published as artifacts; ``cycle_success`` is
    the success time recorded in the database for the monitor flow's staleness check."""

    corrections: list[ImportResult] | None
    training_data: TrainingDataExport
    pairs: PairsResult
    retrain: RetrainResult
    deployed: DeployResult | None
    message: str
    monitoring: dict[str, Any]
    cycle_success: datetime

    def as_dict(self) -> dict[str, Any]:
        """JSON-able values (``prompt-capture cycle --json``); id lists are left out."""
        data = {k: v for k, v in self.training_data.summary().items() if not k.endswith("_ids")}
        return {
            "corrections": (
                [r.as_dict() for r in self.corrections] if self.corrections is not None else None
            ),
            "training_data": data,
            "pairs": self.pairs.as_dict(),
            "retrain": self.retrain.as_dict(),
            "deployed": self.deployed.as_dict() if self.deployed is not None else None,
            "message": self.message,
            "monitoring": self.monitoring,
            "cycle_success": self.cycle_success.isoformat(),
        }
