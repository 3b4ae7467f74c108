"""nlu_prompt_logs partitioned by created_at on PostgreSQL (migration 0007): the conversion and
back, lookups by id that prune to one partition, the DEFAULT partition, partition-drop
retention (with the rollup corrected and crash safety), and the period arithmetic."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from capture import db, partitions, statements, stats_rollup
from capture.ids import uuid7
from capture.models import TrainingExample
from capture.partitions import Partition
from capture.rows import (
    Outcome,
    map_confidence_bucket,
    map_intent_stats,
    map_success_rate,
    prompt_log_values,
)
from capture.service import create_nlu_service
from tasks.retention import run_retention, source_key
from tests.capture_helpers import FixedClassifier, StepClock, capture_settings, scratch_database

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
LOGS = statements.TABLE
EXAMPLES = TrainingExample.__table__
# Old enough that nothing else in this database has partitions there.
BASE = datetime(2025, 3, 3, tzinfo=UTC)  # a Monday


def _id_at(moment: datetime) -> uuid.UUID:
    """A UUIDv7 made at ``moment`` (the generator never goes back in time, so built here)."""
    ms = int(moment.timestamp() * 1000)
    counter, rand = random.getrandbits(12), random.getrandbits(62)
    return uuid.UUID(int=ms << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand)


def _rows(
    times: list[datetime], *, seed: int = 0, ids_at_time: bool = True
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    intents = ("book_room", "cancel", "weather", "alarm")
    out = []
    for i, at in enumerate(times):
        values = prompt_log_values(
            log_id=_id_at(at) if ids_at_time else uuid7(),
            prompt=f"message {i} from user{i}@example.com",
            predicted_intent=intents[i % 4],
            confidence=rng.random(),
            created_at=at,
            user_id=uuid.uuid4(),
        )
        values["was_successful"] = None if i % 3 == 0 else bool(i % 2)
        values["corrected_intent"] = "reschedule" if i % 5 == 0 else None
        out.append(values)
    return out


def _insert(url: str, rows: list[dict[str, Any]]) -> None:
    with db.get_sync_engine(url).begin() as conn:
        conn.execute(statements.insert_prompt_logs(), rows)


def _where(url: str, log_id: uuid.UUID) -> str:
    with db.get_sync_engine(url).connect() as conn:
        return str(
            conn.execute(
                text("SELECT tableoid::regclass::text FROM nlu_prompt_logs WHERE id = :i"),
                {"i": log_id},
            ).scalar_one()
        )


def _scanned(conn: Connection, statement: Any, params: dict[str, Any] | None = None) -> set[str]:
    """The tables a statement's plan scans (EXPLAIN; bound values inlined unless ``params``)."""
    if params is None:
        compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
        sql, bound = str(compiled), None
    else:
        compiled = statement.compile(dialect=conn.dialect)
        sql, bound = str(compiled), compiled.construct_params(params)
    plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, bound).scalar_one()[0]
    found: set[str] = set()
    stack = [plan["Plan"]]
    while stack:
        node = stack.pop()
        if "Scan" in node["Node Type"] and "Relation Name" in node:
            found.add(node["Relation Name"])
        stack.extend(node.get("Plans", ()))
    return found


