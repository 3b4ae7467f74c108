"""The spool knows its database (issue 13 case 9): segments name the database they were written
for, a start replays only its own database's, and ``prompt-capture spool`` lists, replays (into
an explicitly named database) and discards the rest. Spool files are private (0600 in 0700).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import typer
from typer.testing import CliRunner, Result

from capture import db
from capture.db_identity import DatabaseIdentity, fetch_identity, identity_from_url, normalised_url
from capture.ids import uuid7
from capture.rows import Outcome
from capture.settings import get_settings
from capture.spool import (
    INSERT,
    OUTCOME,
    REJECTED_FILE,
    UNKNOWN_KEY,
    Spool,
    SpoolError,
    append_rejected,
    encode_op,
    list_spool,
    make_op,
    new_row,
    read_header,
    replay_spool,
    wire_row,
)
from deployments import spool_commands
from deployments.cli import UserErrorGroup
from tests.capture_helpers import (
    count_rows,
    fetch_rows,
    fixed_service,
)

T0 = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)


def _ops(count: int, *, start: datetime = T0, seq: int = 1) -> tuple[list, list[uuid.UUID]]:
    """``count`` inserts (one minute apart) and an outcome for the first one."""
    ids = [uuid7() for _ in range(count)]
    ops = [
        make_op(
            INSERT,
            seq + i,
            wire_row(
                new_row(
                    log_id=log_id,
                    user_id=None,
                    prompt=f"spooled {i}",
                    predicted_intent="weather",
                    confidence=0.5,
                    secondary_intents=(("news", 0.25),),
                    conversation_id=None,
                    message_index=i,
                    model_version="v1",
                    created_at=start + timedelta(minutes=i),
                )
            ),
        )
        for i, log_id in enumerate(ids)
    ]
    ops.append(make_op(OUTCOME, seq + count, Outcome(ids[0], True, "wf", None, start)))
    return ops, ids


def _leave_segment(directory: Path, identity: DatabaseIdentity, count: int) -> list[uuid.UUID]:
    """What a process stopped while its database was down leaves: one closed segment."""
    spool = Spool(directory, identity=identity)
    ops, ids = _ops(count)
    spool.write_segment(ops)
    assert spool.close()  # released, left in place
    return ids


def _segments(home: Path) -> list[Path]:
    spool = home / "spool"
    return sorted(spool.glob("*.jsonl")) if spool.is_dir() else []


def _migrated_sqlite(path: Path) -> str:
    url = f"sqlite:///{path}"
    db.upgrade(url)
    return url


async def _start_and_stop(url: str, home: Path) -> tuple[int, list[str]]:
    """Start a service on ``url`` with ``home``, log one prompt, flush, close: (replayed,
    the warnings the logger logged)."""
    handler = _Records()
    logging.getLogger("capture.logger").addHandler(handler)
    try:
        service = fixed_service(url, home)
        await service.process_message("a prompt of this database")
        await service.flush(timeout=60)
        replayed = service.stats().replayed
        await service.aclose()
    finally:
        logging.getLogger("capture.logger").removeHandler(handler)
    return replayed, [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# --------------------------------------------------------------------------- identities


def test_the_url_hash_ignores_password_user_and_options() -> None:
    base = normalised_url("postgresql+psycopg://app:secret@DB.example:5432/prod")
    assert base == "postgresql://db.example:5432/prod"
    for same in (
        "postgresql://other:pw@db.example/prod?application_name=x&sslmode=require",
        "postgres://db.example:5432/prod",
    ):
        assert normalised_url(same) == base
    assert normalised_url("postgresql://db.example/staging") != base
    assert normalised_url("postgresql://db.example:5433/prod") != base
    identity = identity_from_url("postgresql://app:secret@db.example/prod")
    assert "secret" not in json.dumps(identity.as_record())
    assert identity.url == "postgresql+psycopg://app@db.example/prod"


def test_identities_match_on_the_server_facts_when_both_have_them(tmp_path: Path) -> None:
    a = identity_from_url("postgresql://127.0.0.1/prod")
    alias = identity_from_url("postgresql://localhost/prod")
    assert a.matches(a) and not a.matches(alias)  # URL only: the URL decides
    full_a = replace(a, system_identifier="7", database="prod")
    full_alias = replace(alias, system_identifier="7", database="prod")
    assert full_a.matches(full_alias)  # another name of the same database
    moved = replace(a, system_identifier="8", database="prod")
    assert not full_a.matches(moved)  # the same URL now reaches another cluster
    assert full_a.matches(a) and a.matches(full_a)  # written before the server was reached
    assert DatabaseIdentity.from_record(full_a.as_record()) == full_a
    assert full_a.key != a.key and len(full_a.key) == 12
    first = identity_from_url(f"sqlite:///{tmp_path / 'a.db'}")
    assert first.path == str((tmp_path / "a.db").resolve())
    relative = identity_from_url(f"sqlite:///{os.path.relpath(tmp_path / 'a.db')}")
    assert first.matches(relative)
    assert not first.matches(identity_from_url(f"sqlite:///{tmp_path / 'b.db'}"))
    assert not first.matches(a)


async def test_fetch_identity_reads_the_server(postgres_url: str) -> None:
    identity = await fetch_identity(postgres_url)
    assert identity.system_identifier is not None and identity.system_identifier.isdigit()
    assert identity.database == postgres_url.rpartition("/")[2]
    assert identity.server_known and identity.matches(identity_from_url(postgres_url))


async def test_segments_record_the_database_of_their_logger(db_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    service = fixed_service(db_url, home, durability="spool")
    await service.process_message("journaled before the writer reached the database")
    [first] = _segments(home)
    identity, has_ops = read_header(first)
    assert has_ops and identity == identity_from_url(db_url)  # known by its URL so far
    await service.flush()
    server = await fetch_identity(db_url)
    assert identity.matches(server)
    # From now on new segments name the server (PostgreSQL: system identifier, database).
    assert service.capture.identity == service.capture.spool.identity == server
    assert server.server_known
    service.capture.spool.rotate(to_pending=False)
    await service.process_message("journaled after")
    [last] = [p for p in _segments(home) if p != first]
    assert read_header(last) == (server, True)
    await service.aclose()
    assert _segments(home) == []


# --------------------------------------------------------------------------- the case


@pytest.fixture
def two_databases(postgres_server_url: str) -> Iterator[tuple[str, str]]:
    """Two migrated PostgreSQL databases on one server (A and B)."""
    made = [db.create_database(postgres_server_url, f"pc_spool_{n}") for n in "ab"]
    try:
        for url in made:
            db.upgrade(url)
        yield made[0], made[1]
    finally:
        db.clear_engine_cache()
        for url in made:
            _allow(postgres_server_url, url, True)
            db.drop_database(postgres_server_url, url)


def _allow(server_url: str, url: str, allowed: bool, app: str | None = None) -> None:
    name = url.rpartition("/")[2]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')
        if app is not None:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                [app],
            )


async def test_rows_spooled_while_a_was_down_go_to_a_never_to_b(
    postgres_server_url: str, two_databases: tuple[str, str], tmp_path: Path
) -> None:
    """Issue 13 case 9: a service stopped while database A was down leaves a spool; started
    again on database B with the same home, it leaves A's rows where they are (one warning);
    started on A, it replays them there."""
    a, b = two_databases
    home = tmp_path / "home"
    app = f"pc-spool-a-{uuid.uuid4().hex[:8]}"

    async def no_wait(_: float) -> None:
        await asyncio.sleep(0.01)

    service = fixed_service(a, home, batch_size=100, application_name=app, sleep=no_wait)
    await service.process_message("written before the outage")
    await service.flush()
    _allow(postgres_server_url, a, False, app)  # database A goes away
    spooled = [(await service.process_message(f"for A only {i}")).log_id for i in range(300)]
    await service.aclose(timeout=0.5)
    left = _segments(home)
    assert left, "A's rows wait in the spool"
    _allow(postgres_server_url, a, True)  # A is back, but the service now starts on B

    replayed, warnings = await _start_and_stop(b, home)
    assert replayed == 0
    assert count_rows(b) == (1, 1)  # only B's own prompt
    assert set(fetch_rows(b)).isdisjoint(spooled)
    assert _segments(home) == left  # left in place
    [warning] = [w for w in warnings if "NOT replayed" in w]  # ONE warning, saying it all
    [group] = list_spool(home / "spool")
    assert group.inserts == 300 and group.identity is not None
    assert group.identity.database == a.rpartition("/")[2]
    for part in (
        "300 rows",
        f"[{group.key}]",
        f"database {a.rpartition('/')[2]}",
        f"database {b.rpartition('/')[2]}",
        "prompt-capture spool replay",
        "prompt-capture spool discard",
        "from 20",
    ):
        assert part in warning, part

    replayed, warnings = await _start_and_stop(a, home)
    assert replayed == 300 and not [w for w in warnings if "NOT replayed" in w]
    assert count_rows(a) == (302, 302)
    assert set(spooled) <= set(fetch_rows(a))
    assert _segments(home) == []


async def test_a_segment_for_another_database_stays_until_its_database_starts(
    db_url: str, tmp_path: Path
) -> None:
    """The same on both databases, with the leftover segment written directly: B is another
    SQLite file (a different path), A is the session's SQLite or PostgreSQL database."""
    home = tmp_path / "home"
    other = _migrated_sqlite(tmp_path / "other.db")
    ids = _leave_segment(home / "spool", await fetch_identity(db_url), 5)

    replayed, warnings = await _start_and_stop(other, home)
    assert replayed == 0 and count_rows(other) == (1, 1)
    assert len([w for w in warnings if "NOT replayed" in w]) == 1
    assert len(_segments(home)) == 1

    replayed, _ = await _start_and_stop(db_url, home)
    assert replayed == 6  # five rows and an outcome
    rows = fetch_rows(db_url, ids)
    assert sorted(r["prompt"] for r in rows.values()) == [f"spooled {i}" for i in range(5)]
    assert rows[ids[0]]["workflow_type"] == "wf"
    assert _segments(home) == []


