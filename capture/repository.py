"""The NLU repository: async reads and writes of ``nlu_prompt_logs`` (SQLAlchemy 2 async).

Two layers:

- module-level async functions taking ``*, session`` (an ``AsyncSession``; the caller owns the
  transaction), for code that already has a session;
- :class:`NLURepository`, which holds the process's ``AsyncEngine`` and runs each call in its own
  short-lived session (commit on success, rollback on error). Build it with
  :func:`create_nlu_repository`, which refuses a database whose schema is not at head.

Every statement comes from :mod:`capture.statements` (rows mapped by :mod:`capture.rows`), which
the synchronous Prefect tasks use too.

Stored shapes:

- ``id`` is a client-made UUIDv7 (:data:`capture.ids.uuid7`) unless the caller passes one.
- ``secondary_intents`` is a JSON list of ``{"intent": str, "confidence": float}`` objects, best
  first (the capture logger writes the same shape); read back as ``(intent, confidence)`` pairs.
- Text goes through :mod:`capture.text` (via :mod:`capture.rows`), as the NLU service's does:
  ``prompt`` as ``clean_prompt`` makes it (refused when nothing is left), ``correction_notes``,
  ``workflow_type``, ``execution_error`` as ``clean_notes`` (blank -> ``None``), and
  ``predicted_intent``, the runners-up and ``corrected_intent`` must be in the allowed form of
  ``check_intent_name`` (``IntentNameError``, a ``ValueError``, otherwise). SQLite and
  PostgreSQL therefore store the same strings.
- ``confidence`` is stored rounded to float4 (``as_real``) on both databases.
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
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar, Unpack

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from capture import db, review_audit, statements, stats_rollup
from capture.errors import UserError
from capture.ids import uuid7
from capture.rows import (
    Change,
    ConfidenceBucket,
    Correction,
    IntentStats,
    IntentSuccessRate,
    Outcome,
    PromptContext,
    PromptLogRow,
    RetrainingRow,
    map_confidence_bucket,
    map_intent_stats,
    map_prompt_log,
    map_retraining_row,
    map_success_rate,
    prompt_log_values,
)
from capture.statements import AnySelect
from capture.stats_rollup import StatsCover, StatsRefresh
from capture.values import SecondaryIntents, as_uuid, since_days, utc_now

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]
_T = TypeVar("_T")
_Row = TypeVar("_Row")

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


class UnknownLogIdError(UserError, ValueError):
    """No prompt log has this id (or, for a user-scoped call, none of that user's has); the fix
    is to pass a ``log_id`` that ``log_prompt`` / ``process_message`` returned."""

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
    statement = statements.set_user_scope(user_id)
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
    log_id: uuid.UUID | str | None = None,
    created_at: datetime | None = None,
    clock: Clock = utc_now,
    **context: Unpack[PromptContext],
) -> uuid.UUID:
    """Insert one prediction and return its id (``context``: ``user_id``, ``conversation_id``,
    ``message_index``, ``model_version``). ``ValueError`` names a bad field."""
    values = prompt_log_values(
        log_id=uuid7() if log_id is None else as_uuid(log_id, "log_id"),
        prompt=prompt,
        predicted_intent=predicted_intent,
        confidence=confidence,
        secondary_intents=secondary_intents,
        created_at=clock() if created_at is None else created_at,
        **context,
    )
    if values["user_id"] is not None:
        await user_scope(session, values["user_id"])
    await session.execute(statements.insert_prompt_logs(), values)
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
    clock: Clock = utc_now,
) -> None:
    """Record a workflow's outcome (``updated_at`` from ``clock``); :class:`UnknownLogIdError`
    when no row matches."""
    change = Outcome.checked(
        log_id,
        was_successful=was_successful,
        workflow_type=workflow_type,
        execution_error=execution_error,
        at=clock(),
    )
    await _write_change(change, session=session, user_id=user_id)


async def add_prompt_correction(
    log_id: uuid.UUID | str,
    corrected_intent: str,
    correction_notes: str | None = None,
    *,
    session: AsyncSession,
    user_id: uuid.UUID | str | None = None,
    clock: Clock = utc_now,
    reviewer: str | None = None,
) -> None:
    """Record a human correction (sets ``corrected_at``); :class:`UnknownLogIdError` when no
    row matches. Writes the review audit row too (``capture.review_audit``, source ``api``,
    as the workbench and the file import do); ``reviewer`` names who corrected (default: the
    ``user_id``, else ``"api"``)."""
    change = Correction.checked(
        log_id, corrected_intent=corrected_intent, correction_notes=correction_notes, at=clock()
    )
    if user_id is not None:
        await user_scope(session, user_id)  # PostgreSQL RLS: the prior values are the user's
    before = await get_prompt_log(change.log_id, session=session)
    await _write_change(change, session=session, user_id=user_id)
    row = review_audit.correction_audit(
        before,
        change.log_id,
        change.corrected_intent,
        change.correction_notes,
        reviewer=reviewer or (str(user_id) if user_id is not None else "api"),
        source="api",
        now=change.at,
    )
    await session.execute(review_audit.insert_audit(row))


async def _write_change(
    change: Change, *, session: AsyncSession, user_id: uuid.UUID | str | None
) -> None:
    """Run the shared update statement for ``change`` (user-scoped when ``user_id`` is given).

    PostgreSQL: first near the id's time (one partition), then, if that found nothing, over
    every partition (see ``capture.statements.id_time_window``)."""
    if user_id is not None:
        await user_scope(session, user_id)
    if _near_id_time(session, change.log_id):
        near = statements.update_change(change, user_id=user_id, near_id_time=True)
        if (await session.execute(near)).rowcount:  # type: ignore[attr-defined]
            return
    result = await session.execute(statements.update_change(change, user_id=user_id))
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise UnknownLogIdError(change.log_id, user_id)


def _near_id_time(session: AsyncSession, log_id: uuid.UUID) -> bool:
    """Whether a lookup of ``log_id`` should first search near the id's time: on PostgreSQL
    (partitioned by ``created_at``), for a UUIDv7."""
    return _is_postgres(session) and statements.id_time_window(log_id) is not None


# --------------------------------------------------------------------------- reads


async def get_prompt_log(log_id: uuid.UUID | str, *, session: AsyncSession) -> PromptLogRow | None:
    """The row with this id, or None (PostgreSQL: looked up near the id's time first)."""
    uid = as_uuid(log_id, "log_id")
    row = None
    if _near_id_time(session, uid):
        row = (await session.execute(statements.select_prompt_log(uid, near_id_time=True))).first()
    if row is None:
        row = (await session.execute(statements.select_prompt_log(uid))).first()
    return None if row is None else map_prompt_log(row)


async def get_user_prompts(
    user_id: uuid.UUID | str, limit: int = 50, *, session: AsyncSession
) -> list[PromptLogRow]:
    """The user's own prompts, newest first (RLS-scoped on PostgreSQL)."""
    statement = statements.select_user_prompts(user_id, limit=limit)
    await user_scope(session, user_id)
    return [map_prompt_log(r) for r in await session.execute(statement)]


async def get_low_confidence_prompts(
    threshold: float = 0.7,
    limit: int = 100,
    days: float | None = None,
    *,
    session: AsyncSession,
    clock: Clock = utc_now,
) -> list[PromptLogRow]:
    """Uncorrected prompts below ``threshold``, lowest confidence first."""
    statement = statements.select_low_confidence(
        threshold=threshold, limit=limit, since=since_days(clock(), days)
    )
    return [map_prompt_log(r) for r in await session.execute(statement)]


async def get_failed_workflow_prompts(
    limit: int = 100, *, session: AsyncSession
) -> list[PromptLogRow]:
    """Prompts whose workflow failed, newest first."""
    statement = statements.select_failed_workflows(limit=limit)
    return [map_prompt_log(r) for r in await session.execute(statement)]


async def get_prompts_for_retraining(
    days: float | None = None,
    min_confidence: float = 0.9,
    *,
    session: AsyncSession,
    clock: Clock = utc_now,
) -> list[RetrainingRow]:
    """Corrected prompts plus confident uncorrected ones whose workflow did not fail."""
    statement = statements.select_for_retraining(
        min_confidence=min_confidence, since=since_days(clock(), days)
    )
    return [map_retraining_row(r) for r in await session.execute(statement)]


async def _stats_cover(session: AsyncSession, since: datetime | None) -> StatsCover | None:
    """Where the statistics over ``created_at > since`` read from (rollup and/or raw table)."""
    rows = (await session.execute(stats_rollup.select_stats_cover_state())).all()
    return stats_rollup.stats_cover_from_rows(rows, since)


async def _statistic(
    build: Callable[..., AnySelect],
    mapper: Callable[[Any], _Row],
    days: float | None,
    session: AsyncSession,
    clock: Clock,
) -> list[_Row]:
    """One of the three monitoring statistics over the last ``days`` days, read from the rollup
    where it can."""
    since = since_days(clock(), days)
    statement = build(since=since, cover=await _stats_cover(session, since))
    return [mapper(r) for r in await session.execute(statement)]


async def get_confidence_distribution(
    days: float | None = 7, *, session: AsyncSession, clock: Clock = utc_now
) -> list[ConfidenceBucket]:
    """Rows per confidence bucket (one decimal) over the last ``days`` days, highest first."""
    build = statements.select_confidence_distribution
    return await _statistic(build, map_confidence_bucket, days, session, clock)


async def get_intent_distribution(
    days: float | None = 7, *, session: AsyncSession, clock: Clock = utc_now
) -> list[IntentStats]:
    """Per predicted intent: rows, average confidence, corrections; most frequent first."""
    build = statements.select_intent_distribution
    return await _statistic(build, map_intent_stats, days, session, clock)


async def get_success_rate_by_intent(
    days: float | None = None, *, session: AsyncSession, clock: Clock = utc_now
) -> list[IntentSuccessRate]:
    """Per predicted intent with a known outcome: total, successes, rate; lowest rate first.
    ``days=None`` (the default) is all time: the rollup keeps that cheap."""
    build = statements.select_success_rate_by_intent
    return await _statistic(build, map_success_rate, days, session, clock)


async def refresh_prompt_stats(
    *,
    session: AsyncSession,
    until: datetime | None = None,
    wait_timeout: float = 30.0,
    poll_interval: float = 0.05,
) -> StatsRefresh:
    """Bring the monitoring rollup up to date (see
    :func:`capture.stats_rollup.refresh_prompt_stats`; the caller owns the transaction). The
    statistics are exact with or without it; it keeps them fast. Waiting for concurrent
    writers (PostgreSQL) does not block the event loop."""
    start = await session.run_sync(stats_rollup.refresh_begin)
    left = start.writers
    deadline = time.monotonic() + wait_timeout
    while left and time.monotonic() < deadline:
        await asyncio.sleep(poll_interval)
        result = await session.execute(stats_rollup.select_raw_writers_left(left))
        left = tuple(result.scalars())
    return await session.run_sync(
        lambda sync_session: stats_rollup.refresh_finish(
            sync_session, start, writers_left=left, until=until
        )
    )


# --------------------------------------------------------------------------- the class


class NLURepository:
    """The repository over one database: each call runs the module function of the same name in
    its own short-lived session (commit on success, rollback on error), with this clock."""

    def __init__(self, engine: AsyncEngine, *, clock: Clock = utc_now) -> None:
        self.engine = engine
        self.clock = clock

    async def _run(self, call: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        async with db.session_scope(self.engine) as session:
            return await call(*args, session=session, **kwargs)

    async def log_prompt(
        self,
        prompt: str,
        predicted_intent: str,
        confidence: float,
        secondary_intents: SecondaryIntents = (),
        *,
        log_id: uuid.UUID | str | None = None,
        created_at: datetime | None = None,
        **context: Unpack[PromptContext],
    ) -> uuid.UUID:
        return await self._run(
            log_prompt,
            prompt,
            predicted_intent,
            confidence,
            secondary_intents,
            log_id=log_id,
            created_at=created_at,
            clock=self.clock,
            **context,
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
        await self._run(
            update_prompt_log_outcome,
            log_id,
            was_successful,
            workflow_type,
            execution_error,
            user_id=user_id,
            clock=self.clock,
        )

    async def add_prompt_correction(
        self,
        log_id: uuid.UUID | str,
        corrected_intent: str,
        correction_notes: str | None = None,
        *,
        user_id: uuid.UUID | str | None = None,
        reviewer: str | None = None,
    ) -> None:
        await self._run(
            add_prompt_correction,
            log_id,
            corrected_intent,
            correction_notes,
            user_id=user_id,
            clock=self.clock,
            reviewer=reviewer,
        )

    async def get_prompt_log(self, log_id: uuid.UUID | str) -> PromptLogRow | None:
        return await self._run(get_prompt_log, log_id)

    async def get_user_prompts(
        self, user_id: uuid.UUID | str, limit: int = 50
    ) -> list[PromptLogRow]:
        return await self._run(get_user_prompts, user_id, limit)

    async def get_low_confidence_prompts(
        self, threshold: float = 0.7, limit: int = 100, days: float | None = None
    ) -> list[PromptLogRow]:
        return await self._run(get_low_confidence_prompts, threshold, limit, days, clock=self.clock)

    async def get_failed_workflow_prompts(self, limit: int = 100) -> list[PromptLogRow]:
        return await self._run(get_failed_workflow_prompts, limit)

    async def get_prompts_for_retraining(
        self, days: float | None = None, min_confidence: float = 0.9
    ) -> list[RetrainingRow]:
        return await self._run(get_prompts_for_retraining, days, min_confidence, clock=self.clock)

    async def get_confidence_distribution(self, days: float | None = 7) -> list[ConfidenceBucket]:
        return await self._run(get_confidence_distribution, days, clock=self.clock)

    async def get_intent_distribution(self, days: float | None = 7) -> list[IntentStats]:
        return await self._run(get_intent_distribution, days, clock=self.clock)

    async def get_success_rate_by_intent(
        self, days: float | None = None
    ) -> list[IntentSuccessRate]:
        return await self._run(get_success_rate_by_intent, days, clock=self.clock)

    async def refresh_prompt_stats(
        self, *, until: datetime | None = None, wait_timeout: float = 30.0
    ) -> StatsRefresh:
        return await self._run(refresh_prompt_stats, until=until, wait_timeout=wait_timeout)


def create_nlu_repository(url: str | None = None, *, clock: Clock = utc_now) -> NLURepository:
    """The repository over ``url`` (default: the settings' database).

    Raises :class:`capture.db.DatabaseNotMigratedError` (naming ``prompt-capture db upgrade``)
    unless the schema is at the head revision.
    """
    db.require_migrated(url)
    return NLURepository(db.get_engine(url), clock=clock)