@pytest.fixture(scope="module")
def part_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, migrated database of its own (these tests create and drop partitions)."""
    with scratch_database(postgres_server_url, "pc_part", migrated=True) as url:
        yield url


@pytest.fixture
def clean(part_url: str) -> str:
    with db.get_sync_engine(part_url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
        conn.execute(text("DELETE FROM nlu_training_examples"))
        for name in partitions.list_expired_tables(conn):
            partitions.drop_expired_table(conn, name)
    with Session(db.get_sync_engine(part_url)) as session:
        stats_rollup.reset_prompt_stats(session)
        session.commit()
    return part_url


def _make_partitions(url: str, start: datetime, end: datetime, interval: str = "day") -> None:
    with db.get_sync_engine(url).begin() as conn:
        partitions.ensure_partitions(conn, start=start, end=end, interval=interval)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the migration


def _schema(url: str) -> dict[str, Any]:
    with psycopg.connect(db.libpq_url(url)) as conn:

        def rows(sql: str) -> list[tuple[Any, ...]]:
            return sorted(conn.execute(sql).fetchall())

        oid = "CAST('nlu_prompt_logs' AS regclass)"
        return {
            "indexes": rows(
                f"SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                f"WHERE i.indrelid = {oid}"
            ),
            "triggers": rows(
                f"SELECT tgname, tgtype FROM pg_trigger WHERE tgrelid = {oid} AND NOT tgisinternal"
            ),
            "policies": rows(
                "SELECT polname, polcmd, polroles::text, pg_get_expr(polqual, polrelid), "
                "pg_get_expr(polwithcheck, polrelid) FROM pg_policy"
            ),
            "flags": rows(
                f"SELECT relrowsecurity, relforcerowsecurity, relacl::text FROM pg_class "
                f"WHERE oid = {oid}"
            ),
            "statistics": rows(f"SELECT stxname FROM pg_statistic_ext WHERE stxrelid = {oid}"),
            "checks": rows(
                f"SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                f"WHERE conrelid = {oid} AND contype = 'c'"
            ),
        }


def _snapshot(url: str) -> list[tuple[Any, ...]]:
    with db.get_sync_engine(url).connect() as conn:
        return [tuple(r) for r in conn.execute(select(LOGS).order_by(LOGS.c.id))]


def test_migration_converts_a_table_holding_rows_and_back(postgres_server_url: str) -> None:
    with scratch_database(postgres_server_url, "pc_mig7") as url:
        db.upgrade(url, "0006")
        now = datetime.now(UTC)
        times = [now - i * 7 * HOUR for i in range(300)]  # 87 days back
        times += [now + 60 * DAY, datetime(2019, 5, 1, tzinfo=UTC)]  # outside created ranges
        rows = _rows(times, ids_at_time=False)
        _insert(url, rows)
        with db.get_sync_engine(url).begin() as conn:  # a correction and an outcome later
            conn.execute(statements.update_change(Outcome(rows[4]["id"], True, "w", None, now)))
        before, schema = _snapshot(url), _schema(url)
        db.upgrade(url)
        assert _snapshot(url) == before
        with db.get_sync_engine(url).connect() as conn:
            assert partitions.is_partitioned(conn)
            parts = partitions.list_partitions(conn)
            pk = conn.execute(
                text(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conrelid = 'nlu_prompt_logs'::regclass AND contype = 'p'"
                )
            ).scalar_one()
        assert pk == "PRIMARY KEY (id, created_at)"
        assert parts[0].is_default and parts[0].name == partitions.DEFAULT_PARTITION
        ranges = parts[1:]
        assert all(p.end - p.start == DAY for p in ranges)  # type: ignore[operator]
        # From the oldest row (2019), at most 400 periods back; the 2019 row stays in DEFAULT.
        assert ranges[0].start == partitions.period_start(now, "day") - 400 * DAY
        assert ranges[-1].end is not None and ranges[-1].end >= now + 14 * DAY
        assert _where(url, rows[-1]["id"]) == partitions.DEFAULT_PARTITION  # 2019
        assert _where(url, rows[-2]["id"]) == partitions.DEFAULT_PARTITION  # +60 days
        assert _where(url, rows[0]["id"]) == partitions.partition_name(
            partitions.period_start(times[0], "day")
        )
        after = _schema(url)
        assert after["policies"] == schema["policies"] and after["checks"] == schema["checks"]
        assert after["flags"] == schema["flags"] and after["statistics"] == schema["statistics"]
        assert {n for n, _ in after["triggers"]} == {n for n, _ in schema["triggers"]} | {
            "trg_nlu_prompt_logs_stats_move"
        }
        assert after["indexes"] == schema["indexes"]

        db.downgrade(url, "0006")
        assert _snapshot(url) == before
        assert _schema(url) == schema
        with db.get_sync_engine(url).connect() as conn:
            assert not partitions.is_partitioned(conn)
        db.upgrade(url)
        assert _snapshot(url) == before


def test_downgrade_refuses_two_rows_with_one_id(postgres_server_url: str) -> None:
    with scratch_database(postgres_server_url, "pc_mig7d") as url:
        db.upgrade(url)
        row = _rows([datetime.now(UTC)])[0]
        twin = dict(row, created_at=row["created_at"] - 3 * DAY)
        _insert(url, [row, twin])  # allowed by the key (id, created_at)
        with pytest.raises(RuntimeError, match=f"id {row['id']} is used by more than one row"):
            db.downgrade(url, "0006")
        assert db.current_revision(url) == db.head_revision()  # rolled back


# --------------------------------------------------------------------------- lookups by id


def test_a_lookup_by_id_prunes_to_one_partition(clean: str) -> None:
    _make_partitions(clean, BASE, BASE + 7 * DAY)
    at = BASE + 2 * DAY + 13 * HOUR
    rows = _rows([at, at + HOUR, BASE + 5 * DAY])
    _insert(clean, rows)
    log_id = rows[0]["id"]
    own = partitions.partition_name(BASE + 2 * DAY)
    change = Outcome(log_id, True, "w", None, at)
    with db.get_sync_engine(clean).connect() as conn:
        conn.execute(text("ANALYZE nlu_prompt_logs"))
        assert _scanned(conn, statements.select_prompt_log(log_id, near_id_time=True)) == {own}
        assert _scanned(conn, statements.update_change(change, near_id_time=True)) == {own}
        # Without the range every partition's primary key is probed.
        assert len(_scanned(conn, statements.select_prompt_log(log_id))) > 7
        # The capture writer's batch form: one statement per UTC day of the ids.
        groups, others = statements.near_id_time_groups(
            [Outcome(r["id"], True, "w", None, at) for r in rows]
        )
        assert others == [] and [len(g) for g in groups] == [2, 1]
        batch = statements.update_logs(Outcome, batch=True, near_id_time=True)
        params = statements.batch_params(groups[0], near_id_time=True)
        assert _scanned(conn, batch, params) == {own}
        conn.rollback()


async def test_lookups_find_rows_whose_created_at_is_far_from_the_id_time(clean: str) -> None:
    """The id's time is only a hint: the repository looks again without the range."""
    from capture import repository

    _make_partitions(clean, BASE, BASE + 3 * DAY)
    row = _rows([BASE + DAY], ids_at_time=False)[0]  # id made now, row from 2025
    _insert(clean, [row])
    repo = repository.NLURepository(db.get_engine(clean))
    found = await repo.get_prompt_log(row["id"])
    assert found is not None and found.created_at == BASE + DAY
    await repo.update_prompt_log_outcome(row["id"], False, "booking", "timeout")
    await repo.add_prompt_correction(row["id"], "cancel", user_id=row["user_id"])
    again = await repo.get_prompt_log(row["id"])
    assert again is not None and again.was_successful is False
    assert again.corrected_intent == "cancel"
    with pytest.raises(repository.UnknownLogIdError):
        await repo.update_prompt_log_outcome(uuid7(), True, "x")


