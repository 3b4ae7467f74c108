"""What a flow run works with, resolved once at the flow's entry: its home and its database.

Every flow takes ``home``, ``database_url`` and ``database_secret`` (all optional) and calls
:func:`resolve_run_settings` with the process settings (``capture.settings.get_settings()``,
read there and nowhere below). Tasks then receive plain values: paths from
:attr:`RunSettings.layout`, the URL from :attr:`RunSettings.database_url`.

A flow's parameters are stored by the Prefect API and shown in the UI, so a database URL that
carries a password never travels as one: ``database_url`` is refused when it holds a password
(:class:`DatabaseSettingError`); such a URL comes from the environment
(``PROMPT_CAPTURE_DATABASE_URL``) or from a Prefect ``Secret`` block named by
``database_secret``. A flow hands its subflows the same two parameters it received, never the
resolved URL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from capture.errors import UserError
from capture.settings import Settings, normalise_database_url
from tasks.layout import HomeLayout
from tasks.run_logging import send_logs_to_run

logger = logging.getLogger(__name__)


class DatabaseSettingError(UserError, ValueError):
    """A database parameter a flow cannot use; the message names the parameter and the fix."""


@dataclass(frozen=True, slots=True)
class RunSettings:
    """One flow run's home layout, database URL and the process settings they came from.

    ``database_url`` may hold a password: hand it to tasks, never to a flow as a parameter.
    ``settings`` is the process settings with ``home`` and ``database_url`` set to this run's
    (what the NLU service and the capture logger read).
    """

    layout: HomeLayout
    database_url: str
    settings: Settings

    def require_database(self) -> str:
        """:attr:`database_url` once its schema is the one this code needs; raises
        :class:`capture.db.DatabaseNotMigratedError` (a ``UserError`` naming ``prompt-capture
        db upgrade``; the flow fails once, nothing is retried) otherwise. Called by every flow
        that reads the database, at its entry."""
        from capture import db

        return db.require_migrated(self.database_url)

    def require_registry(self) -> Path:
        """The home's registry folder (``models/``), or :class:`tasks.layout.HomeNotSetUpError`
        (a ``UserError`` naming the home and the fix) when the home holds none: called at the
        entry of every flow that reads or changes the registry, so a worker whose
        PROMPT_CAPTURE_HOME is unset or not the shared one fails at once instead of starting a
        new, empty registry (:meth:`tasks.layout.HomeLayout.require_registry`)."""
        return self.layout.require_registry()


def has_password(url: str) -> bool:
    """True when the SQLAlchemy URL ``url`` carries a password (``user:secret@host``)."""
    try:
        return bool(make_url(url).password)
    except ArgumentError:
        return False


def redacted(url: str) -> str:
    """``url`` with its password masked, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable database URL>"


def check_parameter_url(url: str, *, parameter: str = "database_url") -> str:
    """Return ``url`` when it may be a run parameter (no password); else raise
    :class:`DatabaseSettingError` naming the fix."""
    if has_password(url):
        raise DatabaseSettingError(
            f"{parameter}: {redacted(url)} carries a password, and flow parameters are stored "
            "in the Prefect API; put the URL in a Prefect Secret block and pass its name as "
            "database_secret, or set PROMPT_CAPTURE_DATABASE_URL in the environment that runs "
            "the flow"
        )
    return url


def secret_database_url(name: str) -> str:
    """The URL held by the Prefect ``Secret`` block ``name`` (:class:`DatabaseSettingError`
    when there is no such block or it holds no string)."""
    from prefect.blocks.system import Secret

    try:
        block: Any = Secret.load(name)
    except ValueError as exc:
        raise DatabaseSettingError(
            f"database_secret: no Prefect Secret block named {name!r} ({exc}); create it "
            "(`Secret(value=URL).save(NAME)` or in the UI: Blocks -> Secret)"
        ) from None
    value = block.get()
    if not isinstance(value, str) or not value.strip():
        raise DatabaseSettingError(
            f"database_secret: the Secret block {name!r} holds {type(value).__name__}, expected "
            "a database URL string"
        )
    return value.strip()


def configured_database_url(
    settings: Settings, *, database_url: str | None = None, database_secret: str | None = None
) -> str | None:
    """The database named by the parameters or the environment, normalised; None when nothing
    names one (the caller then uses its home's SQLite file).

    Order: ``database_url`` (refused when it carries a password), ``database_secret``, then
    ``settings.database_url`` (``PROMPT_CAPTURE_DATABASE_URL``).
    """
    if database_url and database_secret:
        raise DatabaseSettingError(
            "database_url and database_secret: expected at most one of them, found both"
        )
    if database_url:
        return normalise_database_url(check_parameter_url(database_url))
    if database_secret:
        return normalise_database_url(secret_database_url(database_secret))
    return settings.database_url or None


def resolve_run_settings(
    settings: Settings,
    *,
    home: str | Path | None = None,
    database_url: str | None = None,
    database_secret: str | None = None,
) -> RunSettings:
    """A flow's :class:`RunSettings` from its parameters, defaulting to ``settings`` (the
    environment): ``home`` or ``settings.home``; the database from
    :func:`configured_database_url`, else the home's SQLite file. Sends the run's ``tasks.*``
    and ``capture.*`` log lines to the run (:func:`tasks.run_logging.send_logs_to_run`)."""
    send_logs_to_run()
    layout = HomeLayout(Path(home) if home else settings.home)
    configured = configured_database_url(
        settings, database_url=database_url, database_secret=database_secret
    )
    url = configured or layout.sqlite_url
    return RunSettings(layout=layout, database_url=url, settings=settings.for_run(layout.home, url))
