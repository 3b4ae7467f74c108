"""Engines (one per process and URL), sessions, and the migration check the app runs at start."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

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

from capture.settings import get_settings, normalise_database_url

logger = logging.getLogger(__name__)

UPGRADE_COMMAND = "prompt-capture db upgrade"


class DatabaseNotMigratedError(RuntimeError):
    """The database schema is missing or older than this code expects."""


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def database_url(url: str | None = None) -> str:
    """The URL to use: the one given (normalised) or the one from the settings."""
    return normalise_database_url(url) if url else get_settings().resolved_database_url


def sync_url(url: str) -> str:
    return url.replace("sqlite+aiosqlite://", "sqlite://", 1)


def async_url(url: str) -> str:
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
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
    return _async_engine(async_url(database_url(url)))


def get_sync_engine(url: str | None = None) -> Engine:
    """The process's synchronous engine for ``url`` (migrations, flows, the CLI)."""
    return _sync_engine(sync_url(database_url(url)))


def clear_engine_cache() -> None:
    """Forget the cached engines (tests that switch databases; pooled connections are dropped)."""
    _async_engine.cache_clear()
    _sync_engine.cache_clear()


@lru_cache(maxsize=8)
def _async_engine(url: str) -> AsyncEngine:
    if is_sqlite(url):
        _prepare_sqlite_file(url)
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


@lru_cache(maxsize=8)
def _sync_engine(url: str) -> Engine:
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


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Revert migrations down to ``revision``."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str | None = None) -> str | None:
    with get_sync_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ensure_migrated(url: str | None = None) -> None:
    """Raise :class:`DatabaseNotMigratedError` naming the fix unless the schema is at head."""
    current, head = current_revision(url), head_revision()
    if current != head:
        shown = sync_url(database_url(url)).split("@")[-1]
        raise DatabaseNotMigratedError(
            f"database {shown} is at schema revision {current or 'none'}, this code needs {head}; "
            f"run `{UPGRADE_COMMAND}` (with the same PROMPT_CAPTURE_DATABASE_URL) first"
        )
