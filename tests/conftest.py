"""Shared fixtures: real databases (SQLite files and the running PostgreSQL), never mocks.

PostgreSQL: each test session creates its own database on the server named by
``PROMPT_CAPTURE_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``),
migrates it, and drops it at the end. When the server is unreachable the Postgres tests are
skipped locally, and FAIL when ``CI`` or ``PROMPT_CAPTURE_REQUIRE_POSTGRES`` is set.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from capture import db
from capture.settings import get_settings

if TYPE_CHECKING:
    from tasks.corrections import ImportResult
    from tests.cycle_helpers import Importer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
TABLES_TO_CLEAN = (
    "nlu_prompt_logs",
    "nlu_training_examples",
    "monitor_hours",
    "monitor_alerts",
    "monitor_markers",
)


def _require_postgres() -> bool:
    return bool(os.environ.get("PROMPT_CAPTURE_REQUIRE_POSTGRES")) or (
        os.environ.get("CI", "").lower() in {"1", "true", "yes"}
    )


def _server_url() -> str:
    return os.environ.get("PROMPT_CAPTURE_TEST_POSTGRES_URL", DEFAULT_PG)


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    url = db.libpq_url(_server_url())
    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL at {url} is unreachable ({exc})"
        if _require_postgres():
            pytest.fail(message + "; CI requires it: start it (see .ci/run)", pytrace=False)
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session."""
    from tests.capture_helpers import scratch_database

    with scratch_database(postgres_server_url, "pc_test", migrated=True) as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite file for this test session."""
    path = tmp_path_factory.mktemp("sqlite") / "prompt_capture.db"
    url = f"sqlite:///{path}"
    db.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test runs on both databases, starting from empty tables."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    with db.get_sync_engine(url).begin() as conn:
        for table in TABLES_TO_CLEAN:
            conn.execute(text(f"DELETE FROM {table}"))
    return url


@pytest.fixture
async def session(db_url: str) -> AsyncIterator[AsyncSession]:
    """A session whose work is rolled back after the test (commits become savepoints)."""
    engine = db.get_engine(db_url)
    async with engine.connect() as conn:
        outer = await conn.begin()
        async with AsyncSession(
            bind=conn, expire_on_commit=False, join_transaction_mode="create_savepoint"
        ) as s:
            yield s
        await outer.rollback()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated PROMPT_CAPTURE_HOME (models, spool, exports) for one test."""
    monkeypatch.setenv("PROMPT_CAPTURE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


@pytest.fixture
def workbench_db(db_url: str) -> str:
    """``db_url`` (both databases) with the logs and the review workbench tables empty."""
    from tests.test_review_ui_support import clean_workbench_tables

    clean_workbench_tables(db_url)
    return db_url


@pytest.fixture
def three_logs(db_url: str) -> list[uuid.UUID]:
    """The corrections tests' three logged prompts (``tests.cycle_helpers.THREE_LOGS``) in
    ``db_url``'s database: their ids."""
    from tests.cycle_helpers import THREE_LOGS, insert_logs

    return insert_logs(db_url, THREE_LOGS)


@pytest.fixture
def import_rows(db_url: str, tmp_path: Path) -> Importer:
    """``import_rows(rows, **options)``: ``rows`` written as a reviewer's JSON list file (the same
    file each time) and imported into ``db_url``'s database with the corrections tests'
    ``CATALOG``; ``options`` go to ``import_corrections`` (e.g. ``allow_new_intent=True``)."""
    from tasks.corrections import import_corrections
    from tests.cycle_helpers import CATALOG, write_list

    def run(rows: list[Any], **options: Any) -> ImportResult:
        path = write_list(tmp_path / "reviewed.json", rows)
        return import_corrections(path, url=db_url, catalog=CATALOG, **options)

    return run


@pytest.fixture
def wb_home(tmp_path: Path) -> Path:
    """A home whose serving model (version 1) has the review workbench tests' labels."""
    from tests.test_review_ui_support import make_home

    return make_home(tmp_path / "home")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (and database) shared by every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "postgres" in getattr(item, "fixturenames", ()) or "postgres_url" in getattr(
            item, "fixturenames", ()
        ):
            item.add_marker(pytest.mark.postgres)
