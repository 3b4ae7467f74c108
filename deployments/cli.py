"""The ``prompt-capture`` command line (typer): the app, its one error handler, and ``main``.

The commands live by group in ``deployments.commands_*`` (each has ``register(app)``); heavy
modules are imported inside each command. Every user-fixable error is a
:class:`capture.errors.UserError`: :class:`UserErrorGroup` turns one raised anywhere under a
command (a bad option, a malformed file, a flow's task) into one line on stderr and exit code 2,
and so does a mistake typer finds on the command line (an unknown command or option, a missing
required option, a value it cannot take: :func:`usage_error_message`) and a database that
refuses the connection (``cli_support.user_error_from``: the URL without its password). A
registry another run holds past ``--lock-timeout`` is one line too, with exit code 1: nobody's
mistake, run it again later. Any other exception keeps its traceback. ``--help`` is typer's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer
from typer._click.exceptions import NoArgsIsHelpError, NoSuchOption, UsageError  # see cli_support

from capture.errors import UserError
from deployments import (
    cli_support,
    commands_ab,
    commands_db,
    commands_flows,
    commands_model,
    commands_ops,
    review_commands,
    spool_commands,
)
from deployments.cli_support import CommandGroup, UnknownCommandError, print_error

USER_ERROR_EXIT_CODE = 2
#: Exit code of a command that gave up waiting for the registry lock (retry later).
BUSY_EXIT_CODE = 1


def usage_error_message(exc: UsageError) -> str:
    """A mistake on the command line as one sentence: the command, what was wrong (with the
    closest names for an unknown command or option) and where the help is."""
    command = exc.ctx.command_path if exc.ctx is not None else "prompt-capture"
    if isinstance(exc, UnknownCommandError):
        return _no_such(command, f"command {exc.name!r}", exc.close, "the commands")
    if isinstance(exc, NoSuchOption):
        return _no_such(command, f"option {exc.option_name!r}", exc.possibilities, "its options")
    message = exc.format_message().strip().rstrip(".")
    return f"{command}: {message[:1].lower()}{message[1:]} (see `{command} --help`)"


def _no_such(command: str, what: str, close: Sequence[str] | None, listed: str) -> str:
    guess = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"{command}: no such {what}{guess} (`{command} --help` lists {listed})"


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn what the user can act on into one line on stderr and :class:`typer.Exit`."""
    from tasks.registry_lock import RegistryBusyError

    try:
        yield
    except NoArgsIsHelpError:
        raise  # a group called without a command: typer prints its help
    except UsageError as exc:
        print_error(usage_error_message(exc))
        raise typer.Exit(code=USER_ERROR_EXIT_CODE) from None
    except UserError as exc:
        print_error(str(exc) or type(exc).__name__)
        busy = isinstance(exc, RegistryBusyError)
        raise typer.Exit(code=BUSY_EXIT_CODE if busy else USER_ERROR_EXIT_CODE) from None
    except Exception as exc:
        user_error = cli_support.user_error_from(exc)  # a database nobody can connect to
        if user_error is None:
            raise
        print_error(str(user_error))
        raise typer.Exit(code=USER_ERROR_EXIT_CODE) from None


class UserErrorGroup(CommandGroup):
    """The one CLI handler (:func:`one_line_errors`) around parsing the top-level options and
    running a command: a ``UserError`` from any command, or a mistake typer finds on the
    command line -> one line, exit code 2 (a busy registry: 1)."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:  # a (typer-vendored) click Context
        with one_line_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with one_line_errors():
            return super().invoke(ctx)


app = typer.Typer(
    cls=UserErrorGroup,
    no_args_is_help=True,
    add_completion=False,
    help="Prompt Capture: the learning loop of an intent classifier.",
)


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    cli_support.bootstrap(verbose=verbose)


commands_db.register(app)  # db upgrade / downgrade / current / refresh-stats
commands_model.register(app)  # train, evaluate, export-onnx, models, deploy, rollback
commands_flows.register(app)  # export, import-corrections, cycle, serve, demo
commands_ops.register(app)  # init, report, retention, monitor, demo-traffic, simulate
review_commands.register(app)  # review-ui, review-user, review-round (the reviewers' workbench)
spool_commands.register(app)  # spool list / replay / discard
commands_ab.register(app)  # candidate set / clear / show, ab (the A/B readout and decision)


def main() -> None:
    """The console entry point (``prompt-capture``)."""
    app()
