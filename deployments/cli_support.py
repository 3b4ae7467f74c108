"""What the ``prompt-capture`` command modules share: the console, the command groups, the
process bootstrap (environment defaults, logging), the home and database checks, JSON output,
the options several commands take, and the parsers of option values that are not plain types.

A bad option value raises :class:`capture.errors.UserError`; the one handler in
``deployments.cli`` turns it into one line on stderr and exit code 2. A command checks what the
user typed, and that the database is migrated, BEFORE it starts a flow: a mistake found inside
a flow run would be logged by Prefect (with its traceback) before the handler's line.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import json
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

# typer vendors click (``typer._click``) and re-exports only BadParameter of its exceptions; the
# CLI's handler tells the other command-line mistakes apart by these classes (typer >= 0.29).
from typer._click.exceptions import UsageError
from typer.core import TyperGroup

from capture.errors import UserError

if TYPE_CHECKING:
    from capture.settings import Settings

#: The width of a console that is not a terminal (a pipe, a file, a CI log): wide enough that
#: no line is wrapped and no table squeezed; a table is as wide as its cells.
UNWRAPPED_WIDTH = 10_000


def make_console() -> Console:
    """The one place the CLI's console is built. On a terminal, rich's own (it wraps at the
    terminal's width); piped or redirected, nothing is wrapped: a long path or line stays one
    line for ``grep`` and the logs."""
    terminal = Console()
    if terminal.is_terminal:
        return terminal
    return Console(soft_wrap=True, width=UNWRAPPED_WIDTH)


console = make_console()


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, one line (the message names the input and the fix)."""
    _stderr_line("error:", "red", message)


def warn(message: str) -> None:
    """``warning: <message>`` on stderr, one line: what the user should know before the
    command goes on (it does)."""
    _stderr_line("warning:", "yellow", message)


def _stderr_line(label: str, color: str, message: str) -> None:
    typer.echo(f"{typer.style(label, fg=color, bold=True)} {' '.join(message.split())}", err=True)


def percent(value: float | None) -> str:
    """An accuracy, a recall or a share as every command prints it: ``93.45%`` (``-``: none)."""
    return "-" if value is None else f"{value:.2%}"


class OptionError(UserError, ValueError):
    """A command-line option's value cannot be used; the message names the option."""


class UnknownCommandError(UsageError):
    """A command name no group of ``prompt-capture`` has; ``close`` holds the names most like it
    (most alike first), empty when none is."""

    def __init__(self, name: str, close: list[str], ctx: Any) -> None:
        super().__init__(f"no such command {name!r}", ctx)
        self.name = name
        self.close = close


class CommandGroup(TyperGroup):
    """Every command group of ``prompt-capture``: an unknown command name is an
    :class:`UnknownCommandError` (the handler in ``deployments.cli`` says it in one line)."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except UsageError as exc:
            # A plain UsageError here is click's "No such command"; a subclass (an option
            # where the command should be) is another mistake, said as it is.
            if type(exc) is not UsageError or not args:
                raise
            close = difflib.get_close_matches(args[0], self.list_commands(ctx))
            raise UnknownCommandError(args[0], close, ctx) from None


def command_group(help: str) -> typer.Typer:
    """A ``prompt-capture GROUP ...`` sub-app (``db``, ``spool``, ``candidate``, ...): a
    :class:`CommandGroup` that prints its help when called without a command."""
    return typer.Typer(cls=CommandGroup, no_args_is_help=True, help=help)


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
#: How long a command waits for another run that holds the model registry (the flows wait up
#: to ``tasks.registry_lock.DEFAULT_LOCK_TIMEOUT_S``: a weekly retrain takes an hour).
CLI_LOCK_TIMEOUT_S = 60.0
LockTimeout = Annotated[
    float,
    typer.Option(
        "--lock-timeout",
        min=0,
        help="Seconds to wait while another run (a weekly cycle, a deploy) holds the model "
        "registry; then exit code 1, naming that run.",
    ),
]


# Loggers whose lines are progress, not news, at the CLI's default verbosity (``--verbose``
# shows them), with the lowest level that still reaches the console: one line per API call
# (httpx), per migration plugin (alembic, even on import), the registry lock's "waiting for
# ..." lines (the command's one error line says it when the wait ends in failure), and
# onnxruntime's graph optimiser (its modules log under their bare names, see
# :func:`onnxruntime_optimizer_loggers`). The CLI's own INFO lines and the flows' stay.
QUIET_LOGGERS = {
    "httpx": logging.WARNING,
    "alembic": logging.WARNING,
    "tasks.registry_lock.wait": logging.ERROR,
    "onnxruntime": logging.WARNING,
}
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
        quiet = QUIET_LOGGERS | dict.fromkeys(onnxruntime_optimizer_loggers(), logging.WARNING)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
        # transformers' "Loading weights" bars: it takes hub's setting when it is imported
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    prefect_env()


def onnxruntime_optimizer_loggers() -> list[str]:
    """The logger names of onnxruntime's transformer graph optimiser: its package puts its own
    folder on ``sys.path`` and imports its modules by bare name (``fusion_base``,
    ``onnx_model_bert``...), each logging under ``getLogger(__name__)``. Found without
    importing onnxruntime; empty when it is not installed."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return []
    folders = [Path(p) / "transformers" for p in spec.submodule_search_locations]
    return sorted({f.stem for d in folders for f in d.glob("*.py") if f.stem != "__init__"})


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


class HomeMissingError(UserError, FileNotFoundError):
    """PROMPT_CAPTURE_HOME names a folder that does not exist (a typo, a share not mounted)."""


def require_home(settings: Settings) -> Path:
    """The settings' home when it is a folder; else :class:`HomeMissingError` naming it and the
    fix. A command that only reads the home (or its database) calls it first, so a mistyped
    home is refused instead of being created, with an empty database in it."""
    home = settings.home
    if home.is_dir():
        return home
    shown = str(home) if home.is_absolute() else f"{home} ({home.resolve()})"
    raise HomeMissingError(
        f"PROMPT_CAPTURE_HOME {shown}: no such folder; set PROMPT_CAPTURE_HOME to the home that "
        "holds the models and the database, or set one up there with `prompt-capture init`"
    )


def require_database_home(settings: Settings) -> str:
    """The settings' database URL, after :func:`require_home` when the database is the home's
    own SQLite file (no PROMPT_CAPTURE_DATABASE_URL)."""
    if not settings.database_url:
        require_home(settings)
    return settings.resolved_database_url


def require_database(settings: Settings) -> str:
    """The settings' database URL once its schema is the one this code needs; raises
    :class:`capture.db.DatabaseNotMigratedError` (one line naming ``prompt-capture db
    upgrade``) otherwise, or :class:`HomeMissingError` when the database is the SQLite file of
    a home that does not exist. Every command that reads the database calls it first."""
    from capture import db

    return db.require_migrated(require_database_home(settings))


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
    """``path`` when a file may be written there; else :class:`OptionError` naming ``option``.

    THE check of every option that names a file to write, made before any flow starts: the
    path is not a directory, no folder on its way is a file, and the nearest existing folder
    takes a new file (a file is created there and removed: nothing else is written). Missing
    folders on the way are created by the write (every command alike), not here.
    """
    if path.is_dir():
        raise OptionError(f"{option} {path}: is a directory; pass the path of a file to write")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OptionError(
            f"{option} {path}: {folder} is a file, not a folder; pass a path inside a folder"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".prompt-capture-", suffix=".probe", dir=folder)
    except OSError as exc:
        raise OptionError(
            f"{option} {path}: cannot write in {folder} ({exc.strerror or exc}); pass a path "
            "in a folder you can write"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path


def require_bindable(host: str, port: int, host_option: str, port_option: str) -> None:
    """Returns when a server could listen on ``host``:``port`` now (a socket is bound there and
    closed); else :class:`OptionError` naming the option to change: the port is in use (or
    needs privileges), or the host is not an address of this machine."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OptionError(
            f"{host_option} {host}: unknown host ({exc.strerror}); pass an address of this "
            "machine, e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OptionError(
                    f"{port_option} {port}: address already in use on {host}; choose another "
                    "port or stop the process using it"
                ) from None
            if exc.errno == errno.EACCES:
                raise OptionError(
                    f"{port_option} {port}: permission denied on {host}; choose a port above 1023"
                ) from None
            raise OptionError(
                f"{host_option} {host}: cannot listen there ({exc.strerror or exc}); pass an "
                "address of this machine, e.g. 127.0.0.1 or 0.0.0.0"
            ) from None


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
