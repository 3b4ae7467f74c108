"""The ``prompt-capture`` command line (typer): the app, its one error handler, and ``main``.

The commands live by group in ``deployments.commands_*`` (each has ``register(app)``); heavy
modules are imported inside each command. Every user-fixable error is a
:class:`capture.errors.UserError`: :class:`UserErrorGroup` turns one raised anywhere under a
command (a bad option, a malformed file, a flow's task) into one line on stderr and exit code 2,
and so does an option value typer cannot take (``--count 0``, ``--limit abc``, a missing
required option) and a database that refuses the connection (``cli_support.user_error_from``:
the URL without its password); any other exception keeps its traceback.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

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

USER_ERROR_EXIT_CODE = 2


def report_user_error(exc: UserError) -> None:
    """``error: <message>`` on stderr, one line (the message names the input and the fix)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    typer.echo(f"{typer.style('error:', fg='red', bold=True)} {message}", err=True)


def report_bad_parameter(exc: typer.BadParameter) -> None:
    """A value typer refused (type, range, missing option), as one ``error:`` line that says
    where the help is."""
    command = exc.ctx.command_path if exc.ctx is not None else "prompt-capture"
    message = " ".join(exc.format_message().split())
    typer.echo(
        f"{typer.style('error:', fg='red', bold=True)} {message} (see `{command} --help`)",
        err=True,
    )


class UserErrorGroup(TyperGroup):
    """The one CLI handler: a ``UserError`` from any command, or an option value typer refuses,
    -> one line, exit code 2."""

    def invoke(self, ctx: Any) -> Any:  # a (typer-vendored) click Context
        try:
            return super().invoke(ctx)
        except UserError as exc:
            report_user_error(exc)
            raise typer.Exit(code=USER_ERROR_EXIT_CODE) from None
        except typer.BadParameter as exc:
            report_bad_parameter(exc)
            raise typer.Exit(code=USER_ERROR_EXIT_CODE) from None
        except Exception as exc:
            user_error = cli_support.user_error_from(exc)  # a database nobody can connect to
            if user_error is None:
                raise
            report_user_error(user_error)
            raise typer.Exit(code=USER_ERROR_EXIT_CODE) from None


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
