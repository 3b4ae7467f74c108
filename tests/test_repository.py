"""The NLU repository on both databases: exact rows, order, counts, buckets and rates."""

from __future__ import annotations

import json
import math
import random
import struct
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import column, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from capture import db, dialect_sql, statements
from capture import repository as repo
from capture.models import PromptLog
from capture.repository import UnknownLogIdError
from capture.rows import ConfidenceBucket, IntentStats, IntentSuccessRate, prompt_log_values
from capture.values import as_real

NOW = datetime(2026, 11, 20, 12, 0, 0, tzinfo=UTC)


def clock() -> datetime:
    return NOW


async def add(
    session: AsyncSession,
    confidence: float,
    intent: str = "greet",
    *,
    age: timedelta = timedelta(hours=1),
    success: bool | None = None,
    corrected: str | None = None,
    user_id: uuid.UUID | None = None,
    prompt: str | None = None,
) -> uuid.UUID:
    log_id = await repo.log_prompt(
        prompt or f"{intent} at {confidence}",
        intent,
        confidence,
        session=session,
        user_id=user_id,
        created_at=NOW - age,
    )
    if success is not None:
        await repo.update_prompt_log_outcome(log_id, success, "wf", session=session)
    if corrected is not None:
        await repo.add_prompt_correction(log_id, corrected, session=session, clock=clock)
    return log_id


async def count_rows(session: AsyncSession) -> int:
    return int((await session.execute(select(func.count()).select_from(PromptLog))).scalar_one())


# --------------------------------------------------------------------------- writes


async def test_log_prompt_stores_every_field(session: AsyncSession) -> None:
    user, conversation = uuid.uuid4(), uuid.uuid4()
    log_id = await repo.log_prompt(
        "schedule time to work on assignment",
        "scheduling",
        0.92,
        [("calendar_event", 0.05), {"intent": "reminder", "confidence": 0.02}],
        session=session,
        user_id=str(user),
        conversation_id=conversation,
        message_index=3,
        model_version="v7",
        clock=clock,
    )
    assert log_id.version == 7
    row = await repo.get_prompt_log(log_id, session=session)
    assert row is not None
    assert row.id == log_id
    assert row.user_id == user
    assert row.prompt == "schedule time to work on assignment"
    assert row.predicted_intent == "scheduling"
    assert row.confidence == 0.92  # the float4 read back as PostgreSQL prints it
    assert row.secondary_intents == (("calendar_event", 0.05), ("reminder", 0.02))
    assert row.conversation_id == conversation
    assert row.message_index == 3
    assert row.model_version == "v7"
    assert row.created_at == NOW
    assert row.created_at.tzinfo is not None and row.created_at.utcoffset() == timedelta(0)
    assert (row.corrected_intent, row.was_successful, row.workflow_type) == (None, None, None)
    # The stored JSON shape that the capture logger writes too.
    raw = (
        await session.execute(select(PromptLog.secondary_intents).where(PromptLog.id == log_id))
    ).scalar_one()
    assert raw == [
        {"intent": "calendar_event", "confidence": 0.05},
        {"intent": "reminder", "confidence": 0.02},
    ]


