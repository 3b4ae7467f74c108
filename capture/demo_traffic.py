"""Demo traffic: send the demo dataset's held-back prompts through the NLU service.

``prompt-capture demo-traffic --count N`` runs :func:`run_demo_traffic`: the keyword classifier
(fitted on the demo train split) classifies the traffic split through
:func:`capture.service.create_nlu_service` and the shared traffic harness
(:func:`capture.traffic.send_traffic`): a simulated workflow runs for each in-scope prediction (a
wrong intent usually fails it, a right one rarely), its outcome is recorded, and the monitoring
statistics are read back through the repository.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

from capture.ab_routing import CandidateServing
from capture.classifier import load_serving_classifier
from capture.demo_data import OOS_LABEL, KeywordClassifier, load_demo_dataset, split_demo_dataset
from capture.logger import CaptureStats
from capture.pointers import read_pointer
from capture.repository import create_nlu_repository
from capture.rows import ConfidenceBucket, IntentStats, IntentSuccessRate
from capture.service import create_nlu_service
from capture.settings import Settings
from capture.traffic import (
    LabelledPrompt,
    OutcomeRule,
    conversation_sessions,
    make_users,
    send_traffic,
)
from capture.types import Classifier

logger = logging.getLogger(__name__)

WRONG_INTENT_FAILURE_RATE = 0.8
RIGHT_INTENT_FAILURE_RATE = 0.05
#: Default number of simulated users: enough that a sticky canary split shows its share.
USERS = 200


@dataclass(frozen=True, slots=True)
class DemoTrafficReport:
    sent: int
    seconds: float
    agreement: float
    outcomes: int
    failures: int
    stats: CaptureStats
    confidence: list[ConfidenceBucket]
    intents: list[IntentStats]
    success: list[IntentSuccessRate]
    low_confidence: int
    review_threshold: float


async def run_demo_traffic(
    *, count: int, seed: int, settings: Settings, users: int = USERS
) -> DemoTrafficReport:
    """Send ``count`` prompts (the traffic split, cycled) from ``users`` simulated users and
    return what happened. When a model is deployed under ``settings.models_dir`` the registry's
    serving classifier answers (and its candidate, when one is set: docs/AB_TESTING.md); the
    keyword classifier only when none is.

    Raises :class:`capture.db.DatabaseNotMigratedError` (naming ``prompt-capture db upgrade``)
    before sending anything when the database is not migrated.
    """
    if count < 1:
        raise ValueError(f"count: expected a positive number of prompts, found {count}")
    url = settings.resolved_database_url
    splits = split_demo_dataset(load_demo_dataset(), seed=seed)
    traffic = LabelledPrompt.of(splits.traffic)
    prompts = [traffic[i % len(traffic)] for i in range(count)]
    if users < 1:
        raise ValueError(f"users: expected a positive number of users, found {users}")
    if read_pointer(settings.models_dir) is not None:
        classifier: Classifier = load_serving_classifier(settings, watch=False)
        candidate = CandidateServing(settings.models_dir, watch=False)
    else:
        classifier, candidate = KeywordClassifier.fit(splits.train), None
    service = create_nlu_service(
        classifier,
        url=url,
        settings=settings,
        candidate=candidate,
    )
    rng = random.Random(seed)
    rule = OutcomeRule(
        fail_if_wrong=WRONG_INTENT_FAILURE_RATE,
        fail_if_right=RIGHT_INTENT_FAILURE_RATE,
        seed=f"{seed}-outcomes",
        skip_intents=frozenset({OOS_LABEL}),  # nothing to run for an out-of-scope request
        error="the workflow could not complete",
    )
    start = time.perf_counter()
    try:
        sent = await send_traffic(
            service,
            prompts,
            sessions=conversation_sessions(make_users(users, rng), rng),
            outcome=rule,
        )
    finally:
        await service.aclose()
    seconds = time.perf_counter() - start

    repo = create_nlu_repository(url)
    threshold = settings.review_confidence_threshold
    return DemoTrafficReport(
        sent=count,
        seconds=seconds,
        agreement=sent.accuracy,
        outcomes=sent.outcomes,
        failures=sent.failed,
        stats=service.stats(),
        confidence=await repo.get_confidence_distribution(days=7),
        intents=await repo.get_intent_distribution(days=7),
        success=await repo.get_success_rate_by_intent(),
        low_confidence=len(await repo.get_low_confidence_prompts(threshold, limit=100_000)),
        review_threshold=threshold,
    )