# --------------------------------------------------------------------------- DEFAULT partition


async def test_a_clock_past_the_last_partition_loses_nothing(clean: str, tmp_path: Path) -> None:
    """Rows written (COPY path) after the newest partition land in the DEFAULT partition; the
    retention flow then creates their partition and moves them in."""
    with db.get_sync_engine(clean).connect() as conn:
        last = max(p.end for p in partitions.list_partitions(conn) if p.end is not None)
    later = last + 10 * DAY + 5 * HOUR
    service = create_nlu_service(
        FixedClassifier(),
        url=clean,
        settings=capture_settings(clean, tmp_path / "home"),
        clock=StepClock(later),
    )
    try:
        results = [await service.process_message(f"prompt {i}") for i in range(5)]
        await service.flush()
        await service.update_workflow_outcome(results[0].log_id, True, "booking")
        await service.flush()
        assert service.stats().rejected == 0
    finally:
        await service.aclose()
    assert {_where(clean, r.log_id) for r in results} == {partitions.DEFAULT_PARTITION}

    result = run_retention(clean, now=later + HOUR, batch_size=3)
    assert result.moved_from_default == 5 and result.deleted == 0
    assert result.partitions_created >= 14
    home = partitions.partition_name(partitions.period_start(later, "day"))
    assert {_where(clean, r.log_id) for r in results} == {home}
    with db.get_sync_engine(clean).connect() as conn:
        moved = conn.execute(
            select(LOGS.c.was_successful).where(LOGS.c.id == results[0].log_id)
        ).scalar_one()
        newest = max(p.end for p in partitions.list_partitions(conn) if p.end is not None)
    assert moved is True
    assert newest >= later + HOUR + 14 * DAY
    again = run_retention(clean, now=later + HOUR, batch_size=3)
    assert (again.partitions_created, again.moved_from_default) == (0, 0)


