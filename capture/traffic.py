"""Simulated traffic and accuracy scoring: the harness the demo, ``prompt-capture demo-traffic``
and the learning-loop simulator share.

:func:`send_traffic` sends labelled prompts through a real :class:`capture.service.NLUService`
(classifier, capture logger, database) and records a simulated workflow outcome for each: a
prompt routed to the wrong intent fails with probability ``fail_if_wrong``, a correctly routed
one with ``fail_if_right`` (a flaky downstream). :func:`run_traffic` is the whole run the demo
and the simulator make: a new service, a week of stamped prompts, everything committed.
:func:`score_classifier` is top-1 accuracy of a classifier's ``predict_batch`` on labelled
prompts. Nothing here imports Prefect or torch.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from capture import db
from capture.service import NLUService, create_nlu_service
from capture.settings import Settings
from capture.values import utc_now

logger = logging.getLogger(__name__)

SIMULATED_FAILURE = "simulated workflow failure"
OUTCOME_DELAY = timedelta(seconds=1)  # the outcome is stamped this long after the prompt


class Labelled(Protocol):
    """A labelled prompt (``tasks.records.Record`` is one)."""

    @property
    def text(self) -> str: ...

    @property
    def label(self) -> str: ...


@dataclass(frozen=True, slots=True)
class LabelledPrompt:
    """A labelled prompt built from a ``{"text", "label"}`` row (the demo dataset's rows)."""

    text: str
    label: str

    @classmethod
    def of(cls, rows: Sequence[dict[str, str]]) -> list[LabelledPrompt]:
        return [cls(r["text"], r["label"]) for r in rows]


@dataclass(frozen=True, slots=True)
class OutcomeRule:
    """How simulated workflows fail. ``seed`` fixes the draws; no workflow runs (and no outcome
    is recorded) for a prediction in ``skip_intents`` (e.g. out-of-scope)."""

    fail_if_wrong: float = 1.0
    fail_if_right: float = 0.0
    seed: int | str = 0
    skip_intents: frozenset[str] = frozenset()
    error: str = SIMULATED_FAILURE

    def __post_init__(self) -> None:
        for name in ("fail_if_wrong", "fail_if_right"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], found {value!r}")


def workflow_outcomes(
    correct: Sequence[bool], *, seed: int | str, fail_if_wrong: float, fail_if_right: float
) -> list[bool]:
    """Simulated workflow success per prompt, the draws :func:`send_traffic` makes: a
    misrouted prompt fails with probability ``fail_if_wrong``, a correctly routed one with
    ``fail_if_right``."""
    rng = random.Random(seed)
    return [rng.random() >= (fail_if_right if ok else fail_if_wrong) for ok in correct]


class SteppedClock:
    """A clock moved by hand (the service stamps ``created_at`` with it)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def spread_times(n: int, start: datetime, end: datetime) -> list[datetime]:
    """``n`` times evenly spread strictly inside ``[start, end)`` (the middle of each slot)."""
    step = (end - start) / max(1, n)
    return [start + step * (i + 0.5) for i in range(n)]


@dataclass(frozen=True, slots=True)
class Session:
    """Who sends one prompt: the user, the conversation and the message's index in it."""

    user_id: uuid.UUID
    conversation_id: uuid.UUID
    message_index: int


def make_users(n: int, rng: random.Random) -> list[uuid.UUID]:
    """``n`` random (version 4) user ids drawn from ``rng``."""
    return [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(n)]


def single_message_sessions(users: Sequence[uuid.UUID], rng: random.Random) -> Iterator[Session]:
    """Users in turn, every prompt the first message of a new conversation."""
    index = 0
    while True:
        yield Session(users[index % len(users)], uuid.UUID(int=rng.getrandbits(128), version=4), 0)
        index += 1


def conversation_sessions(
    users: Sequence[uuid.UUID], rng: random.Random, *, new_conversation: float = 0.2
) -> Iterator[Session]:
    """A random user each time, who goes on with their conversation, or (with probability
    ``new_conversation``, or on their first prompt) starts a new one."""
    open_: dict[uuid.UUID, tuple[uuid.UUID, int]] = {}
    while True:
        user = users[rng.randrange(len(users))]
        conversation, index = open_.get(user, (uuid.UUID(int=rng.getrandbits(128), version=4), 0))
        if rng.random() < new_conversation:
            conversation, index = uuid.UUID(int=rng.getrandbits(128), version=4), 0
        open_[user] = (conversation, index + 1)
        yield Session(user, conversation, index)


@dataclass(frozen=True, slots=True)
class TrafficResult:
    """What the traffic did. ``truth``/``predicted`` map log ids (str) to labels; ``outcomes``
    counts recorded workflow outcomes, ``failed`` the failed ones."""

    truth: dict[str, str]
    predicted: dict[str, str]
    outcomes: int
    failed: int
    model_version: str | None

    @property
    def sent(self) -> int:
        return len(self.truth)

    @property
    def accuracy(self) -> float:
        """Share of prompts whose live prediction was the true label (0.0 without traffic)."""
        if not self.truth:
            return 0.0
        right = sum(self.predicted[k] == v for k, v in self.truth.items())
        return right / len(self.truth)


async def send_traffic(
    service: NLUService,
    prompts: Sequence[Labelled],
    *,
    sessions: Iterator[Session],
    outcome: OutcomeRule,
    clock: SteppedClock | None = None,
    times: Sequence[datetime] | None = None,
) -> TrafficResult:
    """Send ``prompts`` through ``service`` in order and record a simulated outcome for each.

    With ``clock`` and ``times`` (one per prompt), prompt ``i`` is stamped ``times[i]`` and its
    outcome ``OUTCOME_DELAY`` later, but never later than the next prompt's time nor than now;
    without them the service's own clock stamps both. Returns once everything is flushed to the
    database. The caller opens and closes the service.

    Raises ``ValueError`` when only one of ``clock`` and ``times`` is given, when ``times``
    does not hold one time per prompt, or when one of them is in the future (a simulated clock
    never writes the future: the "last N days" windows would count those rows).
    """
    if (clock is None) != (times is None):
        raise ValueError("clock and times: give both or neither")
    if times is not None and len(times) != len(prompts):
        raise ValueError(f"times: expected {len(prompts)} times, found {len(times)}")
    started = utc_now()
    if times and max(times) > started:
        raise ValueError(
            f"times: the latest is {max(times).isoformat()}, after now ({started.isoformat()}); "
            "stamp simulated traffic in the past"
        )
    rng = random.Random(outcome.seed)
    truth: dict[str, str] = {}
    predicted: dict[str, str] = {}
    outcomes = failed = 0
    for i, prompt in enumerate(prompts):
        if clock is not None and times is not None:
            clock.now = times[i]
        session = next(sessions)
        result = await service.process_message(
            prompt.text,
            user_id=session.user_id,
            conversation_id=session.conversation_id,
            message_index=session.message_index,
        )
        log_id = str(result.log_id)
        truth[log_id] = prompt.label
        predicted[log_id] = result.intent
        if result.intent in outcome.skip_intents:
            continue  # no workflow runs for this prediction
        right = result.intent == prompt.label
        ok = rng.random() >= (outcome.fail_if_right if right else outcome.fail_if_wrong)
        if clock is not None and times is not None:
            # The outcome follows its prompt, before the next prompt and never after now.
            later = times[i + 1] if i + 1 < len(times) else started
            clock.now = max(times[i], min(times[i] + OUTCOME_DELAY, later))
        await service.update_workflow_outcome(
            result.log_id,
            was_successful=ok,
            workflow_type=result.intent,
            execution_error=None if ok else outcome.error,
        )
        outcomes += 1
        failed += not ok
    await service.flush()
    version: Any = getattr(service.classifier, "version", None)
    return TrafficResult(
        truth=truth,
        predicted=predicted,
        outcomes=outcomes,
        failed=failed,
        model_version=None if version is None else str(version),
    )


def run_traffic(
    classifier: Any,
    prompts: Sequence[Labelled],
    *,
    start: datetime,
    end: datetime,
    users: int,
    rng: random.Random,
    outcome: OutcomeRule,
    url: str,
    settings: Settings,
) -> TrafficResult:
    """Send ``prompts`` through a new NLU service (``classifier``, the database ``url``,
    ``settings``) with :func:`send_traffic`: from ``users`` simulated users (drawn from ``rng``),
    each prompt the first message of a new conversation, stamped evenly across ``[start, end)``
    (:func:`spread_times`) by a :class:`SteppedClock`, with ``outcome``'s simulated workflow
    results. Runs its own event loop; returns once everything is committed, the service is
    closed and the database engine's connections are released (the next event loop opens its
    own)."""
    sessions = single_message_sessions(make_users(users, rng), rng)
    times = spread_times(len(prompts), start, end)
    clock = SteppedClock(start)

    async def run() -> TrafficResult:
        service = create_nlu_service(classifier, url=url, settings=settings, clock=clock)
        try:
            async with service:
                return await send_traffic(
                    service, prompts, sessions=sessions, outcome=outcome, clock=clock, times=times
                )
        finally:
            await db.get_engine(url).dispose()

    return asyncio.run(run())


def score_version(classifier: Any, prompts: Sequence[Labelled]) -> tuple[float, str]:
    """:func:`score_classifier` on ``prompts`` and the version of ``classifier`` scored."""
    return score_classifier(classifier, prompts), str(classifier.version)


def score_classifier(classifier: Any, prompts: Sequence[Labelled], *, batch: int = 128) -> float:
    """Top-1 accuracy of ``classifier.predict_batch`` on ``prompts`` (in batches of ``batch``).

    Raises ``ValueError`` on an empty ``prompts``.
    """
    if not prompts:
        raise ValueError("score_classifier: expected at least one labelled prompt, found none")
    right = 0
    for begin in range(0, len(prompts), batch):
        chunk = prompts[begin : begin + batch]
        predictions = classifier.predict_batch([p.text for p in chunk])
        right += sum(p.intent == r.label for p, r in zip(predictions, chunk, strict=True))
    return right / len(prompts)
