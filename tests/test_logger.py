"""The capture logger on real databases (SQLite and PostgreSQL): content, merge, order, errors."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from capture import db
from capture.ids import uuid7
from capture.logger import CaptureLogger
from capture.service import NLUService, create_nlu_service
from capture.spool import C_ID, C_SECONDARY, ROW_COLUMNS, new_row
from capture.types import Prediction
from tests.capture_helpers import (
    FixedClassifier,
    StepClock,
    aware,
    capture_settings,
    count_rows,
    fetch_rows,
)


def counters(source: NLUService | CaptureLogger, *names: str) -> tuple[int, ...]:
    """The named counters of ``source.stats()``."""
    stats = source.stats()
    return tuple(getattr(stats, name) for name in names)


@pytest.fixture
async def service(db_url: str, tmp_path: Path) -> AsyncIterator[NLUService]:
    svc = create_nlu_service(
        FixedClassifier(),
        url=db_url,
        settings=capture_settings(db_url, tmp_path / "home"),
        clock=StepClock(),
    )
    yield svc
    await svc.aclose()


async def test_every_field_is_written(db_url: str, service: NLUService) -> None:
    user, conversation = uuid.uuid4(), uuid.uuid4()
    result = await service.process_message(
        "schedule time to work on my assignment",
        user_id=user,
        conversation_id=str(conversation),
        message_index=3,
    )
    bare = await service.process_message("hello")
    await service.flush()

    assert result.intent == "scheduling"
    assert result.confidence == 0.875
    assert result.secondary_intents == (("calendar_event", 0.125),)
    assert result.model_version == "test-v1"
    assert result.log_id.version == 7
    rows = fetch_rows(db_url)
    assert set(rows) == {result.log_id, bare.log_id}
    row = rows[result.log_id]
    assert row["user_id"] == user
    assert row["conversation_id"] == conversation
    assert row["message_index"] == 3
    assert row["prompt"] == "schedule time to work on my assignment"
    assert row["predicted_intent"] == "scheduling"
    assert row["confidence"] == pytest.approx(0.875)
    assert row["secondary_intents"] == [{"intent": "calendar_event", "confidence": 0.125}]
    assert row["model_version"] == "test-v1"
    assert aware(row["created_at"]) == datetime(2026, 11, 20, 9, 30, 0, 1000, tzinfo=UTC)
    assert aware(row["updated_at"]) == aware(row["created_at"])
    for column in (
        "corrected_intent",
        "correction_notes",
        "corrected_at",
        "was_successful",
        "workflow_type",
        "execution_error",
    ):
        assert row[column] is None, column
    other = rows[bare.log_id]
    assert (other["user_id"], other["conversation_id"], other["message_index"]) == (
        None,
        None,
        None,
    )
    assert aware(other["created_at"]) == datetime(2026, 11, 20, 9, 30, 0, 2000, tzinfo=UTC)
    assert counters(service, "queued", "written", "rejected", "pending") == (2, 2, 0, 0)


async def test_outcome_for_a_queued_row_is_merged_into_its_insert(
    db_url: str, service: NLUService
) -> None:
    result = await service.process_message("add dentist to my calendar")
    # No await between the two calls: the row is still queued, so the outcome is merged.
    await service.update_workflow_outcome(
        result.log_id, was_successful=False, workflow_type="calendar", execution_error="timeout"
    )
    await service.add_correction(result.log_id, "calendar_event", "user wanted an event")
    assert service.stats().merged == 2
    await service.flush()

    row = fetch_rows(db_url)[result.log_id]
    assert row["was_successful"] is False
    assert row["workflow_type"] == "calendar"
    assert row["execution_error"] == "timeout"
    assert row["corrected_intent"] == "calendar_event"
    assert row["correction_notes"] == "user wanted an event"
    # StepClock: created at +1 ms, outcome +2 ms, correction +3 ms.
    assert aware(row["corrected_at"]) == datetime(2026, 11, 20, 9, 30, 0, 3000, tzinfo=UTC)
    assert counters(service, "queued", "written", "merged", "rejected") == (3, 1, 2, 0)


async def test_outcome_and_correction_after_the_row_is_written(
    db_url: str, service: NLUService
) -> None:
    result = await service.process_message("remind me to call mom")
    await service.flush()
    await service.update_workflow_outcome(str(result.log_id), True, "reminders")
    await service.add_correction(result.log_id, "reminders")
    await service.flush()

    row = fetch_rows(db_url)[result.log_id]
    assert (row["was_successful"], row["workflow_type"], row["execution_error"]) == (
        True,
        "reminders",
        None,
    )
    assert (row["corrected_intent"], row["correction_notes"]) == ("reminders", None)
    assert row["corrected_at"] is not None
    assert counters(service, "queued", "written", "merged", "rejected") == (3, 3, 0, 0)


async def test_operations_keep_their_order(db_url: str, service: NLUService) -> None:
    """Many updates of the same rows, across merges, batches and flushes: the last one wins."""
    results = [await service.process_message(f"prompt {i}") for i in range(30)]
    expected: dict[uuid.UUID, tuple[bool, str]] = {}
    for round_ in range(6):
        for i, result in enumerate(results):
            ok = (i + round_) % 2 == 0
            kind = f"wf-{round_}-{i}"
            await service.update_workflow_outcome(result.log_id, ok, kind)
            expected[result.log_id] = (ok, kind)
        if round_ % 2 == 1:
            await service.flush()
    await service.flush()

    rows = fetch_rows(db_url)
    assert len(rows) == 30
    for log_id, (ok, kind) in expected.items():
        assert (rows[log_id]["was_successful"], rows[log_id]["workflow_type"]) == (ok, kind)
    stats = service.stats()
    assert stats.rejected == 0
    assert stats.queued == 30 + 6 * 30


async def test_a_row_the_database_refuses_is_rejected_and_the_writer_goes_on(
    db_url: str, tmp_path: Path
) -> None:
    """Rows submitted straight to the logger (past the service's validation): the one that
    violates the CHECK constraint is isolated by bisection, recorded, and nothing else is lost."""
    settings = capture_settings(db_url, tmp_path / "home")
    capture = CaptureLogger(db_url, settings=settings)
    now = datetime.now(UTC)

    def row(confidence: float) -> tuple[object, ...]:
        return new_row(
            log_id=uuid7(),
            user_id=None,
            prompt="p",
            predicted_intent="intent",
            confidence=confidence,
            secondary_intents=(),
            conversation_id=None,
            message_index=None,
            model_version=None,
            created_at=now,
        )

    good = [row(0.5) for _ in range(20)]
    bad = row(2.0)
    for values in [*good[:7], bad, *good[7:]]:
        capture.submit_insert(values)
    unknown = uuid.uuid4()
    capture.submit_outcome(unknown, True, "x", None, now)
    await capture.flush()

    assert set(fetch_rows(db_url)) == {v[C_ID] for v in good}
    assert counters(capture, "written", "rejected", "pending") == (20, 2, 0)
    records = [json.loads(line) for line in capture.rejected_path.read_text().splitlines()]
    assert [r["op"]["op"] for r in records] == ["insert", "outcome"]
    assert records[0]["op"]["row"][C_ID] == str(bad[C_ID])
    assert "confidence" in records[0]["reason"].lower() or "check" in records[0]["reason"].lower()
    assert records[1]["op"]["id"] == str(unknown)
    assert "unknown log id" in records[1]["reason"]

    # The writer is still alive.
    later = row(0.25)
    capture.submit_insert(later)
    await capture.flush()
    assert later[C_ID] in fetch_rows(db_url)
    await capture.aclose()


@pytest.mark.postgres
async def test_a_resent_batch_is_inserted_idempotently(postgres_url: str, tmp_path: Path) -> None:
    """A COPY hitting rows that already exist (a commit whose acknowledgement was lost, then
    re-sent) falls back to INSERT ... ON CONFLICT DO NOTHING: each id once, nothing rejected."""
    with db.get_sync_engine(postgres_url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
    service = create_nlu_service(
        FixedClassifier(),
        url=postgres_url,
        settings=capture_settings(postgres_url, tmp_path / "home"),
    )
    results = [await service.process_message(f"prompt {i}") for i in range(10)]
    await service.flush()
    capture = service.capture
    rows = fetch_rows(postgres_url)
    fresh = await service.process_message("a new one")
    # Re-send five committed rows together with the new one.
    for log_id in [r.log_id for r in results[:5]]:
        row = rows[log_id]
        values = [row[c] for c in ROW_COLUMNS]
        values[C_SECONDARY] = tuple(
            (s["intent"], s["confidence"]) for s in row["secondary_intents"]
        )
        capture.submit_insert(values)
    await service.flush()
    assert count_rows(postgres_url) == (11, 11)
    assert fresh.log_id in fetch_rows(postgres_url)
    assert capture.copy_mode == "direct"  # superuser: RLS does not apply
    assert service.stats().rejected == 0
    await service.aclose()


async def test_unknown_classifier_version_is_none(db_url: str, tmp_path: Path) -> None:
    classifier = FixedClassifier(prediction=Prediction("weather", 1.0), version=None)
    service = create_nlu_service(
        classifier, url=db_url, settings=capture_settings(db_url, tmp_path / "home")
    )
    pinned = create_nlu_service(
        classifier,
        url=db_url,
        settings=capture_settings(db_url, tmp_path / "home2"),
        model_version="pinned-2",
    )
    first = await service.process_message("is it raining")
    second = await pinned.process_message("is it sunny")
    await service.aclose()
    await pinned.aclose()
    rows = fetch_rows(db_url)
    assert (first.model_version, rows[first.log_id]["model_version"]) == (None, None)
    assert (second.model_version, rows[second.log_id]["model_version"]) == ("pinned-2", "pinned-2")
    assert rows[first.log_id]["secondary_intents"] == []


@pytest.mark.postgres
async def test_writer_role_under_row_level_security(
    postgres_server_url: str, postgres_url: str, tmp_path: Path
) -> None:
    """A writer that logs in as a member of prompt_capture_pipeline (RLS applies: PostgreSQL
    refuses COPY FROM) stages its rows in a temp table and still writes every field."""
    with db.get_sync_engine(postgres_url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
    role = f"pc_test_writer_{uuid.uuid4().hex[:8]}"
    database = postgres_url.rpartition("/")[2]
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE prompt_capture_pipeline")
    url = postgres_url.replace("://postgres@", f"://{role}@", 1)
    try:
        service = create_nlu_service(
            FixedClassifier(), url=url, settings=capture_settings(url, tmp_path / "home")
        )
        first = [await service.process_message(f"rls {i}", user_id=uuid.uuid4()) for i in range(50)]
        await service.flush()
        for result in first[::2]:
            await service.update_workflow_outcome(result.log_id, True, "rls")
        await service.flush()
        assert service.capture.copy_mode == "staged"
        assert service.stats().rejected == 0
        await service.aclose()
    finally:
        await db.get_engine(url).dispose()
        db.get_sync_engine(url).dispose()
        base = postgres_server_url.rpartition("/")[0]
        with psycopg.connect(f"{base}/{database}", autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
        with psycopg.connect(postgres_server_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {role}")
    rows = fetch_rows(postgres_url)
    assert set(rows) == {r.log_id for r in first}
    assert sum(1 for r in rows.values() if r["workflow_type"] == "rls") == 25
    assert all(r["prompt"].startswith("rls ") and r["user_id"] for r in rows.values())