# --------------------------------------------------------------------------- retention


def _raw_and_rollup(url: str, now: datetime) -> tuple[Any, Any]:
    """The three statistics, all time and last 400 days: raw, and through the rollup."""
    out: list[list[Any]] = [[], []]
    with Session(db.get_sync_engine(url)) as session:
        for days in (None, 400):
            since = None if days is None else now - days * DAY
            cover = stats_rollup.load_stats_cover(session, since)
            assert cover is not None
            for index, c in enumerate((None, cover)):
                out[index].append(
                    (
                        [
                            map_confidence_bucket(r)
                            for r in session.execute(
                                statements.select_confidence_distribution(since=since, cover=c)
                            )
                        ],
                        [
                            map_intent_stats(r)
                            for r in session.execute(
                                statements.select_intent_distribution(since=since, cover=c)
                            )
                        ],
                        [
                            map_success_rate(r)
                            for r in session.execute(
                                statements.select_success_rate_by_intent(since=since, cover=c)
                            )
                        ],
                    )
                )
    return out[0], out[1]


def _seed_old(url: str) -> tuple[list[dict[str, Any]], datetime]:
    """48 rows, one every 5 hours from BASE (10 days), in daily partitions, rolled up; the
    cutoff it returns falls at noon of day 6 (days 0-5 expire whole, day 6 in part)."""
    _make_partitions(url, BASE, BASE + 12 * DAY)
    rows = _rows([BASE + i * 5 * HOUR + timedelta(minutes=7) for i in range(48)])
    _insert(url, rows)
    cutoff = BASE + 6 * DAY + 12 * HOUR
    with Session(db.get_sync_engine(url)) as session:
        stats_rollup.refresh_prompt_stats(session=session, wait_timeout=5)
        session.commit()
    return rows, cutoff


def _expired_tables(url: str) -> list[str]:
    with db.get_sync_engine(url).connect() as conn:
        return partitions.list_expired_tables(conn)


