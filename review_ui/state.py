"""What every request handler shares: settings, the database engine, the cached catalogue, the
templates and the clock (``request.app.state.workbench``)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import Connection, Engine

from capture.db import get_sync_engine, is_sqlite
from review_ui.settings import WorkbenchSettings
from tasks.review_queue import Catalog, load_catalog
from tasks.review_users import ReviewUser, get_user

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]
USER_TTL_SECONDS = 5.0


def utc_now() -> datetime:
    return datetime.now(UTC)


class Workbench:
    """The app's shared state. ``catalog()`` re-reads the catalogue at most every
    ``settings.catalog_ttl_seconds`` (a deploy or an accepted proposal shows up within that)."""

    def __init__(self, settings: WorkbenchSettings, *, clock: Clock = utc_now) -> None:
        self.settings = settings
        self.clock = clock
        self.engine: Engine = get_sync_engine(settings.database_url)
        self.templates = Environment(
            loader=PackageLoader("review_ui", "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._users: dict[uuid.UUID, tuple[ReviewUser | None, float]] = {}
        self._catalog: Catalog | None = None
        self._catalog_at = 0.0
        self._lock = threading.Lock()
        # SQLite has one writer at a time: queue this process's writers on a lock instead of
        # SQLite's busy handler (which sleeps 1, 2, 5, 10 ... ms between retries).
        self._write_lock = threading.Lock() if is_sqlite(settings.database_url) else None

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold while a request writes (SQLite: one writer of this process at a time)."""
        if self._write_lock is None:
            yield
            return
        with self._write_lock:
            yield

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection whose work the caller commits (rolled back on error)."""
        with self.engine.connect() as conn:
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise

    def user(self, user_id: uuid.UUID) -> ReviewUser | None:
        """The active user ``user_id`` (None: unknown or disabled), cached for
        ``USER_TTL_SECONDS``: disabling a user ends their sessions within that time."""
        now = time.monotonic()
        with self._lock:
            cached = self._users.get(user_id)
        if cached is not None and cached[1] > now:
            return cached[0]
        with self.engine.connect() as conn:
            found = get_user(conn, user_id)
        with self._lock:
            if len(self._users) > 10_000:
                self._users.clear()
            self._users[user_id] = (found, now + USER_TTL_SECONDS)
        return found

    def catalog(self, conn: Connection | None = None, *, fresh: bool = False) -> Catalog:
        """The intent catalogue (cached for ``catalog_ttl_seconds``)."""
        with self._lock:
            stale = time.monotonic() - self._catalog_at > self.settings.catalog_ttl_seconds
            if self._catalog is not None and not stale and not fresh:
                return self._catalog
        if conn is None:
            with self.engine.connect() as own:
                catalog = load_catalog(own, self.settings.models_dir)
        else:
            catalog = load_catalog(conn, self.settings.models_dir)
        with self._lock:
            self._catalog, self._catalog_at = catalog, time.monotonic()
        return catalog

    def render(self, name: str, **context: Any) -> str:
        return self.templates.get_template(name).render(**context)
