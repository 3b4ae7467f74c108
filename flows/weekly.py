"""The weekly cycle: corrections inbox -> training data -> pairs -> retrain + gate -> deploy.

A challenger the gate rejects ends the run COMPLETED in a state named ``Rejected`` with a
message saying so (the champion keeps serving); any error fails the run. Each stage is a
subflow of this one; each gets the ``home`` and the database parameters this run got (never a
resolved URL: see ``tasks.run_settings``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from capture.errors import UserError
from capture.pointers import read_candidate
from flows.ab_check import stage_candidate_flow
from flows.corrections import corrections_flow
from flows.deploy import deploy_flow
from flows.entry import Where, open_run
from flows.pairs import pairs_flow
from flows.retrain import retrain_flow
from flows.training_data import training_data_flow
from tasks.monitor import record_cycle_success
from tasks.registry import registry_lock
from tasks.report import publish_monitoring_artifact
from tasks.retrain import final_state
from tasks.weekly import WEEKLY_SUMMARY_KEY, WeeklyResult, cycle_message, summary_markdown


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
    deploy_mode: str = "shadow",
    canary_share: float = 0.1,
    quantize: bool = True,
    monitoring_days: float = 7,
    home: str | None = None,
    database_url: str | None = None,
    database_secret: str | None = None,
) -> WeeklyResult:
    """Run the whole cycle now; returns what each stage did and the gate's decision (a rejected
    challenger ends the run COMPLETED in a state named ``Rejected``).

    It ends by publishing the monitoring figures of the last ``monitoring_days`` as artifacts
    and recording the success time that the monitor flow's staleness check reads. ``home``
    defaults to PROMPT_CAPTURE_HOME; the database to ``database_url`` (no password), the Secret
    block ``database_secret``, PROMPT_CAPTURE_DATABASE_URL, or the home's SQLite file. From the
    inbox to the deploy it holds the registry lock (``tasks.registry_lock``): a second cycle,
    retrain, deploy or rollback waits for it (and says for whom).

    ``deploy_mode`` (docs/AB_TESTING.md): ``shadow`` (default) or ``canary`` puts a promoted
    challenger under test as the registry's candidate (``canary_share`` of users for a canary)
    and the hourly ab-check flow promotes or rolls it back; ``direct`` deploys it at once (as
    before, for small teams; also whenever nothing serves yet). When a candidate is still under
    test, the challenger is published in the registry only, and the message says so.
    """
    if deploy_mode not in {"direct", "shadow", "canary"}:
        raise UserError(
            f"deploy_mode: expected direct, shadow or canary, found {deploy_mode!r}; "
            "pass one of them (docs/AB_TESTING.md)"
        )
    run = open_run(home, database_url, database_secret)
    # A home nobody set up (or not the shared one) fails first: its SQLite file is missing too,
    # and "run db upgrade" would be the wrong fix there.
    run.require_registry()
    run.require_database()  # before the lock: an unmigrated database fails at once
    # Subflows run in this home with the database parameters given here (never the resolved URL).
    where = Where(
        home=str(run.layout.home), database_url=database_url, database_secret=database_secret
    )
    # One run at a time changes the registry: the challenger's version is reserved, trained,
    # gated against the champion serving now, published and deployed with nobody in between.
    # The retrain and deploy subflows re-enter this lock (same thread). Nothing in here waits
    # for a person.
    with registry_lock(run.layout.models_dir):
        corrections = corrections_flow(**where) if import_inbox else None
        data = training_data_flow(
            days=days,
            min_confidence=min_confidence,
            holdout_fraction=holdout_fraction,
            **where,
        )
        pairs = pairs_flow(input=str(data.path), max_pairs=max_pairs, home=where["home"])
        retrain = retrain_flow(
            str(data.path),
            holdout_data=str(data.holdout_path),
            pairs_data=str(pairs.output) if pairs.pairs else None,
            warm_start=warm_start,
            hyperparameters=hyperparameters,
            max_overall_drop=max_overall_drop,
            max_intent_drop=max_intent_drop,
            min_support=min_support,
            home=where["home"],
        )
        deployed = None
        ab_note = None
        # With nothing serving there is no champion to test a candidate beside: deploy.
        direct = deploy_mode == "direct" or retrain.champion_version is None
        if retrain.promote and deploy and direct:
            deployed = deploy_flow(retrain.version, quantize=quantize, home=where["home"])
        elif retrain.promote and deploy:
            under_test = read_candidate(run.layout.models_dir)
            if under_test is not None:
                ab_note = (
                    f"challenger {retrain.version} promoted by the gate and published in the "
                    f"registry only: candidate {under_test.version} is still under test "
                    f"({under_test.mode}); deploy it later with `prompt-capture candidate set "
                    f"{retrain.version} --mode shadow`. Model card: {retrain.card}"
                )
            else:
                staged = stage_candidate_flow(
                    retrain.version,
                    mode=deploy_mode,
                    share=canary_share if deploy_mode == "canary" else None,
                    quantize=quantize,
                    home=where["home"],
                )
                ab_note = (
                    f"challenger {retrain.version} promoted by the gate and put under test as "
                    f"the {staged['mode']} candidate beside version {retrain.champion_version}; "
                    f"the hourly ab-check flow decides. Model card: {retrain.card}"
                )
    message = ab_note or cycle_message(retrain, deployed)
    get_run_logger().info(message)
    create_markdown_artifact(
        key=WEEKLY_SUMMARY_KEY,
        markdown=summary_markdown(message, data, pairs, corrections),
        description=message[:200],
    )
    monitoring = publish_monitoring_artifact(
        run.database_url, days=monitoring_days, models_dir=run.layout.models_dir
    )
    result = WeeklyResult(
        corrections=corrections,
        training_data=data,
        pairs=pairs,
        retrain=retrain,
        deployed=deployed,
        message=message,
        monitoring=monitoring,
        cycle_success=record_cycle_success(run.database_url, datetime.now(UTC)),
    )
    return final_state(result, retrain)  # a rejection ends the run in a "Rejected" state
