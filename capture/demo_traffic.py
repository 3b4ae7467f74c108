"""Demo traffic: send the demo dataset's held-back prompts through the NLU service.

``prompt-capture demo-traffic --count N`` runs :func:`run_demo_traffic`: the keyword classifier
(fitted on the demo train split) classifies the traffic split through
:func:`capture.service.create_nlu_service`, a simulated workflow runs for each in-scope
prediction (a wrong intent usually fails it, a right one rarely), its outcome is recorded, and the
monitoring statistics are read back through the repository.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass

from capture.demo_data import OOS_LABEL, KeywordClassifier, load_demo_dataset, split_demo_dataset
from capture.logger import CaptureStats
from capture.queries import ConfidenceBucket, IntentStats, IntentSuccessRate
from capture.repository import create_nlu_repository
from capture.service import create_nlu_service
from capture.settings import Settings

logger = logging.getLogger(__name__)

WRONG_INTENT_FAILURE_RATE = 0.8
RIGHT_INTENT_FAILURE_RATE = 0.05
USERS = 25


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


async def run_demo_traffic(*, count: int, seed: int, settings: Settings) -> DemoTrafficReport:
    """Send ``count`` prompts (the traffic split, cycled) and return what happened.

    Raises :class:`capture.db.DatabaseNotMigratedError` (naming ``prompt-capture db upgrade``)
    before sending anything when the database is not migrated.
    """
    if count < 1:
        raise ValueError(f"count: expected a positive number of prompts, found {count}")
    url = settings.resolved_database_url
    splits = split_demo_dataset(load_demo_dataset(), seed=seed)
    service = create_nlu_service(KeywordClassifier.fit(splits.train), url=url, settings=settings)
    rng = random.Random(seed)
    users = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(USERS)]
    conversations: dict[uuid.UUID, tuple[uuid.UUID, int]] = {}
    agree = outcomes = failures = 0
    start = time.perf_counter()
    try:
        for i in range(count):
            record = splits.traffic[i % len(splits.traffic)]
            user = users[rng.randrange(USERS)]
            conversation, index = conversations.get(user, (uuid.uuid4(), 0))
            if rng.random() < 0.2:  # a new conversation
                conversation, index = uuid.uuid4(), 0
            conversations[user] = (conversation, index + 1)
            result = await service.process_message(
                record["text"], user_id=user, conversation_id=conversation, message_index=index
            )
            right = result.intent == record["label"]
            agree += right
            if result.intent == OOS_LABEL:
                continue  # nothing to run for an out-of-scope request
            rate = RIGHT_INTENT_FAILURE_RATE if right else WRONG_INTENT_FAILURE_RATE
            failed = rng.random() < rate
            await service.update_workflow_outcome(
                result.log_id,
                was_successful=not failed,
                workflow_type=result.intent,
                execution_error=(
                    None if not failed else f"{result.intent} workflow could not complete"
                ),
            )
            outcomes += 1
            failures += failed
    finally:
        await service.aclose()
    seconds = time.perf_counter() - start

    repo = create_nlu_repository(url)
    threshold = settings.review_confidence_threshold
    return DemoTrafficReport(
        sent=count,
        seconds=seconds,
        agreement=agree / count,
        outcomes=outcomes,
        failures=failures,
        stats=service.stats(),
        confidence=await repo.get_confidence_distribution(days=7),
        intents=await repo.get_intent_distribution(days=7),
        success=await repo.get_success_rate_by_intent(),
        low_confidence=len(await repo.get_low_confidence_prompts(threshold, limit=100_000)),
        review_threshold=threshold,
    )
