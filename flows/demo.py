"""The demo flow (``prompt-capture demo``, ``make demo``): the whole learning loop on the bundled
demo dataset, as one flow run with its stages as subflows and tasks.

1. a fresh home (a new sub-directory when the given one is in use), the configured database
   (PROMPT_CAPTURE_DATABASE_URL, else the home's SQLite file; refused when it holds data)
   migrated, the demo splits written as the base files;
2. the first model trained on the train split (the retrain flow with no champion), exported to
   ONNX and deployed as version 1;
3. a hot-reloading ONNX classifier serves; a week of held-back prompts (the traffic split) goes
   through the NLU service; a wrong intent makes the (simulated) workflow fail;
4. the review set exported; a stand-in reviewer fills in the true labels; the file goes through
   the real corrections import (and a re-import shows it changes nothing);
5. the weekly cycle: training data, pairs, warm-started retrain, gate, ONNX export, deploy;
6. the running classifier hot-reloads; accuracy before and after on the test split (prompts
   neither model trained on).

Every stage gets the demo's home as a parameter and resolves the same database from it and the
environment (never a URL parameter, which could carry a password): nothing rewrites the
environment.
Runs in Prefect's ephemeral mode, or against a server when PREFECT_API_URL is set.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow

from capture.settings import get_settings
from flows.corrections import corrections_flow
from flows.deploy import deploy_flow
from flows.retrain import retrain_flow
from flows.review import review_export_flow
from flows.weekly import weekly_cycle
from tasks.demo import (
    DEMO_REVIEW_LIMIT,
    DemoResult,
    accuracy,
    demo_hyperparameters,
    hot_reloading_classifier,
    prepare_demo,
    review_as_stand_in,
    send_week_of_traffic,
    wait_for_version,
)


@flow(name="demo")
def demo_flow(
    home: str | None = None, *, first_steps: int = 30, retrain_steps: int = 20, seed: int = 0
) -> DemoResult:
    """Run the demo (see the module docstring) under ``home`` (default PROMPT_CAPTURE_HOME, or
    a new ``demo-<stamp>`` folder in it when it is in use) on the configured database; returns
    what every stage did. Raises ``tasks.demo.DemoDatabaseError`` before writing anything when
    the configured database holds data."""
    started = time.monotonic()
    settings = get_settings()
    setup = prepare_demo(Path(home) if home else settings.home, seed=seed, settings=settings)
    where = str(setup.layout.home)  # every stage is given this home, and finds the database
    first = retrain_flow(
        str(setup.layout.base_file("train")),
        warm_start=False,
        hyperparameters=demo_hyperparameters(seed, first_steps),
        home=where,
    )
    first_deploy = deploy_flow(first.version, home=where)
    with hot_reloading_classifier(setup.layout.models_dir) as classifier:
        before, version_before = accuracy(classifier, setup.test)
        service_settings = settings.for_run(setup.layout.home, setup.database_url)
        traffic = send_week_of_traffic(
            classifier, setup.traffic, settings=service_settings, seed=seed
        )
        review = review_export_flow(days=7, limit=DEMO_REVIEW_LIMIT, home=where)
        reviewed = review_as_stand_in(review.path, traffic.truth, setup.layout.inbox_dir)
        imported = corrections_flow(home=where)
        again = corrections_flow(
            file=str(setup.layout.inbox_dir / "processed" / reviewed.name), home=where
        )
        # The demo compresses a week into minutes: no production evidence for an A/B test, so
        # a promoted challenger is deployed directly (the product default stages it in shadow).
        cycle = weekly_cycle(
            days=7,
            hyperparameters=demo_hyperparameters(seed, retrain_steps),
            deploy_mode="direct",
            home=where,
        )
        if cycle.deployed is not None:
            wait_for_version(classifier, cycle.retrain.version)
        after, version_after = accuracy(classifier, setup.test)
        reloads = int(classifier.reloads)
    return DemoResult(
        setup=setup,
        first=first,
        first_deploy=first_deploy,
        accuracy_before=before,
        version_before=version_before,
        traffic=traffic,
        review=review,
        imported=imported,
        reimported=again[0],
        cycle=cycle,
        reloads=reloads,
        accuracy_after=after,
        version_after=version_after,
        seconds=time.monotonic() - started,
    )
