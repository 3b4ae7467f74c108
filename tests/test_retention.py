"""Retention: batches copy + delete atomically, on both databases, and survive a crash."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from capture.db import get_sync_engine
from capture.ids import uuid7
from capture.models import PromptLog, TrainingExample
from capture.settings import get_settings
from flows.retention import retention_flow
from tasks.retention import iso_week_monday, run_retention, source_key

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
LOGS = PromptLog.__table__
EXAMPLES = TrainingExample.__table__


def _seed(url: str, n_old: int, n_new: int) -> list[dict[str, object]]:
    """``n_old`` logs 100+ days old (some with PII, some corrected) and ``n_new`` recent ones."""
    rows: list[dict[str, object]] = []
    for i in range(n_old + n_new):
        old = i < n_old
        created = NOW - (timedelta(days=100, minutes=i) if old else timedelta(days=10, minutes=i))
        rows.append(
            {
                "id": uuid7(),
                "user_id": uuid.uuid4(),
                "conversation_id": uuid.uuid4(),
                "message_index": i,
                "prompt": f"message {i} from user{i}@example.com about room 1204",
                "predicted_intent": "book_room" if i % 2 else "cancel",
                "confidence": 0.5 + (i % 5) / 10,
                "corrected_intent": "reschedule" if i % 3 == 0 else None,
                "was_successful": None if i % 4 == 0 else bool(i % 2),
                "model_version": "3",
                "created_at": created,
                "updated_at": created,
            }
        )
    with get_sync_engine(url).begin() as conn:
        conn.execute(insert(LOGS), rows)
    return rows


def _count(url: str, table: object) -> int:
    with get_sync_engine(url).connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def _examples(url: str) -> dict[str, dict[str, object]]:
    with get_sync_engine(url).connect() as conn:
        rows = conn.execute(select(EXAMPLES)).mappings().all()
    return {str(r["source_key"]): dict(r) for r in rows}


def test_old_rows_are_anonymised_copied_and_deleted(db_url: str) -> None:
    seeded = _seed(db_url, n_old=23, n_new=5)
    result = run_retention(db_url, now=NOW, batch_size=7)
    assert (result.copied, result.deleted, result.batches) == (23, 23, 4)
    assert result.cutoff == NOW - timedelta(days=90)
    assert _count(db_url, LOGS) == 5

    with get_sync_engine(db_url).connect() as conn:
        remaining = set(conn.execute(select(LOGS.c.id)).scalars())
    assert remaining == {r["id"] for r in seeded[23:]}

    examples = _examples(db_url)
    assert len(examples) == 23
    for row in seeded[:23]:
        copy = examples[hashlib.sha256(str(row["id"]).encode()).hexdigest()]
        i = row["message_index"]
        assert copy["prompt"] == f"message {i} from <EMAIL> about room 1204"
        corrected = row["corrected_intent"]
        assert copy["label"] == (corrected or row["predicted_intent"])
        assert copy["corrected"] is (corrected is not None)
        assert copy["source"] == "production"
        assert copy["was_successful"] == row["was_successful"]
        assert copy["model_version"] == "3"
        assert copy["confidence"] == pytest.approx(row["confidence"], abs=1e-6)
        assert copy["week"] == iso_week_monday(row["created_at"])  # type: ignore[arg-type]
        assert copy["week"].weekday() == 0  # type: ignore[union-attr]
    # No identifying column survives in the training store.
    assert not {"user_id", "conversation_id", "message_index"} & set(EXAMPLES.c.keys())


def test_nothing_to_do_is_zero(db_url: str) -> None:
    _seed(db_url, n_old=0, n_new=4)
    result = run_retention(db_url, now=NOW, batch_size=3)
    assert (result.copied, result.deleted, result.batches) == (0, 0, 0)
    assert _count(db_url, LOGS) == 4


def test_retention_days_is_a_parameter(db_url: str) -> None:
    _seed(db_url, n_old=3, n_new=4)  # new ones are 10 days old
    result = run_retention(db_url, retention_days=7, clock=lambda: NOW)
    assert (result.copied, result.deleted) == (7, 7)
    assert _count(db_url, LOGS) == 0


class SimulatedCrash(RuntimeError):
    pass


def test_crash_between_batches_then_rerun_loses_and_duplicates_nothing(db_url: str) -> None:
    seeded = _seed(db_url, n_old=25, n_new=3)
    committed: list[int] = []

    def crash_in_third_batch(batch: int) -> None:
        if batch == 3:
            raise SimulatedCrash("killed before batch 3 committed")
        committed.append(batch)

    with pytest.raises(SimulatedCrash):
        run_retention(db_url, now=NOW, batch_size=5, before_commit=crash_in_third_batch)
    assert committed == [1, 2]
    # Batches 1 and 2 are done; batch 3's copy and delete were both rolled back.
    assert _count(db_url, EXAMPLES) == 10
    assert _count(db_url, LOGS) == 28 - 10

    result = run_retention(db_url, now=NOW, batch_size=5)
    assert (result.copied, result.deleted, result.batches) == (15, 15, 3)
    examples = _examples(db_url)
    assert len(examples) == 25 == _count(db_url, EXAMPLES)
    assert set(examples) == {source_key(r["id"]) for r in seeded[:25]}  # type: ignore[arg-type]
    assert _count(db_url, LOGS) == 3

    again = run_retention(db_url, now=NOW, batch_size=5)
    assert (again.copied, again.deleted, again.batches) == (0, 0, 0)


def test_existing_copy_is_not_duplicated(db_url: str) -> None:
    seeded = _seed(db_url, n_old=6, n_new=0)
    first = seeded[0]
    with get_sync_engine(db_url).begin() as conn:
        conn.execute(
            insert(EXAMPLES).values(
                id=uuid7(),
                source_key=source_key(first["id"]),  # type: ignore[arg-type]
                prompt="copied by an earlier run",
                label="cancel",
                source="production",
                corrected=False,
                week=date(2026, 8, 17),
            )
        )
    result = run_retention(db_url, now=NOW, batch_size=4)
    assert (result.copied, result.deleted, result.batches) == (5, 6, 2)
    examples = _examples(db_url)
    assert len(examples) == 6
    assert examples[source_key(first["id"])]["prompt"] == "copied by an earlier run"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retention_days": 0}, "retention_days: expected a positive number"),
        ({"retention_days": -3}, "retention_days: expected a positive number"),
        ({"batch_size": 0}, "batch_size: expected a positive integer"),
    ],
)
def test_bad_parameters_are_refused(sqlite_url: str, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_retention(sqlite_url, now=NOW, **kwargs)  # type: ignore[arg-type]


def test_naive_now_is_refused(sqlite_url: str) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        run_retention(sqlite_url, now=datetime(2026, 11, 26))


def test_iso_week_monday() -> None:
    assert iso_week_monday(datetime(2026, 11, 26, 23, 0, tzinfo=UTC)) == date(2026, 11, 23)
    assert iso_week_monday(datetime(2026, 11, 23, 0, 0, tzinfo=UTC)) == date(2026, 11, 23)
    assert iso_week_monday(datetime(2026, 11, 22, 23, 59, tzinfo=UTC)) == date(2026, 11, 16)


def test_retention_flow(prefect_harness: None, db_url: str) -> None:
    _seed(db_url, n_old=4, n_new=2)
    result = retention_flow(database_url=db_url, now=NOW, batch_size=3)
    # PostgreSQL also creates partitions ahead of NOW (how many depends on earlier tests).
    assert {k: result[k] for k in ("cutoff", "copied", "deleted", "batches")} == {
        "cutoff": (NOW - timedelta(days=90)).isoformat(),
        "copied": 4,
        "deleted": 4,
        "batches": 2,
    }
    assert result["partitions_dropped"] == 0
    assert _count(db_url, LOGS) == 2
    assert _count(db_url, EXAMPLES) == 4


def test_retention_cli(sqlite_url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from deployments.cli import app

    with get_sync_engine(sqlite_url).begin() as conn:
        conn.execute(LOGS.delete())
        conn.execute(EXAMPLES.delete())
    _seed(sqlite_url, n_old=3, n_new=2)
    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["retention", "--now", NOW.isoformat(), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "cutoff": "2026-08-28T12:00:00+00:00",
        "copied": 3,
        "deleted": 3,
        "batches": 2,
        "partitions_dropped": 0,
        "partitions_created": 0,
        "moved_from_default": 0,
        "shadow_deleted": 0,
    }
    bad = CliRunner().invoke(app, ["retention", "--days", "0"])
    assert bad.exit_code == 2
    assert "retention_days: expected a positive number" in bad.output


@pytest.mark.postgres
def test_retention_as_the_pipeline_role_under_row_level_security(
    postgres_server_url: str, postgres_url: str
) -> None:
    """The flows log in as a member of prompt_capture_pipeline (not a superuser: RLS applies)
    and still move every user's rows."""
    import psycopg

    with get_sync_engine(postgres_url).begin() as conn:
        conn.execute(LOGS.delete())
        conn.execute(EXAMPLES.delete())
    _seed(postgres_url, n_old=9, n_new=2)  # nine different users
    role = f"pc_test_retention_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE prompt_capture_pipeline")
    url = postgres_url.replace("://postgres@", f"://{role}@", 1)
    try:
        with get_sync_engine(url).connect() as conn:
            bypass = conn.exec_driver_sql(
                "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"
            ).scalar_one()
        assert bypass is False
        result = run_retention(url, now=NOW, batch_size=4)
    finally:
        get_sync_engine(url).dispose()
        with psycopg.connect(postgres_server_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {role}")
    assert (result.copied, result.deleted, result.batches) == (9, 9, 3)
    assert _count(postgres_url, LOGS) == 2
    assert _count(postgres_url, EXAMPLES) == 9


def test_shadow_predictions_expire_with_their_logs(db_url: str) -> None:
    """Production A/B (migration 0008): shadow rows of logs older than the cutoff are deleted,
    those of kept logs stay, and so do the logs' own counts."""
    from sqlalchemy import text

    from capture.shadow import SHADOW_TABLE, shadow_predictions

    seeded = _seed(db_url, n_old=7, n_new=3)
    shadow = [
        {
            "log_id": row["id"],
            "log_created_at": row["created_at"],
            "candidate_version": version,
            "champion_version": "3",
            "predicted_intent": "cancel",
            "confidence": 0.5,
            "predicted_at": row["created_at"],
        }
        for row in seeded
        for version in ("4", "5")  # two candidates shadowed each prompt
    ]
    # A shadow row whose log is already gone (no foreign key): expires all the same.
    orphan = {**shadow[0], "log_id": uuid7(), "candidate_version": "4"}
    with get_sync_engine(db_url).begin() as conn:
        conn.execute(text(f"DELETE FROM {SHADOW_TABLE}"))
        conn.execute(insert(shadow_predictions), [*shadow, orphan])
    result = run_retention(db_url, now=NOW, batch_size=3)
    assert (result.deleted, result.shadow_deleted) == (7, 7 * 2 + 1)
    assert result.as_dict()["shadow_deleted"] == 15
    with get_sync_engine(db_url).connect() as conn:
        kept = conn.execute(select(shadow_predictions.c.log_id)).scalars().all()
    assert sorted(map(str, kept)) == sorted(str(r["id"]) for r in seeded[7:] for _ in (4, 5))
    again = run_retention(db_url, now=NOW, batch_size=3)
    assert again.shadow_deleted == 0 and _count(db_url, shadow_predictions) == 6
