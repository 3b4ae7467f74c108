"""Database access shared by every layer: URLs, engines (exactly one per database URL and
process), sessions, migrations and the check the app runs at start, and the creation/removal of
throw-away PostgreSQL databases (tests, the simulator, benchmarks)."""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from capture.errors import UserError
from capture.settings import get_settings, normalise_database_url

logger = logging.getLogger(__name__)

UPGRADE_COMMAND = "prompt-capture db upgrade"


class DatabaseNotMigratedError(UserError, RuntimeError):
    """The database schema is missing or older than this code expects (fix: run
    ``prompt-capture db upgrade``)."""


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def database_url(url: str | None = None) -> str:
    """The URL to use: the one given (normalised) or the one from the settings."""
    return normalise_database_url(url) if url else get_settings().resolved_database_url


def sync_url(url: str) -> str:
    """``url`` with the synchronous SQLite driver (PostgreSQL URLs unchanged)."""
    return url.replace("sqlite+aiosqlite://", "sqlite://", 1)


def async_url(url: str) -> str:
    """``url`` with the async SQLite driver (PostgreSQL URLs unchanged: psycopg does both)."""
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
    return url


def libpq_url(url: str) -> str:
    """THE conversion of a PostgreSQL URL to the form libpq / ``psycopg.connect`` take:
    ``postgresql+psycopg://`` and ``postgres://`` become ``postgresql://``; others unchanged."""
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def _prepare_sqlite_file(url: str) -> None:
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def get_engine(url: str | None = None) -> AsyncEngine:
    """The process's async engine for ``url`` (default: the settings' database, resolved now)."""
    return _cached(_async_engines, async_url(database_url(url)), _new_async_engine)


def get_sync_engine(url: str | None = None) -> Engine:
    """The process's synchronous engine for ``url`` (migrations, flows, the CLI)."""
    return _cached(_sync_engines, sync_url(database_url(url)), _new_sync_engine)


def clear_engine_cache() -> None:
    """Forget the cached engines (tests that switch databases; pooled connections are dropped)."""
    with _engines_lock:
        _async_engines.clear()
        _sync_engines.clear()


# One engine per normalised URL for the life of the process (never evicted: a second engine
# for the same database would mean a second pool).
_async_engines: dict[str, AsyncEngine] = {}
_sync_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()
_E = TypeVar("_E", AsyncEngine, Engine)


def _cached(cache: dict[str, _E], url: str, make: Callable[[str], _E]) -> _E:
    engine = cache.get(url)
    if engine is None:
        with _engines_lock:
            engine = cache.get(url)
            if engine is None:
                engine = cache[url] = make(url)
    return engine


def _new_async_engine(url: str) -> AsyncEngine:
    if is_sqlite(url):
        _prepare_sqlite_file(url)
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _new_sync_engine(url: str) -> Engine:
    if is_sqlite(url):
        _prepare_sqlite_file(url)
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def session_scope(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A short-lived session that commits on success and rolls back on error."""
    async with session_factory(engine)() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for the project's migrations, independent of the working directory."""
    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", sync_url(database_url(url)).replace("%", "%%"))
    return config


class MigrationRevisionError(UserError, ValueError):
    """Alembic refused the target revision (unknown, or the wrong direction)."""


def _migrate(direction: str, url: str | None, revision: str) -> None:
    from alembic import command
    from alembic.util import CommandError

    try:
        getattr(command, direction)(alembic_config(url), revision)
    except CommandError as exc:
        raise MigrationRevisionError(
            f"db {direction} {revision}: {exc}; pass a revision such as head, base or one "
            f"`prompt-capture db current` shows (revisions: migrations/versions/)"
        ) from None


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (:class:`MigrationRevisionError`: Alembic refused it)."""
    _migrate("upgrade", url, revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Revert migrations down to ``revision`` (:class:`MigrationRevisionError`: Alembic refused
    it)."""
    _migrate("downgrade", url, revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str | None = None) -> str | None:
    with get_sync_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def display_url(url: str) -> str:
    """``url`` without its password (for messages, logs and the spool's database identity)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
        return parsed._replace(password=None).render_as_string(hide_password=False)
    except ArgumentError:
        return url.rsplit("@", maxsplit=1)[-1]


def sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite ``url``, resolved (``None`` for ``:memory:`` or a URL
    that is not SQLite)."""
    if not is_sqlite(url):
        return None
    path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve()


def require_migrated(url: str | None = None) -> str:
    """Check that the database of ``url`` (default: the settings' database) has the schema
    this code needs, before a command or flow reads it; returns the resolved URL.

    Raises :class:`DatabaseNotMigratedError` (a ``UserError``; the CLI prints its one line and
    exits 2) when the schema is missing or older than the head revision — the message names the
    database and ``prompt-capture db upgrade`` — or newer than this code knows. An SQLite file
    that does not exist is reported as such (and not created). Connection failures propagate
    unchanged (they are I/O, see ``capture.errors.is_transient``).
    """
    resolved = database_url(url)
    shown = display_url(sync_url(resolved))
    fix = f"run `{UPGRADE_COMMAND}` (with the same PROMPT_CAPTURE_DATABASE_URL) first"
    path = sqlite_path(resolved)
    if path is not None and not path.exists():
        raise DatabaseNotMigratedError(
            f"database {shown}: the file {path} does not exist (no schema); {fix}"
        )
    current, head = current_revision(resolved), head_revision()
    if current == head:
        return resolved
    if current is None:
        raise DatabaseNotMigratedError(
            f"database {shown} has no schema (revision none), this code needs {head}; {fix}"
        )
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    if current not in {rev.revision for rev in script.walk_revisions()}:
        raise DatabaseNotMigratedError(
            f"database {shown} is at schema revision {current}, which this code does not know "
            f"(its newest is {head}): a newer prompt-capture migrated it; run that version "
            f"(`{UPGRADE_COMMAND}` cannot go back; `prompt-capture db current` shows both)"
        )
    raise DatabaseNotMigratedError(
        f"database {shown} is at schema revision {current}, this code needs {head}; {fix}"
    )


def ensure_migrated(url: str | None = None) -> None:
    """:func:`require_migrated` (the older name, kept for its callers)."""
    require_migrated(url)


# --------------------------------------------------------------------------- throw-away databases

_DATABASE_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,39}")


def create_database(server_url: str, prefix: str) -> str:
    """Create an empty PostgreSQL database ``<prefix>_<pid>_<8 hex>`` on the server of
    ``server_url`` (any URL form; it names the database to connect to for ``CREATE DATABASE``,
    e.g. ``postgres``) and return its SQLAlchemy URL (``postgresql+psycopg://``). Not migrated:
    run :func:`upgrade`. ``ValueError`` unless ``prefix`` is 1-40 of ``[a-z0-9_]``, starting
    with a letter.
    """
    import psycopg

    if not _DATABASE_PREFIX.fullmatch(prefix):
        raise ValueError(
            f"prefix: expected 1-40 characters of [a-z0-9_] starting with a letter, "
            f"found {prefix!r}"
        )
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    server = libpq_url(server_url)
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    logger.info("created database %s", name)
    return normalise_database_url(f"{server.rpartition('/')[0]}/{name}")


def drop_database(server_url: str, url: str) -> None:
    """Drop the database of ``url`` (made by :func:`create_database`), connecting through
    ``server_url``; its open connections are terminated (``WITH (FORCE)``). No error if it is
    already gone."""
    import psycopg

    name = url.rpartition("/")[2].split("?", 1)[0]
    with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    logger.info("dropped database %s", name)
