"""Row-level security (migration 0003) with real NON-superuser login roles.

Superusers and BYPASSRLS roles skip RLS, so every check here connects as a fresh login role
that is only a member of ``prompt_capture_app`` or ``prompt_capture_pipeline``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import pytest
from sqlalchemy import make_url, text
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from capture import db
from capture import repository as repo
from tests.capture_helpers import scratch_database

APP_ROLE = "prompt_capture_app"
PIPELINE_ROLE = "prompt_capture_pipeline"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
ALICE = uuid.UUID("00000000-0000-4000-8000-00000000a11c")
BOB = uuid.UUID("00000000-0000-4000-8000-000000000b0b")


def _as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


@dataclass
class Logins:
    app: str  # member of prompt_capture_app only
    pipeline: str  # member of prompt_capture_pipeline only
    copy_writer: str  # pipeline member with BYPASSRLS (what a COPY writer needs)


@pytest.fixture(scope="module")
def logins(postgres_url: str) -> Iterator[Logins]:
    """Random NOLOGIN-group members created for this module and dropped afterwards."""
    tag = uuid.uuid4().hex[:8]
    made = Logins(f"pc_rls_{tag}_app", f"pc_rls_{tag}_pipe", f"pc_rls_{tag}_copy")
    server = db.libpq_url(postgres_url)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {made.app} LOGIN IN ROLE {APP_ROLE}")
        conn.execute(f"CREATE ROLE {made.pipeline} LOGIN IN ROLE {PIPELINE_ROLE}")
        conn.execute(f"CREATE ROLE {made.copy_writer} LOGIN BYPASSRLS IN ROLE {PIPELINE_ROLE}")
    try:
        yield made
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            for role in (made.app, made.pipeline, made.copy_writer):
                conn.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture
async def rows(postgres_url: str) -> dict[str, uuid.UUID]:
    """Two of Alice's rows, one of Bob's, one anonymous; written by the (superuser) owner."""
    with db.get_sync_engine(postgres_url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
    owner = repo.NLURepository(db.get_engine(postgres_url), clock=lambda: NOW)
    return {
        "alice1": await owner.log_prompt("alice one", "greet", 0.4, user_id=ALICE),
        "alice2": await owner.log_prompt("alice two", "weather", 0.9, user_id=ALICE),
        "bob": await owner.log_prompt("bob one", "greet", 0.3, user_id=BOB),
        "anon": await owner.log_prompt("nobody", "greet", 0.2),
    }


@pytest.fixture
async def engines(postgres_url: str, logins: Logins) -> AsyncIterator[dict[str, AsyncEngine]]:
    made = {
        name: create_async_engine(_as_role(postgres_url, role), poolclass=NullPool)
        for name, role in (("app", logins.app), ("pipeline", logins.pipeline))
    }
    yield made
    for engine in made.values():
        await engine.dispose()


def _is_superuser(url: str, role: str) -> bool:
    with psycopg.connect(db.libpq_url(url)) as conn:
        row = conn.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s",
                           (role,)).fetchone()  # fmt: skip
    assert row is not None
    return bool(row[0] or row[1])


def _stored_outcome(url: str, log_id: uuid.UUID) -> bool | None:
    with db.get_sync_engine(url).connect() as conn:
        value = conn.execute(
            text("SELECT was_successful FROM nlu_prompt_logs WHERE id = :i"), {"i": log_id}
        ).scalar_one()
    return None if value is None else bool(value)


async def test_app_role_reads_and_changes_only_the_scoped_users_rows(
    postgres_url: str, logins: Logins, rows: dict[str, uuid.UUID], engines: dict[str, AsyncEngine]
) -> None:
    assert not _is_superuser(postgres_url, logins.app)
    async with engines["app"].connect() as conn:
        # No scope: nothing is visible.
        assert (await conn.execute(text("SELECT count(*) FROM nlu_prompt_logs"))).scalar() == 0
        await conn.rollback()

        # Alice's scope, and SQL without any user filter: only her rows exist.
        await conn.execute(text("SELECT set_config('app.user_id', :u, true)"), {"u": str(ALICE)})
        seen = set((await conn.execute(text("SELECT id FROM nlu_prompt_logs"))).scalars())
        assert seen == {rows["alice1"], rows["alice2"]}
        bobs = await conn.execute(
            text("SELECT count(*) FROM nlu_prompt_logs WHERE user_id = :b"), {"b": BOB}
        )
        assert bobs.scalar() == 0
        update_bob = await conn.execute(
            text("UPDATE nlu_prompt_logs SET was_successful = true WHERE id = :i"),
            {"i": rows["bob"]},
        )
        assert update_bob.rowcount == 0
        update_all = await conn.execute(text("UPDATE nlu_prompt_logs SET workflow_type = 'x'"))
        assert update_all.rowcount == 2
        await conn.rollback()

        # The scope is transaction-local: the next transaction sees nothing again.
        assert (await conn.execute(text("SELECT count(*) FROM nlu_prompt_logs"))).scalar() == 0
        await conn.rollback()

        # Alice cannot write a row that belongs to Bob.
        await conn.execute(text("SELECT set_config('app.user_id', :u, true)"), {"u": str(ALICE)})
        with pytest.raises(ProgrammingError, match="row-level security"):
            await conn.execute(
                text(
                    "INSERT INTO nlu_prompt_logs (id, user_id, prompt, predicted_intent, "
                    "confidence) VALUES (:i, :u, 'forged', 'greet', 0.5)"
                ),
                {"i": uuid.uuid4(), "u": BOB},
            )
        await conn.rollback()
    assert _stored_outcome(postgres_url, rows["bob"]) is None


async def test_repository_user_calls_through_the_app_role(
    postgres_url: str, rows: dict[str, uuid.UUID], engines: dict[str, AsyncEngine]
) -> None:
    app = repo.NLURepository(engines["app"], clock=lambda: NOW)
    assert {r.id for r in await app.get_user_prompts(ALICE)} == {rows["alice1"], rows["alice2"]}
    assert await app.get_user_prompts(uuid.uuid4()) == []
    # Unscoped reads return nothing for the app role.
    assert await app.get_low_confidence_prompts() == []

    with pytest.raises(repo.UnknownLogIdError):
        await app.update_prompt_log_outcome(rows["bob"], True, "wf", user_id=ALICE)
    with pytest.raises(repo.UnknownLogIdError):  # no scope at all
        await app.update_prompt_log_outcome(rows["bob"], True, "wf")
    assert _stored_outcome(postgres_url, rows["bob"]) is None

    await app.update_prompt_log_outcome(rows["alice1"], False, "wf", "boom", user_id=ALICE)
    assert _stored_outcome(postgres_url, rows["alice1"]) is False
    new_id = await app.log_prompt("alice three", "greet", 0.5, user_id=ALICE)
    assert [r.id for r in await app.get_user_prompts(ALICE, 1)] == [new_id]
    # A row without a user cannot be written by the app role (it would be invisible to all).
    with pytest.raises(DBAPIError, match="row-level security"):
        await app.log_prompt("anonymous", "greet", 0.5)


async def test_pipeline_role_reads_and_writes_every_row(
    postgres_url: str, logins: Logins, rows: dict[str, uuid.UUID], engines: dict[str, AsyncEngine]
) -> None:
    assert not _is_superuser(postgres_url, logins.pipeline)
    pipeline = repo.NLURepository(engines["pipeline"], clock=lambda: NOW)
    low = await pipeline.get_low_confidence_prompts()
    assert [r.id for r in low] == [rows["anon"], rows["bob"], rows["alice1"]]
    await pipeline.update_prompt_log_outcome(rows["bob"], False, "wf")
    await pipeline.add_prompt_correction(rows["alice1"], "small_talk")
    assert _stored_outcome(postgres_url, rows["bob"]) is False
    other = await pipeline.log_prompt("flow-made", "greet", 0.99, user_id=BOB)
    assert {r.id for r in await pipeline.get_user_prompts(BOB)} == {rows["bob"], other}
    # The migration check works for the pipeline role (SELECT on alembic_version).
    db.ensure_migrated(_as_role(postgres_url, logins.pipeline))
    db.clear_engine_cache()


def test_copy_needs_a_role_that_bypasses_rls(postgres_url: str, logins: Logins) -> None:
    """PostgreSQL refuses COPY FROM into an RLS table for roles RLS applies to; the bulk writer
    needs a BYPASSRLS login (or falls back to INSERT)."""
    columns = "(id, user_id, prompt, predicted_intent, confidence)"
    with psycopg.connect(db.libpq_url(_as_role(postgres_url, logins.pipeline))) as conn:
        with (
            pytest.raises(psycopg.errors.FeatureNotSupported, match="row-level security"),
            conn.cursor().copy(f"COPY nlu_prompt_logs {columns} FROM STDIN") as copy,
        ):
            copy.write_row((uuid.uuid4(), BOB, "copied", "greet", 0.5))
        conn.rollback()
    written = uuid.uuid4()
    with psycopg.connect(db.libpq_url(_as_role(postgres_url, logins.copy_writer))) as conn:
        with conn.cursor().copy(f"COPY nlu_prompt_logs {columns} FROM STDIN") as copy:
            copy.write_row((written, BOB, "copied", "greet", 0.5))
        conn.commit()
    with db.get_sync_engine(postgres_url).begin() as conn:
        assert (
            conn.execute(text("DELETE FROM nlu_prompt_logs WHERE id = :i"), {"i": written}).rowcount
            == 1
        )


def test_forced_rls_keeps_a_non_superuser_owner_working(postgres_server_url: str) -> None:
    """FORCE applies RLS to the table owner; its policy gives every row unless it scopes itself."""
    owner = f"pc_rls_{uuid.uuid4().hex[:8]}_owner"
    with psycopg.connect(postgres_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {owner} LOGIN CREATEROLE")
    try:
        with scratch_database(postgres_server_url, "pc_rls_owner") as url:
            with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
                conn.execute(f"GRANT CREATE ON SCHEMA public TO {owner}")
            owner_url = _as_role(url, owner)
            db.upgrade(owner_url)
            with psycopg.connect(db.libpq_url(owner_url)) as conn:
                relowner = conn.execute(
                    "SELECT pg_get_userbyid(relowner), relforcerowsecurity FROM pg_class "
                    "WHERE oid = 'nlu_prompt_logs'::regclass"
                ).fetchone()
                assert relowner == (owner, True)
                for uid in (ALICE, BOB):
                    conn.execute(
                        "INSERT INTO nlu_prompt_logs (id, user_id, prompt, predicted_intent, "
                        "confidence) VALUES (%s, %s, 'p', 'greet', 0.5)",
                        (uuid.uuid4(), uid),
                    )
                assert conn.execute("SELECT count(*) FROM nlu_prompt_logs").fetchone() == (2,)
                conn.execute("SELECT set_config('app.user_id', %s, true)", (str(ALICE),))
                assert conn.execute("SELECT count(*) FROM nlu_prompt_logs").fetchone() == (1,)
                conn.commit()
                with (
                    pytest.raises(psycopg.errors.FeatureNotSupported),
                    conn.cursor().copy("COPY nlu_prompt_logs (prompt) FROM STDIN") as copy,
                ):
                    copy.write_row(("x",))
                conn.rollback()
            db.downgrade(owner_url, "0002")
            with psycopg.connect(db.libpq_url(owner_url)) as conn:
                assert conn.execute(
                    "SELECT relrowsecurity, relforcerowsecurity FROM pg_class "
                    "WHERE oid = 'nlu_prompt_logs'::regclass"
                ).fetchone() == (False, False)
                assert conn.execute("SELECT count(*) FROM pg_policy").fetchone() == (0,)
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {owner}")