async def test_old_segments_without_a_database_are_replayed_only_when_asked(
    db_url: str, tmp_path: Path
) -> None:
    """Spool format 1/2 (no database line): never replayed automatically; ``spool replay
    unknown --force`` writes them into the database named."""
    home = tmp_path / "home"
    spool = home / "spool"
    spool.mkdir(parents=True)
    ops, ids = _ops(3)
    legacy = spool / f"{uuid7().hex}-4242-{1:012d}.jsonl"
    legacy.write_bytes(b"".join(encode_op(op) for op in ops))

    replayed, warnings = await _start_and_stop(db_url, home)
    assert replayed == 0 and set(fetch_rows(db_url)).isdisjoint(ids)
    [warning] = [w for w in warnings if "NOT replayed" in w]
    assert "[unknown] 3 rows" in warning and "only with --force" in warning
    [group] = list_spool(spool)
    assert (group.key, group.identity, group.inserts, group.updates) == (UNKNOWN_KEY, None, 3, 1)

    with pytest.raises(SpoolError, match=r"cannot be checked against .*--force"):
        await replay_spool(spool, UNKNOWN_KEY, db_url)
    done = await replay_spool(spool, UNKNOWN_KEY, db_url, force=True)
    assert (done.segments, done.applied, done.rejected) == (1, 4, 0)
    assert set(ids) <= set(fetch_rows(db_url)) and list_spool(spool) == []