async def test_log_prompt_keeps_given_id_and_converts_created_at_to_utc(
    session: AsyncSession,
) -> None:
    given = uuid.uuid4()
    local = datetime(2026, 11, 20, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    log_id = await repo.log_prompt(
        "hello", "greet", 1.0, session=session, log_id=str(given), created_at=local
    )
    assert log_id == given
    row = await repo.get_prompt_log(given, session=session)
    assert row is not None
    assert row.created_at == datetime(2026, 11, 20, 12, 30, tzinfo=UTC)
    assert row.secondary_intents == ()
    assert row.user_id is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"predicted_intent": ""}, "predicted_intent"),
        ({"confidence": 1.5}, "confidence"),
        ({"confidence": -0.01}, "confidence"),
        ({"confidence": math.nan}, "confidence"),
        ({"confidence": True}, "confidence"),
        ({"secondary_intents": [("other", 2.0)]}, r"secondary_intents\[0\]"),
        ({"secondary_intents": [("", 0.1)]}, r"secondary_intents\[0\]\.intent"),
        ({"secondary_intents": "oops"}, "secondary_intents"),
        ({"message_index": -1}, "message_index"),
        ({"user_id": "not-a-uuid"}, "user_id"),
        ({"log_id": "nope"}, "log_id"),
        ({"created_at": datetime(2026, 1, 1)}, "created_at"),
    ],
)
async def test_log_prompt_rejects_bad_input_and_writes_nothing(
    session: AsyncSession, kwargs: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {"prompt": "hello", "predicted_intent": "greet", "confidence": 0.5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{field}"):
        await repo.log_prompt(session=session, **args)
    assert await count_rows(session) == 0


async def test_update_outcome_sets_fields_and_refuses_unknown_ids(session: AsyncSession) -> None:
    first = await add(session, 0.8)
    second = await add(session, 0.4)
    await repo.update_prompt_log_outcome(first, True, "scheduling", session=session)
    await repo.update_prompt_log_outcome(
        str(second), False, "calendar", "timeout talking to calendar", session=session
    )
    a = await repo.get_prompt_log(first, session=session)
    b = await repo.get_prompt_log(second, session=session)
    assert a is not None and b is not None
    assert (a.was_successful, a.workflow_type, a.execution_error) == (True, "scheduling", None)
    assert (b.was_successful, b.workflow_type, b.execution_error) == (
        False,
        "calendar",
        "timeout talking to calendar",
    )
    missing = uuid.uuid4()
    with pytest.raises(UnknownLogIdError, match=str(missing)) as info:
        await repo.update_prompt_log_outcome(missing, True, "x", session=session)
    assert isinstance(info.value, ValueError) and info.value.log_id == missing
    with pytest.raises(ValueError, match=r"^was_successful"):
        await repo.update_prompt_log_outcome(first, "yes", "x", session=session)  # type: ignore[arg-type]


async def test_add_correction_sets_corrected_at_and_refuses_unknown_ids(
    session: AsyncSession,
) -> None:
    log_id = await add(session, 0.55, "scheduling")
    await repo.add_prompt_correction(
        str(log_id), "calendar_event", "wanted an event", session=session, clock=clock
    )
    row = await repo.get_prompt_log(log_id, session=session)
    assert row is not None
    assert row.corrected_intent == "calendar_event"
    assert row.correction_notes == "wanted an event"
    assert row.corrected_at == NOW
    assert row.predicted_intent == "scheduling"
    with pytest.raises(UnknownLogIdError):
        await repo.add_prompt_correction(uuid.uuid4(), "x", session=session, clock=clock)
    with pytest.raises(ValueError, match=r"^log_id"):
        await repo.add_prompt_correction("uuid-from-review-file", "x", session=session)
    with pytest.raises(ValueError, match=r"^corrected_intent"):
        await repo.add_prompt_correction(log_id, " ", session=session)


# --------------------------------------------------------------------------- review reads


async def test_low_confidence_lowest_first_uncorrected_only(session: AsyncSession) -> None:
    c20 = await add(session, 0.20)
    c65 = await add(session, 0.65)
    c50 = await add(session, 0.50)
    c699 = await add(session, 0.699)
    await add(session, 0.70)  # not below the threshold
    await add(session, 0.95)
    await add(session, 0.10, corrected="other")  # already reviewed
    old30 = await add(session, 0.30, age=timedelta(days=30))

    rows = await repo.get_low_confidence_prompts(session=session, clock=clock)
    assert [r.id for r in rows] == [c20, old30, c50, c65, c699]
    assert all(r.created_at.tzinfo is not None for r in rows)
    limited = await repo.get_low_confidence_prompts(0.7, 2, session=session, clock=clock)
    assert [r.id for r in limited] == [c20, old30]
    recent = await repo.get_low_confidence_prompts(0.7, 100, 7, session=session, clock=clock)
    assert [r.id for r in recent] == [c20, c50, c65, c699]
    stricter = await repo.get_low_confidence_prompts(0.5, session=session, clock=clock)
    assert [r.id for r in stricter] == [c20, old30]


async def test_failed_workflows_newest_first(session: AsyncSession) -> None:
    f_old = await add(session, 0.9, age=timedelta(days=3), success=False)
    f_new = await add(session, 0.8, age=timedelta(minutes=5), success=False)
    f_mid = await add(session, 0.7, age=timedelta(days=1), success=False)
    await add(session, 0.9, success=True)
    await add(session, 0.9)
    rows = await repo.get_failed_workflow_prompts(session=session)
    assert [r.id for r in rows] == [f_new, f_mid, f_old]
    assert all(r.was_successful is False and r.workflow_type == "wf" for r in rows)
    assert [r.id for r in await repo.get_failed_workflow_prompts(2, session=session)] == [
        f_new,
        f_mid,
    ]


async def test_prompts_for_retraining(session: AsyncSession) -> None:
    corrected_low = await add(session, 0.40, "scheduling", corrected="calendar_event",
                              age=timedelta(days=2))  # fmt: skip
    corrected_failed = await add(session, 0.95, "greet", success=False, corrected="goodbye",
                                 age=timedelta(days=1))  # fmt: skip
    confident_ok = await add(session, 0.97, "weather", success=True, age=timedelta(hours=5))
    confident_unknown = await add(session, 0.91, "weather", age=timedelta(hours=4))
    exactly_min = await add(session, 0.90, "weather", age=timedelta(hours=3))
    await add(session, 0.99, "weather", success=False)  # workflow failed: not a clean label
    await add(session, 0.85, "weather", success=True)  # not confident enough
    old_confident = await add(session, 0.99, "time", success=True, age=timedelta(days=40))

    rows = await repo.get_prompts_for_retraining(session=session, clock=clock)
    assert [r.id for r in rows] == [
        old_confident,
        corrected_low,
        corrected_failed,
        confident_ok,
        confident_unknown,
        exactly_min,
    ]
    by_id = {r.id: r for r in rows}
    assert (by_id[corrected_low].label, by_id[corrected_low].corrected) == ("calendar_event", True)
    assert by_id[corrected_low].predicted_intent == "scheduling"
    assert (by_id[confident_ok].label, by_id[confident_ok].corrected) == ("weather", False)
    assert by_id[corrected_low].as_export_record() == {
        "text": "scheduling at 0.4",
        "label": "calendar_event",
        "confidence": 0.4,
        "source": "production",
        "corrected": True,
    }
    recent = await repo.get_prompts_for_retraining(7, session=session, clock=clock)
    assert [r.id for r in recent] == [r.id for r in rows[1:]]
    strict = await repo.get_prompts_for_retraining(None, 0.95, session=session, clock=clock)
    assert [r.id for r in strict] == [old_confident, corrected_low, corrected_failed, confident_ok]


# --------------------------------------------------------------------------- statistics

# Ties at every half-tenth (float4 values just above or below them), the 0.05 boundary, and ends.
BUCKET_CASES = {
    0.0: 0.0,
    0.04: 0.0,
    0.0499995: 0.0,
    0.05: 0.1,
    0.15: 0.2,
    0.25: 0.3,
    0.349: 0.3,
    0.35: 0.4,
    0.45: 0.5,
    0.55: 0.6,
    0.65: 0.7,
    0.75: 0.8,
    0.85: 0.9,
    0.95: 1.0,
    1.0: 1.0,
}


async def test_confidence_distribution_rounds_like_postgres(session: AsyncSession) -> None:
    for conf in BUCKET_CASES:
        await add(session, conf)
    await add(session, 0.95, age=timedelta(days=8))  # outside the 7-day window
    expected: dict[float, int] = {}
    for bucket in BUCKET_CASES.values():
        expected[bucket] = expected.get(bucket, 0) + 1
    rows = await repo.get_confidence_distribution(session=session, clock=clock)
    assert rows == [
        ConfidenceBucket(bucket=b, count=n) for b, n in sorted(expected.items(), reverse=True)
    ]
    assert rows[0] == ConfidenceBucket(1.0, 2)
    everything = await repo.get_confidence_distribution(None, session=session, clock=clock)
    assert everything[0] == ConfidenceBucket(1.0, 3)


def _float4_neighbours(value: float, steps: int) -> list[float]:
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return [struct.unpack("<f", struct.pack("<I", bits + k))[0] for k in range(-steps, steps + 1)]


def _postgres_round_tenths(value: float) -> int:
    """PostgreSQL's ROUND(real::numeric, 1) * 10: 6 significant digits, then half away from 0."""
    return int(Decimal(f"{value:.6g}").quantize(Decimal("0.1"), ROUND_HALF_UP) * 10)


async def test_confidence_tenths_equals_round_numeric(session: AsyncSession) -> None:
    """The portable bucket expression against PostgreSQL's ROUND(real::numeric, 1) on float4
    values around every tenth's half-step (and where 6-digit rounding reaches it), plus random."""
    values: list[float] = [0.0, 1.0]
    for tenth in range(10):
        half = tenth / 10 + 0.05
        values += _float4_neighbours(half, 300)
        six_digit_flip = half - (5e-8 if half < 0.1 else 5e-7)
        values += _float4_neighbours(six_digit_flip, 60)
    rng = random.Random(7)
    values += [as_real(rng.random()) for _ in range(3000)]
    dialect = session.get_bind().dialect
    if dialect.name == "postgresql":
        expr = dialect_sql.confidence_tenths(column("v")).compile(dialect=dialect)
        result = await session.execute(
            text(
                f"SELECT v, {expr} AS tenths, round(v::numeric, 1) * 10 AS rounded "
                "FROM unnest(CAST(:vals AS REAL[])) AS v"
            ),
            {"vals": values},
        )
        rows = result.all()
        wrong = [
            r
            for r in rows
            if not int(r.tenths) == int(r.rounded) == _postgres_round_tenths(as_real(r.v))
        ]
    else:
        expr = dialect_sql.confidence_tenths(column("value")).compile(dialect=dialect)
        result = await session.execute(
            text(f"SELECT value AS v, {expr} AS tenths FROM json_each(:vals)"),
            {"vals": json.dumps(values)},
        )
        rows = result.all()
        wrong = [r for r in rows if int(r.tenths) != _postgres_round_tenths(as_real(r.v))]
    assert wrong == []
    assert len(rows) == len(values)
    assert {int(r.tenths) for r in rows} == set(range(11))


async def test_confidence_statistics_object_matches_the_query(postgres_url: str) -> None:
    """Migration 0003's statistics cover the query's exact expression: after ANALYZE the planner
    expects ~11 buckets (not one group per distinct confidence) and hashes them."""
    engine = db.get_sync_engine(postgres_url)
    rng = random.Random(3)
    rows = [
        prompt_log_values(
            log_id=uuid.uuid4(),
            prompt="p",
            predicted_intent="greet",
            confidence=rng.random(),
            created_at=NOW,
        )
        for _ in range(3000)
    ]
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
        conn.execute(statements.insert_prompt_logs(), rows)
    try:
        with engine.connect() as conn:
            conn.execute(text("ANALYZE nlu_prompt_logs"))
            statement = statements.select_confidence_distribution()
            compiled = statement.compile(dialect=engine.dialect)
            plan = conn.exec_driver_sql(
                "EXPLAIN (FORMAT JSON) " + str(compiled), compiled.params
            ).scalar_one()[0]["Plan"]
            conn.commit()
        aggregates = []
        stack = [plan]
        while stack:
            node = stack.pop()
            if "Aggregate" in node["Node Type"]:
                aggregates.append(node)
            stack.extend(node.get("Plans", ()))
        assert aggregates and all(node["Plan Rows"] <= 20 for node in aggregates), plan
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM nlu_prompt_logs"))


async def test_intent_distribution(session: AsyncSession) -> None:
    for conf in (0.9, 0.8, 0.7):
        await add(session, conf, "weather")
    await add(session, 0.5, "weather", corrected="time")
    await add(session, 0.6, "greet", corrected="goodbye")
    await add(session, 0.4, "greet")
    await add(session, 0.3, "alarm")
    await add(session, 0.3, "greet")
    await add(session, 0.9, "alarm", age=timedelta(days=10))

    rows = await repo.get_intent_distribution(session=session, clock=clock)
    weather = sum(as_real(c) for c in (0.9, 0.8, 0.7, 0.5)) / 4
    greet = sum(as_real(c) for c in (0.6, 0.4, 0.3)) / 3
    assert rows == [
        IntentStats("weather", 4, round(weather, 6), 1),
        IntentStats("greet", 3, round(greet, 6), 1),
        IntentStats("alarm", 1, round(as_real(0.3), 6), 0),
    ]
    assert rows[0].avg_confidence == 0.725
    everything = await repo.get_intent_distribution(None, session=session, clock=clock)
    assert [(r.predicted_intent, r.count) for r in everything] == [
        ("weather", 4),
        ("greet", 3),
        ("alarm", 2),
    ]


async def test_success_rate_by_intent(session: AsyncSession) -> None:
    plan = {  # intent: (successes, total)
        "eighth": (1, 8),  # 12.5
        "sixteenth": (1, 16),  # 6.25 rounds half up to 6.3
        "two_thirds": (2, 3),  # 66.7
        "one_third": (1, 3),  # 33.3
        "all": (3, 3),  # 100.0
        "none": (0, 2),  # 0.0
    }
    for intent, (ok, total) in plan.items():
        for i in range(total):
            await add(session, 0.8, intent, success=i < ok)
    await add(session, 0.8, "no_outcome")  # never reported: not counted anywhere
    await add(session, 0.8, "all", success=False, age=timedelta(days=30))

    rows = await repo.get_success_rate_by_intent(session=session, clock=clock)
    assert rows == [
        IntentSuccessRate("none", 2, 0, 0.0),
        IntentSuccessRate("sixteenth", 16, 1, 6.3),
        IntentSuccessRate("eighth", 8, 1, 12.5),
        IntentSuccessRate("one_third", 3, 1, 33.3),
        IntentSuccessRate("two_thirds", 3, 2, 66.7),
        IntentSuccessRate("all", 4, 3, 75.0),
    ]
    recent = await repo.get_success_rate_by_intent(7, session=session, clock=clock)
    assert recent[-1] == IntentSuccessRate("all", 3, 3, 100.0)


async def test_bad_query_parameters_name_the_field(session: AsyncSession) -> None:
    with pytest.raises(ValueError, match=r"^limit"):
        await repo.get_low_confidence_prompts(0.7, 0, session=session)
    with pytest.raises(ValueError, match=r"^threshold"):
        await repo.get_low_confidence_prompts(1.5, session=session)
    with pytest.raises(ValueError, match=r"^days"):
        await repo.get_confidence_distribution(0, session=session)
    with pytest.raises(ValueError, match=r"^min_confidence"):
        await repo.get_prompts_for_retraining(None, math.nan, session=session)
    with pytest.raises(ValueError, match=r"^now"):
        await repo.get_intent_distribution(7, session=session, clock=lambda: datetime(2026, 1, 1))


# --------------------------------------------------------------------------- user scope


async def test_user_scoped_calls(session: AsyncSession) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    a_old = await add(session, 0.5, user_id=alice, age=timedelta(hours=3))
    a_new = await add(session, 0.6, user_id=alice, age=timedelta(hours=1))
    b_row = await add(session, 0.7, user_id=bob)
    await add(session, 0.8)  # anonymous

    assert [r.id for r in await repo.get_user_prompts(alice, session=session)] == [a_new, a_old]
    assert [r.id for r in await repo.get_user_prompts(str(alice), 1, session=session)] == [a_new]
    assert [r.id for r in await repo.get_user_prompts(bob, session=session)] == [b_row]

    with pytest.raises(UnknownLogIdError, match=str(alice)):
        await repo.update_prompt_log_outcome(b_row, True, "wf", session=session, user_id=alice)
    with pytest.raises(UnknownLogIdError):
        await repo.add_prompt_correction(b_row, "x", session=session, user_id=alice)
    await repo.update_prompt_log_outcome(b_row, True, "wf", session=session, user_id=bob)
    row = await repo.get_prompt_log(b_row, session=session)
    assert row is not None and row.was_successful is True and row.corrected_intent is None


# --------------------------------------------------------------------------- the class


async def test_repository_class_commits_each_call(db_url: str) -> None:
    repository = repo.create_nlu_repository(db_url, clock=clock)
    user = uuid.uuid4()
    low = await repository.log_prompt("hmm what", "greet", 0.3, user_id=user)
    high = await repository.log_prompt("what is the weather", "weather", 0.97, [("time", 0.02)])
    await repository.update_prompt_log_outcome(high, True, "weather")
    await repository.update_prompt_log_outcome(low, False, "greet", "no handler", user_id=user)
    await repository.add_prompt_correction(low, "small_talk", "chit-chat")

    # Everything was committed: a separate synchronous connection sees it.
    with db.get_sync_engine(db_url).connect() as conn:
        stored = conn.execute(
            text("SELECT corrected_intent, was_successful FROM nlu_prompt_logs WHERE id = :i"),
            {"i": low.hex if db.is_sqlite(db_url) else low},
        ).one()
    assert tuple(stored) == ("small_talk", False)

    assert [r.id for r in await repository.get_low_confidence_prompts()] == []
    assert [r.id for r in await repository.get_failed_workflow_prompts()] == [low]
    assert [(r.label, r.corrected) for r in await repository.get_prompts_for_retraining()] == [
        ("small_talk", True),
        ("weather", False),
    ]
    assert await repository.get_confidence_distribution() == [
        ConfidenceBucket(1.0, 1),
        ConfidenceBucket(0.3, 1),
    ]
    assert [s.predicted_intent for s in await repository.get_intent_distribution()] == [
        "greet",
        "weather",
    ]
    assert await repository.get_success_rate_by_intent() == [
        IntentSuccessRate("greet", 1, 0, 0.0),
        IntentSuccessRate("weather", 1, 1, 100.0),
    ]
    assert [r.id for r in await repository.get_user_prompts(user)] == [low]
    fetched = await repository.get_prompt_log(high)
    assert fetched is not None and fetched.secondary_intents == (("time", 0.02),)
    with pytest.raises(UnknownLogIdError):
        await repository.update_prompt_log_outcome(uuid.uuid4(), True, "x")


def test_create_repository_refuses_unmigrated_database(tmp_path: Path) -> None:
    with pytest.raises(db.DatabaseNotMigratedError, match="prompt-capture db upgrade"):
        repo.create_nlu_repository(f"sqlite:///{tmp_path / 'empty.db'}")


# --------------------------------------------------------------------------- the design note's SQL


SPEC_CONFIDENCE = """
SELECT ROUND(confidence::numeric, 1) as conf_bucket, COUNT(*) as count
FROM nlu_prompt_logs WHERE created_at > NOW() - INTERVAL '7 days'
GROUP BY conf_bucket ORDER BY conf_bucket DESC
"""
SPEC_INTENTS = """
SELECT predicted_intent, COUNT(*) as count, AVG(confidence) as avg_conf,
       COUNT(corrected_intent) as corrections
FROM nlu_prompt_logs WHERE created_at > NOW() - INTERVAL '7 days'
GROUP BY predicted_intent ORDER BY count DESC
"""
SPEC_SUCCESS = """
SELECT predicted_intent, COUNT(*) as total,
       COUNT(CASE WHEN was_successful = TRUE THEN 1 END) as successes,
       ROUND(100.0 * COUNT(CASE WHEN was_successful = TRUE THEN 1 END) / COUNT(*), 1)
           as success_rate
FROM nlu_prompt_logs WHERE was_successful IS NOT NULL
GROUP BY predicted_intent ORDER BY success_rate ASC
"""


async def test_statistics_equal_the_design_notes_sql_on_postgres(postgres_url: str) -> None:
    with db.get_sync_engine(postgres_url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
    repository = repo.create_nlu_repository(postgres_url)  # real clock, like NOW() in the SQL
    confs = [*BUCKET_CASES, 0.33, 0.61, 0.62, 0.07, 0.99]
    for i, conf in enumerate(confs):
        log_id = await repository.log_prompt(f"p{i}", f"intent{i % 4}", conf)
        if i % 3:
            await repository.update_prompt_log_outcome(log_id, i % 5 != 0, "wf")
        if i % 7 == 0:
            await repository.add_prompt_correction(log_id, "fixed")
    with db.get_sync_engine(postgres_url).connect() as conn:
        spec_conf = conn.execute(text(SPEC_CONFIDENCE)).all()
        spec_intents = conn.execute(text(SPEC_INTENTS)).all()
        spec_success = conn.execute(text(SPEC_SUCCESS)).all()

    assert [(b.bucket, b.count) for b in await repository.get_confidence_distribution()] == [
        (float(b), n) for b, n in spec_conf
    ]
    ours = {s.predicted_intent: s for s in await repository.get_intent_distribution()}
    assert {k: (s.count, s.avg_confidence, s.corrections) for k, s in ours.items()} == {
        name: (n, round(avg, 6), corr) for name, n, avg, corr in spec_intents
    }
    rates = await repository.get_success_rate_by_intent()
    assert {(r.predicted_intent, r.total, r.successes, r.success_rate) for r in rates} == {
        (name, total, ok, float(rate)) for name, total, ok, rate in spec_success
    }
    assert [r.success_rate for r in rates] == sorted(float(row[3]) for row in spec_success)