def _count(url: str, table: Any) -> int:
    with db.get_sync_engine(url).connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_expired_partitions_are_copied_and_dropped_and_the_rollup_follows(clean: str) -> None:
    rows, cutoff = _seed_old(clean)
    now = cutoff + 90 * DAY
    expired = [r for r in rows if r["created_at"] < cutoff]
    whole = [r for r in expired if r["created_at"] < BASE + 6 * DAY]  # days 0-5: dropped
    assert 0 < len(whole) < len(expired) < len(rows)
    raw, rolled = _raw_and_rollup(clean, now)
    assert raw == rolled

    result = run_retention(clean, now=now, batch_size=4)
    assert result.partitions_dropped == 6
    assert (result.copied, result.deleted) == (len(expired), len(expired))
    # Six partitions in batches of four, then the rest of day 6 row-wise.
    per_day = [
        sum(
            1
            for r in whole
            if r["created_at"] < BASE + (d + 1) * DAY and r["created_at"] >= BASE + d * DAY
        )
        for d in range(6)
    ]
    partial = len(expired) - len(whole)
    assert result.batches == sum(-(-n // 4) for n in per_day) + -(-partial // 4)
    assert _expired_tables(clean) == []
    with db.get_sync_engine(clean).connect() as conn:
        names = {p.name for p in partitions.list_partitions(conn)}
        left = set(conn.execute(select(LOGS.c.id)).scalars())
        copies = {r.source_key: r for r in conn.execute(select(EXAMPLES))}
        hourly = conn.execute(
            select(func.count()).where(statements.HOURLY.c.hour < BASE + 6 * DAY)
        ).scalar_one()
    assert partitions.partition_name(BASE) not in names
    assert partitions.partition_name(BASE + 6 * DAY) in names
    assert left == {r["id"] for r in rows if r["created_at"] >= cutoff}
    assert set(copies) == {source_key(r["id"]) for r in expired}
    assert all("<EMAIL>" in c.prompt for c in copies.values())
    assert hourly == 0  # the dropped days' rollup is gone ...
    raw_after, rolled_after = _raw_and_rollup(clean, now)
    assert raw_after == rolled_after  # ... and it still equals the raw statistics
    assert raw_after != raw


class Crash(RuntimeError):
    pass


def test_a_crash_between_copy_and_drop_loses_and_duplicates_nothing(clean: str) -> None:
    rows, cutoff = _seed_old(clean)
    now = cutoff + 90 * DAY
    expired = {source_key(r["id"]) for r in rows if r["created_at"] < cutoff}
    dropped: list[str] = []

    def crash_before_the_third_drop(table: str) -> None:
        if len(dropped) == 2:
            raise Crash(f"killed before dropping {table}")
        dropped.append(table)

    with pytest.raises(Crash):
        run_retention(clean, now=now, batch_size=4, before_drop=crash_before_the_third_drop)
    left = _expired_tables(clean)
    assert len(left) == 4  # detached: invisible to readers, every row still there
    copied_before = _count(clean, EXAMPLES)
    assert copied_before > 0

    result = run_retention(clean, now=now, batch_size=4)
    assert result.partitions_dropped == 4 and _expired_tables(clean) == []
    assert result.copied == len(expired) - copied_before
    assert _count(clean, EXAMPLES) == len(expired)
    with db.get_sync_engine(clean).connect() as conn:
        assert set(conn.execute(select(EXAMPLES.c.source_key)).scalars()) == expired
        assert _count(clean, LOGS) == sum(1 for r in rows if r["created_at"] >= cutoff)
    raw, rolled = _raw_and_rollup(clean, now)
    assert raw == rolled


def test_a_crash_while_copying_a_partition_then_a_rerun(clean: str) -> None:
    rows, cutoff = _seed_old(clean)
    now = cutoff + 90 * DAY
    expired = {source_key(r["id"]) for r in rows if r["created_at"] < cutoff}

    def crash_in_batch_two(batch: int) -> None:
        if batch == 2:
            raise Crash("killed in batch 2")

    with pytest.raises(Crash):
        run_retention(clean, now=now, batch_size=3, before_commit=crash_in_batch_two)
    assert _count(clean, EXAMPLES) == 3
    assert len(_expired_tables(clean)) == 6
    result = run_retention(clean, now=now, batch_size=3)
    assert result.copied == len(expired) - 3 and result.deleted == len(expired)
    assert _count(clean, EXAMPLES) == len(expired) and _expired_tables(clean) == []


def test_the_detach_does_not_queue_behind_a_long_reader(
    clean: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader holding the parent makes the DETACH give up after ``lock_timeout`` (instead of
    queueing every new query behind it) and retry; it succeeds once the reader is gone."""
    import threading

    from tasks import retention

    monkeypatch.setattr(retention, "LOCK_TIMEOUT_S", 0.3)
    rows, cutoff = _seed_old(clean)
    reader = psycopg.connect(db.libpq_url(clean))
    reader.execute("SELECT count(*) FROM nlu_prompt_logs")  # holds ACCESS SHARE until it ends
    timer = threading.Timer(0.6, reader.rollback)
    timer.start()
    try:
        result = run_retention(clean, now=cutoff + 90 * DAY, batch_size=50)
    finally:
        timer.join()
        reader.close()
    assert result.partitions_dropped == 6
    assert result.copied == sum(1 for r in rows if r["created_at"] < cutoff)


def test_a_reader_that_stays_fails_the_run_and_loses_nothing(
    clean: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import retention

    monkeypatch.setattr(retention, "LOCK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(retention, "DDL_ATTEMPTS", 2)
    rows, cutoff = _seed_old(clean)
    with psycopg.connect(db.libpq_url(clean)) as reader:
        reader.execute("SELECT count(*) FROM nlu_prompt_logs")
        with pytest.raises(OperationalError, match="lock timeout"):
            run_retention(clean, now=cutoff + 90 * DAY, batch_size=50)
        reader.rollback()
    assert _count(clean, LOGS) == len(rows) and _count(clean, EXAMPLES) == 0
    assert _expired_tables(clean) == []


# --------------------------------------------------------------------------- triggers, roles


def test_a_row_moved_to_another_partition_marks_both_hours(clean: str) -> None:
    _make_partitions(clean, BASE, BASE + 4 * DAY)
    at = BASE + DAY + 10 * HOUR
    row = _rows([at])[0]
    _insert(clean, [row])
    with db.get_sync_engine(clean).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_stats_dirty"))
        conn.execute(LOGS.update().where(LOGS.c.id == row["id"]).values(created_at=at + 2 * DAY))
        marks = sorted(conn.execute(select(statements.DIRTY.c.hour)).scalars())
    assert marks == [at, at + 2 * DAY]
    assert _where(clean, row["id"]) == partitions.partition_name(BASE + 3 * DAY)


def test_only_the_parent_is_granted(clean: str) -> None:
    """The roles reach rows through the parent (and its policies), never a partition."""
    with db.get_sync_engine(clean).connect() as conn:
        for role in ("prompt_capture_app", "prompt_capture_pipeline"):
            for table, expected in (
                ("nlu_prompt_logs", True),
                (partitions.DEFAULT_PARTITION, False),
            ):
                allowed = conn.execute(
                    text("SELECT has_table_privilege(:r, :t, 'SELECT')"), {"r": role, "t": table}
                ).scalar_one()
                assert allowed is expected, (role, table)


def test_forget_removed_rows_marks_hours_cut_by_a_bound(clean: str) -> None:
    with db.get_sync_engine(clean).begin() as conn:
        stats_rollup.forget_removed_rows(conn, BASE + timedelta(minutes=30), BASE + DAY)
        marks = sorted(conn.execute(select(statements.DIRTY.c.hour)).scalars())
    assert marks == [BASE]


# --------------------------------------------------------------------------- period arithmetic


def test_periods_and_gaps() -> None:
    wed = datetime(2026, 11, 25, 15, 30, tzinfo=UTC)
    assert partitions.period_start(wed, "day") == datetime(2026, 11, 25, tzinfo=UTC)
    assert partitions.period_start(wed, "week") == datetime(2026, 11, 23, tzinfo=UTC)
    assert partitions.partition_name(datetime(2026, 11, 23, tzinfo=UTC)) == (
        "nlu_prompt_logs_p20261123"
    )
    assert partitions.expired_name("nlu_prompt_logs_p20261123") == (
        "nlu_prompt_logs_expired_p20261123"
    )
    d = datetime(2026, 11, 23, tzinfo=UTC)
    existing = [
        Partition("nlu_prompt_logs_default", None, None, True),
        Partition("a", d + DAY, d + 2 * DAY),
        Partition("b", d + 4 * DAY, d + 5 * DAY),
    ]
    assert partitions.uncovered(existing, d, d + 6 * DAY) == [
        (d, d + DAY),
        (d + 2 * DAY, d + 4 * DAY),
        (d + 5 * DAY, d + 6 * DAY),
    ]
    # Weekly periods where daily partitions exist: only the uncovered parts.
    assert partitions.plan_partitions(existing, wed, d + 8 * DAY, "week") == [
        (d, d + DAY),
        (d + 2 * DAY, d + 4 * DAY),
        (d + 5 * DAY, d + 7 * DAY),
        (d + 7 * DAY, d + 14 * DAY),
    ]
    assert partitions.infer_interval(existing) == "day"
    assert partitions.infer_interval([Partition("w", d, d + 7 * DAY)]) == "week"
    assert partitions.infer_interval([], "week") == "week"
    with pytest.raises(ValueError, match="partition_interval: expected one of day, week"):
        partitions.check_interval("month")


def test_id_time_windows() -> None:
    at = datetime(2026, 11, 25, 23, 58, tzinfo=UTC)
    window = statements.id_time_window(_id_at(at))
    assert window is not None
    assert window[0] <= at < window[1] and window[1] - window[0] == 2 * statements.ID_TIME_SLACK
    assert statements.id_time_window(uuid.uuid4()) is None
    with pytest.raises(ValueError, match="not a UUIDv7"):
        statements.change_params(Outcome(uuid.uuid4(), True, None, None, at), near_id_time=True)
    # A non-v7 id: the near form is the plain one.
    plain = statements.update_change(Outcome(uuid.uuid4(), True, None, None, at), near_id_time=True)
    assert "created_at >=" not in str(plain)
    groups, others = statements.near_id_time_groups(
        [Outcome(_id_at(at), True, None, None, at), Outcome(uuid.uuid4(), True, None, None, at)]
    )
    assert [len(g) for g in groups] == [1] and len(others) == 1


def _parent_created_at_bounds(url: str) -> list[datetime] | None:
    """The planner's histogram of the parent's ``created_at`` (its inherited statistics)."""
    with db.get_sync_engine(url).connect() as conn:
        found = conn.execute(
            text(
                "SELECT histogram_bounds::text::timestamptz[] FROM pg_stats "
                "WHERE tablename = 'nlu_prompt_logs' AND attname = 'created_at' AND inherited"
            )
        ).scalar_one_or_none()
    return list(found) if found is not None else None


def test_retention_analyzes_the_parent_after_its_partitions_change(clean: str) -> None:
    """Autovacuum never analyzes a partitioned parent: the retention run does, after it dropped
    and created partitions, so the planner's statistics describe the rows that are left."""
    rows, cutoff = _seed_old(clean)
    kept = sorted(r["created_at"] for r in rows if r["created_at"] >= cutoff)
    with db.get_sync_engine(clean).begin() as conn:
        conn.exec_driver_sql("ANALYZE nlu_prompt_logs")  # statistics of every row, expired too
    before = _parent_created_at_bounds(clean)
    assert before is not None and before[0] == min(r["created_at"] for r in rows) < kept[0]
    result = run_retention(clean, now=cutoff + 90 * DAY, batch_size=100)
    assert result.partitions_dropped == 6 and "analyze" in result.seconds
    after = _parent_created_at_bounds(clean)
    assert after is not None and (after[0], after[-1]) == (kept[0], kept[-1])


def test_the_retention_command_creates_partitions_of_the_configured_width(
    clean: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`prompt-capture retention` passes PROMPT_CAPTURE_PARTITION_INTERVAL on, as the daily
    flow does: with `week`, the partitions it creates ahead of now are weeks, whatever the
    width of the newest partition."""
    import json

    from typer.testing import CliRunner

    from capture.settings import get_settings
    from deployments.cli import app

    now = datetime(2031, 1, 6, 9, tzinfo=UTC)  # a Monday, past every partition of this database
    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", clean)
    monkeypatch.setenv("PROMPT_CAPTURE_PARTITION_INTERVAL", "week")
    get_settings.cache_clear()
    try:
        # 20 years: nothing has expired, so nothing else in this database is dropped
        done = CliRunner().invoke(app, ["retention", "--days", "7300", "--now", now.isoformat()])
        assert done.exit_code == 0, done.output
        assert json.loads(done.output)["partitions_created"] == 3  # now + 14 days: 3 weeks
        with db.get_sync_engine(clean).connect() as conn:
            new = [p for p in partitions.list_partitions(conn) if p.start and p.start >= now - DAY]
        assert [(p.start, p.end) for p in new] == [
            (now.replace(hour=0) + k * 7 * DAY, now.replace(hour=0) + (k + 1) * 7 * DAY)
            for k in range(3)
        ]
    finally:
        get_settings.cache_clear()
        with db.get_sync_engine(clean).begin() as conn:
            for p in partitions.list_partitions(conn):
                if p.start and p.start >= now - DAY:
                    conn.exec_driver_sql(f"DROP TABLE {p.name}")