# --------------------------------------------------------------------------- the typed API


async def test_replay_refuses_another_database_unless_forced(db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "home" / "spool"
    other = _migrated_sqlite(tmp_path / "other.db")
    ids = _leave_segment(spool, await fetch_identity(db_url), 4)
    [group] = list_spool(spool)
    assert (group.inserts, group.updates, group.in_use) == (4, 1, 0)
    assert (group.first_at, group.last_at) == (T0, T0 + timedelta(minutes=3))

    with pytest.raises(SpoolError, match=r"not a spool group .*groups: " + group.key):
        await replay_spool(spool, "nope", db_url)
    with pytest.raises(SpoolError, match=r"was written for .*pass that database's URL"):
        await replay_spool(spool, group.key, other)
    unmigrated = f"sqlite:///{tmp_path / 'unmigrated.db'}"
    with pytest.raises(db.DatabaseNotMigratedError, match="prompt-capture db upgrade"):
        await replay_spool(spool, group.key, unmigrated, force=True)
    assert count_rows(other) == (0, 0)

    done = await replay_spool(spool, group.key[:6], db_url)  # a unique prefix will do
    assert (done.key, done.segments, done.applied, done.rejected, done.in_use) == (
        group.key,
        1,
        5,
        0,
        (),
    )
    assert set(ids) <= set(fetch_rows(db_url))
    # Forced into another database: the operator's explicit choice.
    _leave_segment(spool, await fetch_identity(db_url), 2)
    [group] = list_spool(spool)
    done = await replay_spool(spool, group.key, other, force=True)
    assert done.applied == 3 and count_rows(other) == (2, 2)


def test_a_live_process_s_segment_is_neither_replayed_nor_discarded(tmp_path: Path) -> None:
    from capture.spool import discard_spool

    spool_dir = tmp_path / "spool"
    live = Spool(spool_dir, identity=identity_from_url(f"sqlite:///{tmp_path / 'a.db'}"))
    ops, _ = _ops(2)
    for op in ops:
        live.append(op)
    [group] = list_spool(spool_dir)
    assert group.in_use == 1
    done = discard_spool(spool_dir, group.key)
    assert (done.segments, len(done.in_use)) == (0, 1)
    assert len(list(spool_dir.glob("*.jsonl"))) == 1
    live.close()


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[CliRunner, typer.Typer]]:
    """The ``spool`` commands under an app with the real one-line error handler, with
    PROMPT_CAPTURE_HOME set to ``tmp_path/home``."""
    app = typer.Typer(cls=UserErrorGroup)

    @app.callback()
    def _root() -> None: ...

    spool_commands.register(app)
    (tmp_path / "home").mkdir()  # `spool list` refuses a home that does not exist
    monkeypatch.setenv("PROMPT_CAPTURE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", f"sqlite:///{tmp_path / 'configured.db'}")
    get_settings.cache_clear()
    yield CliRunner(), app
    get_settings.cache_clear()


