"""The weekly cycle: corrections inbox -> training data -> pairs -> retrain + gate -> deploy.

A challenger the gate rejects ends the run COMPLETED with a message saying so (the champion
keeps serving); any error fails the run.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from capture.settings import get_settings
from flows.corrections import corrections_flow
from flows.deploy import deploy_flow
from flows.pairs import pairs_flow
from flows.retrain import retrain_flow
from flows.training_data import training_data_flow
from tasks.monitor import record_cycle_success
from tasks.report import publish_monitoring_artifact

logger = logging.getLogger(__name__)

WEEKLY_SUMMARY_KEY = "weekly-cycle"


@flow(name="weekly-cycle")
def weekly_cycle(
    *,
    days: int | None = 30,
    min_confidence: float = 0.9,
    holdout_fraction: float = 0.2,
    import_inbox: bool = True,
    max_pairs: int = 2000,
    warm_start: bool = True,
    hyperparameters: dict[str, Any] | None = None,
    max_overall_drop: float = 0.0,
    max_intent_drop: float = 0.05,
    min_support: int = 10,
    deploy: bool = True,
    quantize: bool = True,
    monitoring_days: float = 7,
    database_url: str | None = None,
) -> dict[str, Any]:
    """Run the whole cycle now; returns what each stage did and the gate's decision.

    It ends by publishing the monitoring figures of the last ``monitoring_days`` as artifacts
    and recording the success time that the monitor flow's staleness check reads.
    """
    run_logger = get_run_logger()
    summary: dict[str, Any] = {}
    if import_inbox:
        summary["corrections"] = corrections_flow(database_url=database_url)
    data = training_data_flow(
        days=days,
        min_confidence=min_confidence,
        holdout_fraction=holdout_fraction,
        database_url=database_url,
    )
    summary["training_data"] = {k: v for k, v in data.items() if not k.endswith("_ids")}
    pairs = pairs_flow(input=data["training_data"], max_pairs=max_pairs)
    summary["pairs"] = pairs
    result = retrain_flow(
        data["training_data"],
        holdout_data=data["holdout_data"],
        pairs_data=pairs["output"] if pairs["pairs"] else None,
        warm_start=warm_start,
        hyperparameters=hyperparameters,
        max_overall_drop=max_overall_drop,
        max_intent_drop=max_intent_drop,
        min_support=min_support,
    )
    summary["retrain"] = result
    if not result["promote"]:
        message = (
            f"challenger {result['version']} rejected by the gate; version "
            f"{result['champion_version']} keeps serving. Reasons: "
            + "; ".join(result["reasons"])
            + f". Model card: {result['card']}"
        )
        summary["deployed"] = None
    elif deploy:
        deployed = deploy_flow(result["version"], quantize=quantize)
        summary["deployed"] = deployed
        message = (
            f"challenger {result['version']} promoted and deployed (was "
            f"{deployed['previous']}): accuracy {result['challenger_accuracy']:.2%} vs "
            f"{result['champion_accuracy']:.2%}. Model card: {result['card']}"
        )
    else:
        summary["deployed"] = None
        message = (
            f"challenger {result['version']} promoted, not deployed (deploy=False); run the "
            f"deploy flow for version {result['version']}. Model card: {result['card']}"
        )
    summary["message"] = message
    run_logger.info(message)
    create_markdown_artifact(
        key=WEEKLY_SUMMARY_KEY,
        markdown=f"# Weekly cycle\n\n{message}\n\n"
        f"- training rows: {data['n_train']} ({data['counts']})\n"
        f"- held out: {data['n_holdout']}\n- pairs: {pairs['pairs']}\n",
        description=message[:200],
    )
    summary["monitoring"] = publish_monitoring_artifact(database_url, days=monitoring_days)
    summary["success_marker"] = str(record_cycle_success(get_settings().home, datetime.now(UTC)))
    return summary
