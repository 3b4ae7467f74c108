"""What the ``prompt-capture`` command modules share: the console, the process bootstrap
(environment defaults, logging), the database check, JSON output, the options several commands
take, and the parsers of option values that are not plain types.

A bad option value raises :class:`capture.errors.UserError`; the one handler in
``deployments.cli`` turns it into one line on stderr and exit code 2. A command checks what the
user typed, and that the database is migrated, BEFORE it starts a flow: a mistake found inside
a flow run would be logged by Prefect (with its traceback) before the handler's line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from capture.errors import UserError

if TYPE_CHECKING:
    from capture.settings import Settings

console = Console()


class OptionError(UserError, ValueError):
    """A command-line option's value cannot be used; the message names the option."""


Command = TypeVar("Command", bound=Callable[..., Any])
# The commands declared with @command, per module, in the order they were declared.
_DECLARED: dict[str, list[tuple[str, Callable[..., Any]]]] = {}


def command(name: str) -> Callable[[Command], Command]:
    """Declare the decorated function the ``prompt-capture`` command ``name``, where it is
    defined; its module's ``register(app)`` adds it with :func:`add_commands`."""

    def declare(function: Command) -> Command:
        _DECLARED.setdefault(function.__module__, []).append((name, function))
        return function

    return declare


def add_commands(app: typer.Typer, module: str) -> None:
    """Add the commands the module named ``module`` declared with :func:`command` to ``app``."""
    for name, function in _DECLARED.get(module, []):
        app.command(name)(function)


# Options several commands take, declared once: the same flag, type and help everywhere.
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of text.")]
Now = Annotated[
    str | None,
    typer.Option("--now", help="The time to run as of: ISO 8601 with a zone (default: now)."),
]
Hyperparameters = Annotated[
    str | None,
    typer.Option("--hyperparameters", help='TrainConfig fields as JSON, e.g. {"max_steps": 50}.'),
]


# Libraries that log every step at INFO: one line per API call (httpx), per migration plugin
# (alembic, even on import). The CLI's own INFO lines and the flows' stay.
QUIET_LOGGERS = ("httpx", "alembic")
# Prefect's run loggers: they log a failed run's exception with its traceback.
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class UserErrorTracebackFilter(logging.Filter):
    """Drops the traceback from a log record whose exception is a :class:`UserError` (the
    message names the input and the fix; the frames help nobody). The record itself stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = None
            record.exc_text = None
        return True


def bootstrap(*, verbose: bool = False) -> None:
    """Once per ``prompt-capture`` process, before any command: the offline model hub, the
    logging format and level (``verbose``: DEBUG), quiet chatty libraries, and Prefect's
    environment (:func:`prefect_env`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    prefect_env()


def prefect_env() -> None:
    """Before Prefect is imported: give its local ephemeral server time to start on a busy
    machine (the default 20 s is too short on 2 loaded cores), keep it off the network, and
    keep tracebacks of user errors out of the run logs. Idempotent."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise
    for name in PREFECT_RUN_LOGGERS:
        run_logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorTracebackFilter) for f in run_logger.filters):
            run_logger.addFilter(UserErrorTracebackFilter())


def require_database(settings: Settings) -> str:
    """The settings' database URL once its schema is the one this code needs; raises
    :class:`capture.db.DatabaseNotMigratedError` (one line naming ``prompt-capture db
    upgrade``) otherwise. Every command that reads the database calls it first."""
    from capture import db

    return db.require_migrated(settings.resolved_database_url)


class DatabaseUnreachableError(UserError, ConnectionError):
    """The configured database refused the connection (wrong URL, server down)."""


def user_error_from(exc: Exception) -> UserError | None:
    """The :class:`UserError` an exception that reached the CLI stands for, or None (a bug or an
    I/O failure mid-command: it keeps its traceback). Only a failed connection to the configured
    database qualifies (SQLAlchemy's ``OperationalError`` / ``InterfaceError`` with no statement):
    the message names the URL, without its password, and the fix."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    if not isinstance(exc, OperationalError | InterfaceError) or exc.statement is not None:
        return None
    from capture.db import display_url, sync_url
    from capture.settings import get_settings

    url = display_url(sync_url(get_settings().resolved_database_url))
    reason = " ".join(str(exc.orig if exc.orig is not None else exc).split("\n")[0].split())
    return DatabaseUnreachableError(
        f"database {url}: cannot connect ({reason[:200]}); check PROMPT_CAPTURE_DATABASE_URL "
        "(host, port, user, database name) and that the server is running"
    )


def require_model_dir(path: Path, option: str) -> Path:
    """``path`` when it is a directory; else :class:`OptionError` naming ``option`` (a model
    directory is a folder written by ``prompt-capture train``)."""
    if not path.is_dir():
        found = "is a file" if path.exists() else "no such directory"
        raise OptionError(
            f"{option} {path}: {found}; pass a model directory written by `prompt-capture train`"
            " (e.g. PROMPT_CAPTURE_HOME/models/<version>)"
        )
    return path


def require_file(path: Path, option: str) -> Path:
    """``path`` when it is an existing file; else :class:`OptionError` naming ``option``."""
    if path.is_dir():
        raise OptionError(f"{option} {path}: is a directory; pass a file")
    if not path.is_file():
        raise OptionError(f"{option} {path}: no such file; pass an existing file")
    return path


def require_new_file(path: Path, option: str) -> Path:
    """``path`` when a file may be written there (not an existing directory); else
    :class:`OptionError` naming ``option``."""
    if path.is_dir():
        raise OptionError(f"{option} {path}: is a directory; pass the path of a file to write")
    return path


def print_json(data: object) -> None:
    """``data`` as indented JSON on stdout (dates and paths as strings)."""
    typer.echo(json.dumps(data, indent=2, default=str))


def parse_now(value: str | None) -> datetime | None:
    """``--now``: an ISO 8601 time with a zone (for reproducible reports and checks)."""
    if value is None:
        return None
    from capture.values import to_utc

    try:
        return to_utc(datetime.fromisoformat(value), "--now")
    except ValueError as exc:
        raise OptionError(
            f"--now: expected an ISO 8601 time with a zone, e.g. 2026-11-26T12:00:00+00:00; {exc}"
        ) from None


def parse_hyperparameters(value: str | None) -> dict[str, Any] | None:
    """``--hyperparameters``: a JSON object of ``TrainConfig`` fields (None when not given)."""
    if not value:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise OptionError(f"--hyperparameters: expected a JSON object ({exc.msg})") from None
    if not isinstance(parsed, dict):
        raise OptionError(
            f"--hyperparameters: expected a JSON object, found {type(parsed).__name__}"
        )
    return parsed