def _one_line_error(result: Result, *parts: str) -> None:
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    for part in parts:
        assert part in " ".join(output.split()), part


def test_spool_commands(db_url: str, tmp_path: Path, cli: tuple[CliRunner, typer.Typer]) -> None:
    runner, app = cli
    spool = tmp_path / "home" / "spool"
    assert "is empty" in runner.invoke(app, ["spool", "list"]).output
    identity = asyncio.run(fetch_identity(db_url))
    ids = _leave_segment(spool, identity, 3)
    [group] = list_spool(spool)

    listed = runner.invoke(app, ["spool", "list"])
    assert listed.exit_code == 0, listed.output
    assert f"[{group.key}] 3 rows and 1 updates in 1 segment(s)" in listed.output
    assert "2026-10-25 00:30:00Z" in listed.output
    as_json = json.loads(runner.invoke(app, ["spool", "list", "--json"]).output)
    assert [(g["id"], g["rows"], g["updates"]) for g in as_json] == [(group.key, 3, 1)]
    assert as_json[0]["database"]["url_hash"] == identity.url_hash

    _one_line_error(
        runner.invoke(app, ["spool", "replay", "zzzz", "--database-url", db_url]),
        "'zzzz' is not a spool group",
        group.key,
    )
    other = _migrated_sqlite(tmp_path / "other.db")
    _one_line_error(
        runner.invoke(app, ["spool", "replay", group.key, "--database-url", other]),
        f"spool group {group.key} was written for",
        "--force",
    )
    _one_line_error(
        runner.invoke(app, ["spool", "discard", group.key]),
        "deletes 3 rows and 1 updates",
        "add --yes",
    )
    replayed = runner.invoke(app, ["spool", "replay", group.key, "--database-url", db_url])
    assert replayed.exit_code == 0, replayed.output
    assert "1 segment(s), 4 operations applied, 0 rejected" in replayed.output
    assert set(ids) <= set(fetch_rows(db_url)) and list_spool(spool) == []

    _leave_segment(spool, identity, 2)
    [group] = list_spool(spool)
    discarded = runner.invoke(app, ["spool", "discard", group.key, "--yes"])
    assert discarded.exit_code == 0, discarded.output
    assert "2 rows and 1 updates deleted" in discarded.output
    assert list_spool(spool) == []


# --------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o277])
def test_spool_files_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    home = tmp_path / "home"
    spool_dir = home / "spool"
    spool_dir.mkdir(parents=True, mode=0o755)  # an older version's folder
    os.chmod(spool_dir, 0o755)
    previous = os.umask(umask)
    try:
        spool = Spool(spool_dir, identity=identity_from_url(f"sqlite:///{tmp_path / 'a.db'}"))
        ops, _ = _ops(2)
        journal = spool.append(ops[0])
        closed = spool.write_segment(ops[1:])
        append_rejected(home / REJECTED_FILE, "test", op=ops[0])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    for path in (journal.path, closed.path, home / REJECTED_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    spool.close()
    # An older rejected.jsonl made with the umask is made private on the next append.
    os.chmod(home / REJECTED_FILE, 0o644)
    append_rejected(home / REJECTED_FILE, "again", raw=b"x")
    assert stat.S_IMODE((home / REJECTED_FILE).stat().st_mode) == 0o600
    assert len((home / REJECTED_FILE).read_text().splitlines()) == 2


async def test_a_service_s_spool_is_private(db_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    previous = os.umask(0o000)
    try:
        service = fixed_service(db_url, home, durability="spool")
        await service.process_message("private")
        [segment] = _segments(home)
        assert stat.S_IMODE(segment.stat().st_mode) == 0o600
        assert stat.S_IMODE((home / "spool").stat().st_mode) == 0o700
        await service.aclose()
    finally:
        os.umask(previous)
