"""The NLU repository: async reads and writes of ``nlu_prompt_logs`` (SQLAlchemy 2 async).

Two layers:

- module-level async functions taking ``*, session`` (an ``AsyncSession``; the caller owns the
  transaction), for code that already has a session;
- :class:`NLURepository`, which holds the process's ``AsyncEngine`` and runs each call in its own
  short-lived session (commit on success, rollback on error). Build it with
  :func:`create_nlu_repository`, which refuses a database whose schema is not at head.

Every statement comes from :mod:`capture.queries`, which the synchronous Prefect tasks use too.

Stored shapes:

- ``id`` is a client-made UUIDv7 (:data:`capture.ids.uuid7`) unless the caller passes one.
- ``secondary_intents`` is a JSON list of ``{"intent": str, "confidence": float}`` objects, best
  first (the capture logger writes the same shape); read back as ``(intent, confidence)`` pairs.
- ``confidence`` is stored rounded to float4 (``queries.as_real``) on both databases.
- Timestamps are written from the injected clock as UTC and read back timezone-aware UTC.

User scoping (privacy): ``get_user_prompts`` and the ``user_id=`` forms of the updates run
:func:`user_scope` first. On PostgreSQL that sets ``app.user_id`` for the transaction, which the
row-level-security policies of migration 0003 enforce for the application role; on SQLite (no
row-level security) the statements' own ``WHERE user_id = :uid`` does the scoping. The ``WHERE``
clause is added on PostgreSQL as well, so a connection that bypasses RLS (owner, superuser) is
scoped the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from capture import db, queries
from capture.ids import uuid7
from capture.queries import (
    ConfidenceBucket,
    IntentStats,
    IntentSuccessRate,
    PromptLogRow,
    RetrainingRow,
    SecondaryIntents,
    StatsCover,
    StatsRefresh,
    utc_now,
)

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]

__all__ = [
    "Clock",
    "ConfidenceBucket",
    "IntentStats",
    "IntentSuccessRate",
    "NLURepository",
    "PromptLogRow",
    "RetrainingRow",
    "StatsRefresh",
    "UnknownLogIdError",
    "add_prompt_correction",
    "create_nlu_repository",
    "get_confidence_distribution",
    "get_failed_workflow_prompts",
    "get_intent_distribution",
    "get_low_confidence_prompts",
    "get_prompt_log",
    "get_prompts_for_retraining",
    "get_success_rate_by_intent",
    "get_user_prompts",
    "log_prompt",
    "refresh_prompt_stats",
    "update_prompt_log_outcome",
    "user_scope",
]


class UnknownLogIdError(ValueError):
    """No prompt log has this id (or, for a user-scoped call, none of that user's has)."""

    def __init__(self, log_id: uuid.UUID, user_id: uuid.UUID | str | None = None) -> None:
        self.log_id = log_id
        self.user_id = user_id
        owner = f" belonging to user {user_id}" if user_id is not None else ""
        super().__init__(
            f"log_id: no prompt log with id {log_id}{owner}; "
            "use the log_id returned by log_prompt / process_message"
        )


def _is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


async def user_scope(session: AsyncSession, user_id: uuid.UUID | str) -> None:
    """Scope the session's current transaction to ``user_id``.

    PostgreSQL: ``set_config('app.user_id', uid, true)`` (transaction-local), which the RLS
    policies read. SQLite has no RLS: user-scoped statements carry ``WHERE user_id = :uid``.
    """
    statement = queries.set_user_scope(user_id)
    if _is_postgres(session):
        await session.execute(statement)


# --------------------------------------------------------------------------- writes


async def log_prompt(
    prompt: str,
    predicted_intent: str,
    confidence: float,
    secondary_intents: SecondaryIntents = (),
    *,
    session: AsyncSession,
    user_id: uuid.UUID | str | None = None,
    conversation_id: uuid.UUID | str | None = None,
    message_index: int | None = None,
    model_version: str | None = None,
    log_id: uuid.UUID | str | None = None,
    created_at: datetime | None = None,
    clock: Clock = utc_now,
) -> uuid.UUID:
    """Insert one prediction and return its id. ``ValueError`` names a bad field."""
    values = queries.prompt_log_values(
        log_id=uuid7() if log_id is None else queries.as_uuid(log_id, "log_id"),
        prompt=prompt,
        predicted_intent=predicted_intent,
        confidence=confidence,
        secondary_intents=secondary_intents,
        user_id=user_id,
        conversation_id=conversation_id,
        message_index=message_index,
        model_version=model_version,
        created_at=clock() if created_at is None else created_at,
    )
    if values["user_id"] is not None:
        await user_scope(session, values["user_id"])
    await session.execute(queries.insert_prompt_logs(), values)
    new_id: uuid.UUID = values["id"]
    return new_id


async def update_prompt_log_outcome(
    log_id: uuid.UUID | str,
    was_successful: bool,
    workflow_type: str | None,
    execution_error: str | None = None,
    *,
    session: AsyncSession,
    user_id: uuid.UUID | str | None = None,
) -> None:
    """Record a workflow's outcome; :class:`UnknownLogIdError` when no row matches."""
    uid = queries.as_uuid(log_id, "log_id")
    statement = queries.update_outcome(
        uid,
        was_successful=was_successful,
        workflow_type=workflow_type,
        execution_error=execution_error,
        user_id=user_id,
    )
    if user_id is not None:
        await user_scope(session, user_id)
    result = await session.execute(statement)
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise UnknownLogIdError(uid, user_id)


async def add_prompt_correction(
    log_id: uuid.UUID | str,
    corrected_intent: str,
    correction_notes: str | None = None,
    *,
    session: AsyncSession,
    user_id: uuid.UUID | str | None = None,
    clock: Clock = utc_now,
) -> None:
    """Record a human correction (sets ``corrected_at``); :class:`UnknownLogIdError` when no
    row matches."""
    uid = queries.as_uuid(log_id, "log_id")
    statement = queries.update_correction(
        uid,
        corrected_intent=corrected_intent,
        correction_notes=correction_notes,
        corrected_at=clock(),
        user_id=user_id,
    )
    if user_id is not None:
        await user_scope(session, user_id)
    result = await session.execute(statement)
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise UnknownLogIdError(uid, user_id)


# --------------------------------------------------------------------------- reads


async def get_prompt_log(log_id: uuid.UUID | str, *, session: AsyncSession) -> PromptLogRow | None:
    row = (await session.execute(queries.select_prompt_log(log_id))).first()
    return None if row is None else queries.map_prompt_log(row)


async def get_user_prompts(
    user_id: uuid.UUID | str, limit: int = 50, *, session: AsyncSession
) -> list[PromptLogRow]:
    """The user's own prompts, newest first (RLS-scoped on PostgreSQL)."""
    statement = queries.select_user_prompts(user_id, limit=limit)
    await user_scope(session, user_id)
    return [queries.map_prompt_log(r) for r in await session.execute(statement)]


async def get_low_confidence_prompts(
    threshold: float = 0.7,
    limit: int = 100,
    days: float | None = None,
    *,
    session: AsyncSession,
    clock: Clock = utc_now,
) -> list[PromptLogRow]:
    """Uncorrected prompts below ``threshold``, lowest confidence first."""
    statement = queries.select_low_confidence(
        threshold=threshold, limit=limit, since=queries.since_days(clock(), days)
    )
    return [queries.map_prompt_log(r) for r in await session.execute(statement)]


async def get_failed_workflow_prompts(
    limit: int = 100, *, session: AsyncSession
) -> list[PromptLogRow]:
    """Prompts whose workflow failed, newest first."""
    statement = queries.select_failed_workflows(limit=limit)
    return [queries.map_prompt_log(r) for r in await session.execute(statement)]


async def get_prompts_for_retraining(
    days: float | None = None,
    min_confidence: float = 0.9,
    *,
    session: AsyncSession,
    clock: Clock = utc_now,
) -> list[RetrainingRow]:
    """Corrected prompts plus confident uncorrected ones whose workflow did not fail."""
    statement = queries.select_for_retraining(
        min_confidence=min_confidence, since=queries.since_days(clock(), days)
    )
    return [queries.map_retraining_row(r) for r in await session.execute(statement)]


async def _stats_cover(session: AsyncSession, since: datetime | None) -> StatsCover | None:
    """Where the statistics over ``created_at > since`` read from (rollup and/or raw table)."""
    rows = (await session.execute(queries.select_stats_cover_state())).all()
    return queries.stats_cover_from_rows(rows, since)


async def get_confidence_distribution(
    days: float | None = 7, *, session: AsyncSession, clock: Clock = utc_now
) -> list[ConfidenceBucket]:
    """Rows per confidence bucket (one decimal) over the last ``days`` days, highest first."""
    since = queries.since_days(clock(), days)
    statement = queries.select_confidence_distribution(
        since=since, cover=await _stats_cover(session, since)
    )
    return [queries.map_confidence_bucket(r) for r in await session.execute(statement)]


async def get_intent_distribution(
    days: float | None = 7, *, session: AsyncSession, clock: Clock = utc_now
) -> list[IntentStats]:
    """Per predicted intent: rows, average confidence, corrections; most frequent first."""
    since = queries.since_days(clock(), days)
    statement = queries.select_intent_distribution(
        since=since, cover=await _stats_cover(session, since)
    )
    return [queries.map_intent_stats(r) for r in await session.execute(statement)]


async def get_success_rate_by_intent(
    days: float | None = None, *, session: AsyncSession, clock: Clock = utc_now
) -> list[IntentSuccessRate]:
    """Per predicted intent with a known outcome: total, successes, rate; lowest rate first.
    ``days=None`` (the default) is all time: the rollup keeps that cheap."""
    since = queries.since_days(clock(), days)
    statement = queries.select_success_rate_by_intent(
        since=since, cover=await _stats_cover(session, since)
    )
    return [queries.map_success_rate(r) for r in await session.execute(statement)]


async def refresh_prompt_stats(
    *,
    session: AsyncSession,
    until: datetime | None = None,
    wait_timeout: float = 30.0,
    poll_interval: float = 0.05,
) -> StatsRefresh:
    """Bring the monitoring rollup up to date (see :func:`capture.queries.refresh_prompt_stats`;
    the caller owns the transaction). The statistics are exact with or without it; it keeps
    them fast. Waiting for concurrent writers (PostgreSQL) does not block the event loop."""
    start = await session.run_sync(queries.refresh_begin)
    left = start.writers
    deadline = time.monotonic() + wait_timeout
    while left and time.monotonic() < deadline:
        await asyncio.sleep(poll_interval)
        result = await session.execute(queries.select_raw_writers_left(left))
        left = tuple(result.scalars())
    return await session.run_sync(
        lambda sync_session: queries.refresh_finish(
            sync_session, start, writers_left=left, until=until
        )
    )


# --------------------------------------------------------------------------- the class


class NLURepository:
    """The repository over one database: each call runs in its own short-lived session."""

    def __init__(self, engine: AsyncEngine, *, clock: Clock = utc_now) -> None:
        self.engine = engine
        self.clock = clock

    async def log_prompt(
        self,
        prompt: str,
        predicted_intent: str,
        confidence: float,
        secondary_intents: SecondaryIntents = (),
        *,
        user_id: uuid.UUID | str | None = None,
        conversation_id: uuid.UUID | str | None = None,
        message_index: int | None = None,
        model_version: str | None = None,
        log_id: uuid.UUID | str | None = None,
        created_at: datetime | None = None,
    ) -> uuid.UUID:
        async with db.session_scope(self.engine) as session:
            return await log_prompt(
                prompt,
                predicted_intent,
                confidence,
                secondary_intents,
                session=session,
                user_id=user_id,
                conversation_id=conversation_id,
                message_index=message_index,
                model_version=model_version,
                log_id=log_id,
                created_at=created_at,
                clock=self.clock,
            )

    async def update_prompt_log_outcome(
        self,
        log_id: uuid.UUID | str,
        was_successful: bool,
        workflow_type: str | None,
        execution_error: str | None = None,
        *,
        user_id: uuid.UUID | str | None = None,
    ) -> None:
        async with db.session_scope(self.engine) as session:
            await update_prompt_log_outcome(
                log_id,
                was_successful,
                workflow_type,
                execution_error,
                session=session,
                user_id=user_id,
            )

    async def add_prompt_correction(
        self,
        log_id: uuid.UUID | str,
        corrected_intent: str,
        correction_notes: str | None = None,
        *,
        user_id: uuid.UUID | str | None = None,
    ) -> None:
        async with db.session_scope(self.engine) as session:
            await add_prompt_correction(
                log_id,
                corrected_intent,
                correction_notes,
                session=session,
                user_id=user_id,
                clock=self.clock,
            )

    async def get_prompt_log(self, log_id: uuid.UUID | str) -> PromptLogRow | None:
        async with db.session_scope(self.engine) as session:
            return await get_prompt_log(log_id, session=session)

    async def get_user_prompts(
        self, user_id: uuid.UUID | str, limit: int = 50
    ) -> list[PromptLogRow]:
        async with db.session_scope(self.engine) as session:
            return await get_user_prompts(user_id, limit, session=session)

    async def get_low_confidence_prompts(
        self, threshold: float = 0.7, limit: int = 100, days: float | None = None
    ) -> list[PromptLogRow]:
        async with db.session_scope(self.engine) as session:
            return await get_low_confidence_prompts(
                threshold, limit, days, session=session, clock=self.clock
            )

    async def get_failed_workflow_prompts(self, limit: int = 100) -> list[PromptLogRow]:
        async with db.session_scope(self.engine) as session:
            return await get_failed_workflow_prompts(limit, session=session)

    async def get_prompts_for_retraining(
        self, days: float | None = None, min_confidence: float = 0.9
    ) -> list[RetrainingRow]:
        async with db.session_scope(self.engine) as session:
            return await get_prompts_for_retraining(
                days, min_confidence, session=session, clock=self.clock
            )

    async def get_confidence_distribution(self, days: float | None = 7) -> list[ConfidenceBucket]:
        async with db.session_scope(self.engine) as session:
            return await get_confidence_distribution(days, session=session, clock=self.clock)

    async def get_intent_distribution(self, days: float | None = 7) -> list[IntentStats]:
        async with db.session_scope(self.engine) as session:
            return await get_intent_distribution(days, session=session, clock=self.clock)

    async def get_success_rate_by_intent(
        self, days: float | None = None
    ) -> list[IntentSuccessRate]:
        async with db.session_scope(self.engine) as session:
            return await get_success_rate_by_intent(days, session=session, clock=self.clock)

    async def refresh_prompt_stats(
        self, *, until: datetime | None = None, wait_timeout: float = 30.0
    ) -> StatsRefresh:
        async with db.session_scope(self.engine) as session:
            return await refresh_prompt_stats(
                session=session, until=until, wait_timeout=wait_timeout
            )


def create_nlu_repository(url: str | None = None, *, clock: Clock = utc_now) -> NLURepository:
    """The repository over ``url`` (default: the settings' database).

    Raises :class:`capture.db.DatabaseNotMigratedError` (naming ``prompt-capture db upgrade``)
    unless the schema is at the head revision.
    """
    db.ensure_migrated(url)
    return NLURepository(db.get_engine(url), clock=clock)
