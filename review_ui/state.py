"""What every request handler shares: settings, the database engine, the cached catalogue, the
templates and the clock (``request.app.state.workbench``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import Connection, Engine

from capture.db import get_sync_engine
from review_ui.settings import WorkbenchSettings
from tasks.review_queue import Catalog, load_catalog

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


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
        self._catalog: Catalog | None = None
        self._catalog_at = 0.0
        self._lock = threading.Lock()

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection whose work the caller commits (rolled back on error)."""
        with self.engine.connect() as conn:
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise

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
