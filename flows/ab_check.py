"""The hourly ``ab-check`` flow: read the A/B evidence of the candidate and act on it.

1. Read the readout (:func:`tasks.ab_readout.ab_readout`, no lock) and publish it as the keyed
   artifacts ``ab-readout`` (markdown) and ``ab-readout-arms`` (table).
2. With ``require_approval`` and a ``promote`` decision, pause the run
   (``pause_flow_run(wait_for_input=ABApproval)``) OUTSIDE the registry lock, showing the
   readout; the reviewer approves or rejects with a reason; a timeout rejects (the champion
   stays and the candidate is cleared).
3. Under the ONE registry lock, carry the decision out (:func:`tasks.ab_candidate.
   apply_decision`), which does nothing when the candidate changed since step 1.
4. A rollback (significantly worse, or the guardrail) alerts through the monitor's channels
   (the alert webhook setting and/or a Prefect notification block).
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from flows.entry import from_parameters, open_run
from tasks.ab_candidate import DEFAULT_CANARY_SHARE, apply_decision
from tasks.ab_decision import ABPlan
from tasks.ab_readout import ABReadout, ab_readout
from tasks.alert_delivery import send_block, send_webhook

logger = logging.getLogger(__name__)

READOUT_KEY = "ab-readout"
ARMS_KEY = "ab-readout-arms"


class ABApproval(RunInput):
    """The reviewer's answer in the Prefect UI."""

    approve: bool = False
    reason: str = ""


def publish_readout(readout: ABReadout) -> None:
    """The readout as keyed Prefect artifacts (markdown + arms table)."""
    create_markdown_artifact(
        key=READOUT_KEY, markdown=readout.to_markdown(), description="A/B readout"
    )
    rows = [arm.to_dict() for arm in (readout.champion_arm, readout.candidate_arm) if arm]
    if rows:
        create_table_artifact(key=ARMS_KEY, table=rows, description="A/B arms")


def send_ab_alert(
    message: str, *, webhook_url: str | None, notification_block: str | None
) -> list[dict[str, Any]]:
    """Send ``message`` to the monitor's channels; returns one delivery record per channel."""
    deliveries = []
    if webhook_url:
        d = send_webhook(webhook_url, {"text": message})
        deliveries.append({"channel": d.channel, "ok": d.ok, "error": d.error})
    if notification_block:
        d = send_block(notification_block, "Prompt Capture A/B", message)
        deliveries.append({"channel": d.channel, "ok": d.ok, "error": d.error})
    if not deliveries:
        logger.warning("A/B alert not sent (no webhook or notification block): %s", message)
    return deliveries


def ask_approval(readout: ABReadout, timeout_s: int) -> tuple[bool, str]:
    """Pause for a reviewer's :class:`ABApproval`; ``(False, "timeout")`` when nobody answers."""
    run_logger = get_run_logger()
    run_logger.info("waiting up to %ds for approval:\n%s", timeout_s, readout.to_markdown())
    try:
        answer = pause_flow_run(
            wait_for_input=ABApproval.with_initial_data(
                description=readout.to_markdown(), approve=False
            ),
            timeout=timeout_s,
            poll_interval=1,
        )
    except FlowPauseTimeout:
        return False, f"no approval within {timeout_s}s: rejected, the champion stays"
    return bool(answer.approve), answer.reason or ("approved" if answer.approve else "rejected")


@flow(name="ab-check")
def ab_check_flow(
    *,
    require_approval: bool = False,
    approval_timeout_s: int = 3600,
    canary_share: float = DEFAULT_CANARY_SHARE,
    margin: float = 0.01,
    max_days: float = 28.0,
    min_outcomes: int = 200,
    webhook_url: str | None = None,
    notification_block: str | None = None,
    home: str | None = None,
    database_url: str | None = None,
    database_secret: str | None = None,
) -> dict[str, Any]:
    """Read the candidate's A/B evidence and promote, roll back, move it on to a canary, or
    keep testing (docs/AB_TESTING.md). Returns the readout and what was done."""
    plan = from_parameters(ABPlan, locals())  # margin, max_days, min_outcomes
    run_logger = get_run_logger()
    run = open_run(home, database_url, database_secret)
    models_dir = run.require_registry()  # a home nobody set up fails at once
    readout = ab_readout(run.database_url, models_dir, plan=plan)
    publish_readout(readout)
    run_logger.info("A/B: %s (%s)", readout.decision, readout.reason)
    result: dict[str, Any] = {"readout": readout.to_dict(), "action": None}
    if readout.candidate is None or readout.decision in {"keep-testing", "none"}:
        return result
    decision, reason = readout.decision, readout.reason
    if decision == "promote" and require_approval:
        approved, why = ask_approval(readout, approval_timeout_s)  # never under the lock
        result["approval"] = {"approved": approved, "reason": why}
        if not approved:
            decision, reason = "reject", f"approval refused: {why}"
    action = apply_decision(
        models_dir,
        decided_on=readout.candidate,
        decision=decision,
        reason=reason,
        canary_share=canary_share,
    )
    result["action"] = action
    run_logger.info("A/B action: %s", action)
    if decision == "rollback" and action.get("applied"):
        message = (
            f"A/B rollback: candidate {readout.candidate} cleared, champion {readout.champion} "
            f"keeps all traffic ({reason})"
        )
        result["alerts"] = send_ab_alert(
            message,
            webhook_url=webhook_url or run.settings.alert_webhook_url or None,
            notification_block=notification_block,
        )
    return result


@flow(name="stage-candidate")
def stage_candidate_flow(
    version: str,
    *,
    mode: str = "shadow",
    share: float | None = None,
    quantize: bool = True,
    validation_data: str | None = None,
    home: str | None = None,
) -> dict[str, Any]:
    """Export ``version`` to ONNX when needed (with its fast path when the settings turn it on)
    and put it under test as the candidate in ``mode`` (``shadow``, or ``canary`` with ``share``
    of users: default ``DEFAULT_CANARY_SHARE``; a shadow takes none), under the registry lock
    (re-entered inside the weekly cycle). Returns the candidate pointer as a dict."""
    from tasks.ab_candidate import set_candidate
    from tasks.deploy import choose_version, export_for_serving
    from tasks.registry import is_deployable, registry_lock

    run = open_run(home)
    run.require_registry()
    layout = run.layout
    with registry_lock(layout.models_dir):
        target = choose_version(layout.models_dir, version, allow_rejected=False)
        if not is_deployable(target):
            validation = layout.optional_file(validation_data, "val")
            export_for_serving(
                target, quantize=quantize, validation_data=validation, settings=run.settings
            )
        pointer = set_candidate(
            layout.models_dir, target.name, mode=mode, share=share, reason="weekly cycle"
        )
    get_run_logger().info("version %s under test as the %s candidate", pointer.version, mode)
    return pointer.to_dict()
