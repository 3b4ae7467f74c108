"""The monitoring rollup (migration 0004) on both databases: the statistics read from it equal
the raw computation exactly (window edges, late outcomes and corrections, deletes, replayed
rows, an empty table), the refresh is incremental and idempotent, and on PostgreSQL it waits for
concurrent writers and keeps the application role on the raw, RLS-scoped table."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import delete, func, inspect, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from capture import db, statements, stats_rollup
from capture import repository as repo
from capture.rows import (
    ConfidenceBucket,
    IntentSuccessRate,
    map_confidence_bucket,
    map_intent_stats,
    map_success_rate,
    prompt_log_values,
)
from capture.values import floor_day, floor_hour, since_days
from tests.capture_helpers import scratch_database

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # the statistics' clock (rows are days old)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def clock() -> datetime:
    return NOW


def _reset_rollup(url: str) -> None:
    with Session(db.get_sync_engine(url)) as session:
        stats_rollup.reset_prompt_stats(session)
        session.commit()


@pytest.fixture
def rollup_url(db_url: str) -> Iterator[str]:
    """``db_url`` (empty logs) with an empty rollup that was never refreshed."""
    _reset_rollup(db_url)
    yield db_url
    with db.get_sync_engine(db_url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
    _reset_rollup(db_url)


async def add(
    session: AsyncSession,
    at: datetime,
    intent: str = "greet",
    confidence: float | None = 0.8,
    *,
    success: bool | None = None,
    corrected: str | None = None,
) -> uuid.UUID:
    """One row created at ``at``; ``confidence=None`` stores a NULL confidence."""
    values = prompt_log_values(
        log_id=uuid.uuid4(),
        prompt=f"{intent} at {at.isoformat()}",
        predicted_intent=intent,
        confidence=0.5 if confidence is None else confidence,
        created_at=at,
    )
    if confidence is None:
        values["confidence"] = None
    await session.execute(statements.insert_prompt_logs(), values)
    log_id: uuid.UUID = values["id"]
    if success is not None:
        await repo.update_prompt_log_outcome(log_id, success, "wf", session=session)
    if corrected is not None:
        await repo.add_prompt_correction(log_id, corrected, session=session, clock=clock)
    return log_id


async def seed(session: AsyncSession) -> list[uuid.UUID]:
    """Rows over 10 days before NOW: 5 intents, every bucket, NULL confidence, outcomes,
    corrections, and rows exactly on hour and day boundaries."""
    ids = []
    intents = ["weather", "greet", "alarm", "transfer", "music"]
    for i in range(260):
        at = NOW - timedelta(minutes=37 * i + (i % 7) * 3)
        intent = intents[(i * 7) % 5] if i % 9 else "weather"
        conf = None if i % 53 == 5 else round((i * 0.137) % 1.0, 4)
        success = None if i % 4 == 0 else i % 5 != 1
        corrected = "small_talk" if i % 11 == 3 else None
        ids.append(await add(session, at, intent, conf, success=success, corrected=corrected))
    for at in (NOW - 2 * DAY, NOW - 3 * DAY - 5 * HOUR, floor_day(NOW) - DAY):  # boundaries
        ids.append(await add(session, at, "alarm", 0.95, success=True))
    return ids


WINDOWS: list[float | None] = [None, 7, 1, 2.5, 0.25, 30, 3 + 5 / 24]


async def raw_statistics(session: AsyncSession, days: float | None) -> tuple[Any, Any, Any]:
    since = since_days(NOW, days)
    conf = [
        map_confidence_bucket(r)
        for r in await session.execute(statements.select_confidence_distribution(since=since))
    ]
    intents = [
        map_intent_stats(r)
        for r in await session.execute(statements.select_intent_distribution(since=since))
    ]
    rates = [
        map_success_rate(r)
        for r in await session.execute(statements.select_success_rate_by_intent(since=since))
    ]
    return conf, intents, rates


async def repo_statistics(session: AsyncSession, days: float | None) -> tuple[Any, Any, Any]:
    return (
        await repo.get_confidence_distribution(days, session=session, clock=clock),
        await repo.get_intent_distribution(days, session=session, clock=clock),
        await repo.get_success_rate_by_intent(days, session=session, clock=clock),
    )


async def assert_equal_to_raw(session: AsyncSession) -> None:
    for days in WINDOWS:
        raw = await raw_statistics(session, days)
        assert await repo_statistics(session, days) == raw, f"window days={days}"


async def cover(session: AsyncSession, days: float | None) -> stats_rollup.StatsCover | None:
    rows = (await session.execute(stats_rollup.select_stats_cover_state())).all()
    return stats_rollup.stats_cover_from_rows(rows, since_days(NOW, days))


# --------------------------------------------------------------------------- equality


async def test_statistics_from_the_rollup_equal_the_raw_queries(
    rollup_url: str, session: AsyncSession
) -> None:
    await seed(session)
    await assert_equal_to_raw(session)  # never refreshed: the raw path
    assert await cover(session, 7) is None

    mark = NOW - DAY - 5 * HOUR
    first = await repo.refresh_prompt_stats(session=session, until=mark)
    assert first.full and first.previous_watermark is None
    assert first.watermark == floor_hour(mark) and first.hourly_rows > 0
    assert first.daily_rows > 0
    plan = await cover(session, None)
    assert plan is not None and plan.watermark == first.watermark
    assert plan.daily and plan.hourly and plan.raw[-1] == stats_rollup.Span(first.watermark, None)
    await assert_equal_to_raw(session)

    # The numbers themselves (7 days), not only their equality with the raw queries.
    rates = {
        r.predicted_intent: r
        for r in await repo.get_success_rate_by_intent(7, session=session, clock=clock)
    }
    intents = {
        s.predicted_intent: s
        for s in await repo.get_intent_distribution(7, session=session, clock=clock)
    }
    buckets = await repo.get_confidence_distribution(7, session=session, clock=clock)
    since = since_days(NOW, 7)
    assert since is not None
    c = statements.C
    in_week = c.created_at > since
    total = (await session.execute(select(func.count()).where(in_week))).scalar_one()
    assert sum(b.count for b in buckets) == total == sum(s.count for s in intents.values())
    nulls = (
        await session.execute(select(func.count()).where(in_week, c.confidence.is_(None)))
    ).scalar_one()
    assert nulls > 0 and buckets[-1] == ConfidenceBucket(None, nulls)
    weather_ok = (
        await session.execute(
            select(func.count()).where(
                in_week, c.predicted_intent == "weather", c.was_successful.is_(True)
            )
        )
    ).scalar_one()
    assert rates["weather"].successes == weather_ok > 0


async def test_a_late_outcome_and_correction_change_the_statistics_before_any_refresh(
    rollup_url: str, session: AsyncSession
) -> None:
    ids = await seed(session)
    await repo.refresh_prompt_stats(session=session, until=NOW)
    before = await repo_statistics(session, None)
    old = ids[100]  # about 2.6 days old: rolled up into the daily rows
    row = await repo.get_prompt_log(old, session=session)
    assert row is not None and row.created_at < NOW - 2 * DAY

    await repo.update_prompt_log_outcome(old, False, "wf", session=session)
    await repo.add_prompt_correction(old, "alarm", session=session, clock=clock)
    plan = await cover(session, None)
    assert plan is not None
    hour = floor_hour(row.created_at)
    assert stats_rollup.Span(hour, hour + HOUR) in plan.raw  # the dirty hour is read raw
    after = await repo_statistics(session, None)
    assert after != before
    await assert_equal_to_raw(session)
    corrections = {s.predicted_intent: s.corrections for s in after[1]}
    assert corrections[row.predicted_intent] == {
        s.predicted_intent: s.corrections for s in before[1]
    }[row.predicted_intent] + (0 if row.corrected_intent else 1)

    refreshed = await repo.refresh_prompt_stats(session=session, until=NOW)
    assert refreshed.dirty_hours >= 1 and refreshed.watermark == NOW
    plan = await cover(session, None)
    assert plan is not None and stats_rollup.Span(hour, hour + HOUR) not in plan.raw
    assert await repo_statistics(session, None) == after
    await assert_equal_to_raw(session)


async def test_deleted_and_replayed_rows_are_tracked(
    rollup_url: str, session: AsyncSession
) -> None:
    ids = await seed(session)
    await repo.refresh_prompt_stats(session=session, until=NOW)
    # Retention deletes old rows; a spool replay inserts rows of long-closed hours.
    await session.execute(delete(statements.TABLE).where(statements.C.id.in_(ids[150:170])))
    await add(session, NOW - 4 * DAY - 10 * HOUR, "replayed", 0.31, success=False)
    await add(session, NOW - timedelta(minutes=30), "replayed", 0.97)
    await assert_equal_to_raw(session)
    rates = await repo.get_success_rate_by_intent(None, session=session, clock=clock)
    assert IntentSuccessRate("replayed", 1, 0, 0.0) in rates
    await repo.refresh_prompt_stats(session=session, until=NOW)
    await assert_equal_to_raw(session)


async def test_window_edges(rollup_url: str, session: AsyncSession) -> None:
    edge = NOW - 2 * DAY  # an exact hour (and day) boundary
    await add(session, edge, "at_edge", 0.5)  # created_at == since: outside "> since"
    await add(session, edge + timedelta(microseconds=1), "after_edge", 0.5)
    await add(session, edge - timedelta(microseconds=1), "before_edge", 0.5)
    mark = NOW - 5 * HOUR
    await add(session, mark, "at_mark", 0.61, success=True)  # first raw row after the rollup
    await add(session, mark - timedelta(microseconds=1), "before_mark", 0.64, success=False)
    await repo.refresh_prompt_stats(session=session, until=mark)

    intents = await repo.get_intent_distribution(2, session=session, clock=clock)
    assert sorted(s.predicted_intent for s in intents) == ["after_edge", "at_mark", "before_mark"]
    assert await repo.get_success_rate_by_intent(2, session=session, clock=clock) == [
        IntentSuccessRate("before_mark", 1, 0, 0.0),
        IntentSuccessRate("at_mark", 1, 1, 100.0),
    ]
    for days in (2, 2 + 1e-9, 2 - 1e-9, 5 / 24, 5.5 / 24, 4 / 24, 1, None):
        raw = await raw_statistics(session, days)
        assert await repo_statistics(session, days) == raw, days
    # Windows that start after the watermark's hour never touch the rollup.
    assert await cover(session, 4 / 24) is None
    assert await cover(session, 5.5 / 24) is None  # first whole hour is the watermark itself
    plan = await cover(session, 2)
    assert plan is not None and plan.raw[0] == stats_rollup.Span(edge, edge + HOUR, open_start=True)


async def test_an_empty_table(rollup_url: str, session: AsyncSession) -> None:
    refreshed = await repo.refresh_prompt_stats(session=session, until=NOW)
    assert refreshed.full and (refreshed.hourly_rows, refreshed.daily_rows) == (0, 0)
    assert await cover(session, 7) is not None
    for days in (None, 7):
        assert await repo_statistics(session, days) == ([], [], [])


async def test_refresh_is_incremental_and_idempotent(
    rollup_url: str, session: AsyncSession
) -> None:
    await seed(session)
    first = await repo.refresh_prompt_stats(session=session, until=NOW - 3 * DAY)
    second = await repo.refresh_prompt_stats(session=session, until=NOW)
    assert second.previous_watermark == first.watermark and not second.full
    again = await repo.refresh_prompt_stats(session=session, until=NOW)
    assert (again.dirty_hours, again.hourly_rows, again.daily_rows) == (0, 0, 0)
    assert again.watermark == NOW

    # The incrementally built rollup equals one built from scratch.
    hourly = (
        await session.execute(select(statements.HOURLY).order_by("hour", "predicted_intent"))
    ).all()
    daily = (
        await session.execute(select(statements.DAILY).order_by("day", "predicted_intent"))
    ).all()
    await session.run_sync(stats_rollup.reset_prompt_stats)
    await repo.refresh_prompt_stats(session=session, until=NOW)
    assert (
        await session.execute(select(statements.HOURLY).order_by("hour", "predicted_intent"))
    ).all() == hourly
    assert (
        await session.execute(select(statements.DAILY).order_by("day", "predicted_intent"))
    ).all() == daily
    # A daily row is the sum of its hours; a whole day's hours are not stored twice in reads.
    day = floor_day(NOW - 4 * DAY)
    prompts = (
        await session.execute(
            select(func.sum(statements.HOURLY.c.prompts)).where(
                statements.HOURLY.c.hour >= day, statements.HOURLY.c.hour < day + DAY
            )
        )
    ).scalar_one()
    daily_prompts = (
        await session.execute(
            select(func.sum(statements.DAILY.c.prompts)).where(statements.DAILY.c.day == day)
        )
    ).scalar_one()
    assert prompts == daily_prompts > 0


def test_cover_plan_is_disjoint_and_complete() -> None:
    watermark = datetime(2026, 11, 20, 9, tzinfo=UTC)
    dirty = [datetime(2026, 11, 18, 3, tzinfo=UTC), datetime(2026, 11, 15, 22, tzinfo=UTC)]
    since = datetime(2026, 11, 15, 20, 17, tzinfo=UTC)
    plan = stats_rollup.plan_stats_cover(watermark, [*dirty, watermark + HOUR], since)
    assert plan is not None
    assert plan.daily == (
        stats_rollup.Span(datetime(2026, 11, 16, tzinfo=UTC), datetime(2026, 11, 20, tzinfo=UTC)),
    )
    assert plan.dirty_days == (datetime(2026, 11, 18, tzinfo=UTC),)
    assert plan.dirty_hours == tuple(sorted(dirty))

    def inside(spans: tuple[stats_rollup.Span, ...], key: datetime) -> bool:
        return any(
            (s.start is None or (key > s.start if s.open_start else key >= s.start))
            and (s.end is None or key < s.end)
            for s in spans
        )

    # Walk the window: every instant is in exactly one part.
    t = since + timedelta(minutes=1)
    while t < watermark + 2 * HOUR:
        hour, day = floor_hour(t), floor_day(t)
        hits = [
            name
            for name, hit in (
                ("raw", inside(plan.raw, t)),
                ("hourly", inside(plan.hourly, hour) and hour not in plan.dirty_hours),
                ("daily", inside(plan.daily, day) and day not in plan.dirty_days),
            )
            if hit
        ]
        assert len(hits) == 1, (t, hits)
        if hour in dirty or t >= watermark or t < datetime(2026, 11, 15, 21, tzinfo=UTC):
            assert hits == ["raw"], t
        t += timedelta(minutes=13)
    assert not inside(plan.raw, since) and inside(plan.raw, since + timedelta(microseconds=1))
    assert stats_rollup.plan_stats_cover(None, [], since) is None
    assert stats_rollup.plan_stats_cover(watermark, [], watermark - timedelta(minutes=30)) is None
    many = [watermark - (2 * i + 2) * HOUR for i in range(stats_rollup.MAX_COVER_SPANS)]
    assert stats_rollup.plan_stats_cover(watermark, many, None) is None  # too many: raw table


# --------------------------------------------------------------------------- PostgreSQL


def _dirty_hours(url: str) -> list[datetime]:
    with db.get_sync_engine(url).connect() as conn:
        rows = conn.execute(select(statements.DIRTY.c.hour).distinct().order_by("hour")).scalars()
        return [floor_hour(h) for h in rows]


def test_postgres_marks_only_late_changes(postgres_url: str) -> None:
    """The hot path (rows younger than late_after_seconds) marks nothing; late inserts,
    updates of statistics columns and deletes mark their hour."""
    _reset_rollup(postgres_url)
    recent = datetime.now(UTC) - timedelta(seconds=5)
    old = datetime(2026, 11, 1, 10, 30, tzinfo=UTC)
    with psycopg.connect(db.libpq_url(postgres_url)) as conn:
        conn.execute("DELETE FROM nlu_prompt_logs")
        conn.execute("DELETE FROM nlu_prompt_stats_dirty")
        new_id, old_id = uuid.uuid4(), uuid.uuid4()
        for log_id, at in ((new_id, recent), (old_id, old)):
            conn.execute(
                "INSERT INTO nlu_prompt_logs (id, prompt, predicted_intent, confidence, "
                "created_at) VALUES (%s, 'p', 'greet', 0.5, %s)",
                (log_id, at),
            )
        conn.execute("UPDATE nlu_prompt_logs SET was_successful = true WHERE id = %s", (new_id,))
        marks = conn.execute("SELECT hour FROM nlu_prompt_stats_dirty").fetchall()
        assert [m[0] for m in marks] == [old.replace(minute=0)]
        conn.execute("DELETE FROM nlu_prompt_stats_dirty")
        # An update that leaves every statistics column as it was marks nothing.
        conn.execute("UPDATE nlu_prompt_logs SET prompt = 'q' WHERE id = %s", (old_id,))
        conn.execute(
            "UPDATE nlu_prompt_logs SET confidence = confidence, workflow_type = 'x' WHERE id = %s",
            (old_id,),
        )
        assert conn.execute("SELECT count(*) FROM nlu_prompt_stats_dirty").fetchone() == (0,)
        conn.execute("UPDATE nlu_prompt_logs SET corrected_intent = 'x' WHERE id = %s", (old_id,))
        assert conn.execute("SELECT count(*) FROM nlu_prompt_stats_dirty").fetchone() == (1,)
        conn.execute("DELETE FROM nlu_prompt_stats_dirty")
        conn.execute("DELETE FROM nlu_prompt_logs")
        marks = conn.execute("SELECT hour FROM nlu_prompt_stats_dirty").fetchall()
        assert [m[0] for m in marks] == [old.replace(minute=0)]
        conn.rollback()


def test_postgres_truncate_empties_the_rollup(postgres_url: str) -> None:
    _reset_rollup(postgres_url)
    with psycopg.connect(db.libpq_url(postgres_url)) as conn:
        conn.execute(
            "INSERT INTO nlu_prompt_logs (id, prompt, predicted_intent, confidence, created_at) "
            "VALUES (%s, 'p', 'greet', 0.5, %s)",
            (uuid.uuid4(), NOW - DAY),
        )
        conn.commit()
    with Session(db.get_sync_engine(postgres_url)) as session:
        refreshed = stats_rollup.refresh_prompt_stats(session=session, wait_timeout=5)
        session.commit()
    assert refreshed.hourly_rows == 1 and refreshed.watermark is not None
    with psycopg.connect(db.libpq_url(postgres_url)) as conn:
        conn.execute("TRUNCATE nlu_prompt_logs")
        conn.commit()
        assert conn.execute(
            "SELECT (SELECT count(*) FROM nlu_prompt_stats_hourly), "
            "(SELECT count(*) FROM nlu_prompt_stats_daily), "
            "(SELECT watermark FROM nlu_prompt_stats_state)"
        ).fetchone() == (0, 0, None)


def test_postgres_refresh_waits_for_transactions_writing_the_logs(postgres_url: str) -> None:
    _reset_rollup(postgres_url)
    with db.get_sync_engine(postgres_url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
    first = NOW - 2 * DAY
    writer = psycopg.connect(db.libpq_url(postgres_url))
    try:
        writer.execute(
            "INSERT INTO nlu_prompt_logs (id, prompt, predicted_intent, confidence, created_at) "
            "VALUES (%s, 'p', 'greet', 0.5, %s)",
            (uuid.uuid4(), first),
        )
        # An open writer: the refresh does not advance the watermark past it.
        with Session(db.get_sync_engine(postgres_url)) as session:
            blocked = stats_rollup.refresh_prompt_stats(session=session, wait_timeout=0.3)
            session.commit()
        assert (blocked.writers_waited_for, blocked.writers_left) == (1, 1)
        assert blocked.watermark is None and blocked.hourly_rows == 0

        # The writer commits while the refresh waits: the refresh then sees its row.
        timer = threading.Timer(0.5, writer.commit)
        timer.start()
        started = time.monotonic()
        with Session(db.get_sync_engine(postgres_url)) as session:
            waited = stats_rollup.refresh_prompt_stats(session=session, wait_timeout=30)
            session.commit()
        timer.join()
        assert time.monotonic() - started >= 0.4
        assert (waited.writers_waited_for, waited.writers_left) == (1, 0)
        assert waited.watermark is not None and waited.hourly_rows == 1
    finally:
        writer.close()
    with db.get_sync_engine(postgres_url).connect() as conn:
        stored = conn.execute(select(statements.HOURLY.c.hour, statements.HOURLY.c.prompts)).all()
    assert [(floor_hour(h), n) for h, n in stored] == [(first, 1)]


def test_postgres_refresh_refuses_repeatable_read(postgres_url: str) -> None:
    engine = db.get_sync_engine(postgres_url).execution_options(isolation_level="REPEATABLE READ")
    with Session(engine) as session, pytest.raises(ValueError, match="READ COMMITTED"):
        stats_rollup.refresh_prompt_stats(session=session)


def test_postgres_roles_pipeline_uses_the_rollup_app_stays_on_scoped_rows(
    postgres_url: str,
) -> None:
    _reset_rollup(postgres_url)
    tag = uuid.uuid4().hex[:8]
    app, pipeline = f"pc_roll_{tag}_app", f"pc_roll_{tag}_pipe"
    alice = uuid.uuid4()
    server = db.libpq_url(postgres_url)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute("DELETE FROM nlu_prompt_logs")
        conn.execute(f"CREATE ROLE {app} LOGIN IN ROLE prompt_capture_app")
        conn.execute(f"CREATE ROLE {pipeline} LOGIN IN ROLE prompt_capture_pipeline")
        for i, user in enumerate((alice, None, None)):
            conn.execute(
                "INSERT INTO nlu_prompt_logs (id, user_id, prompt, predicted_intent, confidence, "
                "was_successful, created_at) VALUES (%s, %s, 'p', 'greet', 0.5, true, %s)",
                (uuid.uuid4(), user, NOW - (i + 1) * DAY),
            )

    def as_role(role: str) -> str:
        return make_url(postgres_url).set(username=role).render_as_string(hide_password=False)

    async def run() -> None:
        pipe_engine = create_async_engine(as_role(pipeline), poolclass=NullPool)
        app_engine = create_async_engine(as_role(app), poolclass=NullPool)
        try:
            flows = repo.NLURepository(pipe_engine, clock=clock)
            refreshed = await flows.refresh_prompt_stats(wait_timeout=5)
            assert refreshed.hourly_rows == 3
            assert await flows.get_success_rate_by_intent() == [
                IntentSuccessRate("greet", 3, 3, 100.0)
            ]
            async with pipe_engine.connect() as conn:
                rows = (await conn.execute(stats_rollup.select_stats_cover_state())).all()
                assert stats_rollup.stats_cover_from_rows(rows, None) is not None
            async with AsyncSession(app_engine) as session:
                rows = (await session.execute(stats_rollup.select_stats_cover_state())).all()
                assert stats_rollup.stats_cover_from_rows(rows, None) is None  # no rollup grant
                await repo.user_scope(session, alice)
                assert await repo.get_success_rate_by_intent(session=session, clock=clock) == [
                    IntentSuccessRate("greet", 1, 1, 100.0)
                ]
        finally:
            await pipe_engine.dispose()
            await app_engine.dispose()

    try:
        asyncio.run(run())
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute("DELETE FROM nlu_prompt_logs")
            for role in (app, pipeline):
                conn.execute(f"DROP ROLE IF EXISTS {role}")
        _reset_rollup(postgres_url)


# --------------------------------------------------------------------------- schema, CLI, flow


ROLLUP_TABLES = {
    "nlu_prompt_stats_hourly",
    "nlu_prompt_stats_daily",
    "nlu_prompt_stats_state",
    "nlu_prompt_stats_dirty",
}


def _tables_and_triggers(url: str) -> tuple[set[str], set[str]]:
    engine = db.get_sync_engine(url)
    tables = set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        if db.is_sqlite(url):
            sql = "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        else:
            sql = (
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'nlu_prompt_logs'::regclass "
                "AND NOT tgisinternal"
            )
        triggers = set(conn.exec_driver_sql(sql).scalars())
    return tables, triggers


def test_migration_0004_up_and_down_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url)
    tables, triggers = _tables_and_triggers(url)
    assert tables >= ROLLUP_TABLES
    assert {f"trg_nlu_prompt_logs_stats_{k}" for k in ("insert", "update", "delete")} <= triggers
    db.downgrade(url, "0003")
    tables, triggers = _tables_and_triggers(url)
    assert not ROLLUP_TABLES & tables and not any("stats" in t for t in triggers)
    assert "nlu_prompt_logs" in tables
    db.upgrade(url)
    with db.get_sync_engine(url).connect() as conn:
        state = conn.execute(select(statements.STATS_STATE)).one()
    assert (state.id, state.watermark, state.late_after_seconds) == (1, None, 300)
    db.clear_engine_cache()


def test_migration_0004_up_and_down_on_postgres(postgres_server_url: str) -> None:
    with scratch_database(postgres_server_url, "pc_mig4") as url:
        db.upgrade(url)
        tables, triggers = _tables_and_triggers(url)
        assert tables >= ROLLUP_TABLES
        assert {
            f"trg_nlu_prompt_logs_stats_{k}" for k in ("insert", "update", "delete", "truncate")
        } <= triggers
        db.downgrade(url, "0003")
        tables, triggers = _tables_and_triggers(url)
        assert not ROLLUP_TABLES & tables and not any("stats" in t for t in triggers)
        with db.get_sync_engine(url).connect() as conn:
            functions = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_proc WHERE proname LIKE 'nlu_prompt_stats_%%'"
            ).scalar_one()
        assert functions == 0
        db.upgrade(url)
        assert db.current_revision(url) == db.head_revision()


def flat(output: str) -> str:
    return " ".join(output.split())  # rich wraps long lines


def test_cli_refresh_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from capture.settings import get_settings
    from deployments.cli import app

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", url)
    monkeypatch.setenv("PROMPT_CAPTURE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        result = runner.invoke(app, ["db", "refresh-stats"])
        assert result.exit_code == 2 and "prompt-capture db upgrade" in result.output
        db.upgrade(url)
        with db.get_sync_engine(url).begin() as conn:
            conn.execute(
                statements.insert_prompt_logs(),
                prompt_log_values(
                    log_id=uuid.uuid4(),
                    prompt="p",
                    predicted_intent="greet",
                    confidence=0.9,
                    created_at=NOW,
                ),
            )
        result = runner.invoke(app, ["db", "refresh-stats"])
        assert result.exit_code == 0, result.output
        assert "(full: 0 dirty hours, 1 hourly rows, 1 daily rows written)" in flat(result.output)
        result = runner.invoke(app, ["db", "refresh-stats"])
        assert "incremental: 0 dirty hours, 0 hourly rows, 0 daily rows" in flat(result.output)
        result = runner.invoke(app, ["db", "refresh-stats", "--rebuild"])
        assert "(full: 0 dirty hours, 1 hourly rows, 1 daily rows written)" in flat(result.output)
    finally:
        get_settings.cache_clear()
        db.clear_engine_cache()


def test_monitor_flow_refreshes_the_rollup(
    prefect_harness: None, rollup_url: str, tmp_path: Path
) -> None:
    from flows.monitor import monitor_flow

    with db.get_sync_engine(rollup_url).begin() as conn:
        for i in range(30):
            conn.execute(
                statements.insert_prompt_logs(),
                prompt_log_values(
                    log_id=uuid.uuid4(),
                    prompt=f"p{i}",
                    predicted_intent="greet" if i % 3 else "alarm",
                    confidence=0.3 + i / 50,
                    created_at=NOW - i * HOUR,
                ),
            )
    result = monitor_flow(
        database_url=rollup_url, home=str(tmp_path / "home"), now=NOW, check_weekly_cycle=False
    )
    refresh = result["stats_refresh"]
    assert refresh["full"] is True and refresh["hourly_rows"] == 30
    assert refresh["watermark"] is not None

    async def statistics() -> tuple[Any, Any]:
        async with db.session_scope(db.get_engine(rollup_url)) as session:
            plan = await cover(session, None)
            return plan, await repo.get_intent_distribution(None, session=session, clock=clock)

    plan, intents = asyncio.run(statistics())
    assert plan is not None and plan.daily
    assert [(s.predicted_intent, s.count) for s in intents] == [("greet", 20), ("alarm", 10)]
    again = monitor_flow(
        database_url=rollup_url, home=str(tmp_path / "home"), now=NOW, check_weekly_cycle=False
    )
    assert again["stats_refresh"]["full"] is False and again["stats_refresh"]["hourly_rows"] == 0
