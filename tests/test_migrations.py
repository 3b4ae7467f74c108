"""Migrations go up and down on both databases, and the app refuses an unmigrated database."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect

from capture import db
from tests.capture_helpers import scratch_database


def _tables(url: str) -> set[str]:
    return set(inspect(db.get_sync_engine(url)).get_table_names())


def test_sqlite_upgrade_downgrade_roundtrip(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(db.DatabaseNotMigratedError, match="prompt-capture db upgrade"):
        db.ensure_migrated(url)
    db.upgrade(url)
    assert "nlu_prompt_logs" in _tables(url)
    assert db.current_revision(url) == db.head_revision()
    db.ensure_migrated(url)
    db.downgrade(url, "base")
    assert "nlu_prompt_logs" not in _tables(url)
    assert db.current_revision(url) is None
    db.upgrade(url)
    assert "nlu_prompt_logs" in _tables(url)


def test_postgres_schema_has_indexes_and_trigger(postgres_url: str) -> None:
    engine = db.get_sync_engine(postgres_url)
    indexes = {ix["name"] for ix in inspect(engine).get_indexes("nlu_prompt_logs")}
    assert {
        "ix_nlu_prompt_logs_confidence_created_at",
        "ix_nlu_prompt_logs_created_at",
        "ix_nlu_prompt_logs_user_id",
        "ix_nlu_prompt_logs_failed_created_at",
        "ix_nlu_prompt_logs_corrected_created_at",
    } <= indexes
    with engine.connect() as conn:
        triggers = (
            conn.exec_driver_sql(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'nlu_prompt_logs'::regclass"
                " AND NOT tgisinternal"
            )
            .scalars()
            .all()
        )
    assert "trg_nlu_prompt_logs_updated_at" in triggers


def test_postgres_downgrade_and_upgrade_again(postgres_server_url: str) -> None:
    with scratch_database(postgres_server_url, "pc_mig") as url:
        db.upgrade(url)
        assert "nlu_prompt_logs" in _tables(url)
        db.downgrade(url, "base")
        assert "nlu_prompt_logs" not in _tables(url)
        db.upgrade(url)
        assert db.current_revision(url) == db.head_revision()
