"""The review workbench's commands, added to ``prompt-capture`` by :func:`register`:

- ``prompt-capture review-ui [--host 127.0.0.1] [--port 8765] [--lease-minutes 10]
  [--double-review-share 0.1]`` — serve the workbench
- ``prompt-capture review-user add NAME --role reviewer|admin --password-stdin`` (the password
  is read from standard input, never from a flag), ``passwd NAME --password-stdin``,
  ``disable NAME``, ``enable NAME``, ``list``
- ``prompt-capture review-round open [--name N] [--limit 200] [--days 7] [--strategy S]
  [--double-review-share 0.1] [--embeddings]``, ``list``, ``close ROUND_ID``

Settings come from ``capture.settings`` (``PROMPT_CAPTURE_HOME``, ``PROMPT_CAPTURE_DATABASE_URL``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from deployments.cli_support import (
    OptionError,
    Seed,
    command_group,
    console,
    require_bindable,
    require_database,
)

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from review_ui.settings import WorkbenchSettings

review_user_app = command_group("Review workbench users.")
review_round_app = command_group("Review rounds (the workbench's queues).")

T = TypeVar("T")
LoginName = Annotated[str, typer.Argument(help="Login name.")]
PasswordStdin = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from standard input.")
]
DoubleReviewShare = Annotated[
    float,
    typer.Option(
        "--double-review-share", min=0.0, max=1.0, help="Share of a round's items reviewed twice."
    ),
]


def _fail(exc: Exception) -> NoReturn:
    """End the command with ``exc``'s message (a ``ValueError`` a value was refused with) as a
    user error: the app's handler prints the one line, exit code 2."""
    raise OptionError(str(exc)) from None


def _url() -> str:
    from capture.settings import get_settings

    return require_database(get_settings())  # a UserError: the app's handler says it


def _in_transaction(work: Callable[[Connection], T], *errors: type[Exception]) -> T:
    """``work(conn)`` in one transaction on the (migrated) database; a ``UserError`` (or one of
    ``errors``) ends the command with its message and exit code 2."""
    from capture.db import get_sync_engine

    try:
        with get_sync_engine(_url()).begin() as conn:
            return work(conn)
    except errors as exc:
        _fail(exc)


def _read_password(password_stdin: bool) -> str:
    if not password_stdin:
        raise OptionError(
            "the password is read from standard input only: pass --password-stdin and pipe "
            'it in, e.g. `printf %s "$PW" | prompt-capture review-user add NAME --role '
            "reviewer --password-stdin`"
        )
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise OptionError("--password-stdin: standard input was empty; pipe the password in")
    return password


def workbench_settings(**options: Any) -> WorkbenchSettings:
    """The workbench's settings from the environment's home and (migrated) database, with
    ``options`` (``lease_minutes``, ``double_review_share``, ``https_only``); a bad value or an
    unmigrated database is a ``UserError`` (one error line and exit code 2)."""
    from capture.settings import get_settings
    from review_ui.settings import WorkbenchSettings

    return WorkbenchSettings(home=get_settings().home, database_url=_url(), **options)


def review_ui(
    *,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 8765,
    lease_minutes: Annotated[
        float, typer.Option("--lease-minutes", min=0.1, help="How long a reviewer holds an item.")
    ] = 10.0,
    double_review_share: DoubleReviewShare = 0.1,
    https_only: Annotated[
        bool, typer.Option("--https-only", help="Secure cookies (serve behind HTTPS).")
    ] = False,
) -> None:
    """Serve the review workbench (log in with a user made by `review-user add`)."""
    from review_ui.server import serve

    workbench = workbench_settings(
        lease_minutes=lease_minutes, double_review_share=double_review_share, https_only=https_only
    )
    require_bindable(host, port, "--host", "--port")
    console.print(f"review workbench on [bold]http://{host}:{port}/[/bold] (Ctrl-C stops it)")
    serve(workbench, host=host, port=port)


@review_user_app.command("add")
def user_add(
    name: LoginName,
    role: Annotated[str, typer.Option("--role", help="reviewer or admin.")] = "reviewer",
    password_stdin: PasswordStdin = False,
) -> None:
    """Create a workbench user; the password comes from standard input."""
    from tasks.review_users import add_user

    password = _read_password(password_stdin)
    user = _in_transaction(lambda conn: add_user(conn, name, role=role, password=password))
    console.print(f"review user [bold]{user.name}[/bold] ({user.role}) created")


@review_user_app.command("passwd")
def user_passwd(name: LoginName, password_stdin: PasswordStdin = False) -> None:
    """Replace a user's password (read from standard input)."""
    from tasks.review_users import set_password

    password = _read_password(password_stdin)
    _in_transaction(lambda conn: set_password(conn, name, password))
    console.print(f"password of [bold]{name}[/bold] replaced")


def _set_active(name: str, active: bool) -> None:
    from tasks.review_users import set_active

    _in_transaction(lambda conn: set_active(conn, name, active))
    console.print(f"review user [bold]{name}[/bold] {'enabled' if active else 'disabled'}")


@review_user_app.command("disable")
def user_disable(name: LoginName) -> None:
    """Disable a user (their sessions stop working within seconds)."""
    _set_active(name, False)


@review_user_app.command("enable")
def user_enable(name: LoginName) -> None:
    """Enable a disabled user."""
    _set_active(name, True)


@review_user_app.command("list")
def user_list() -> None:
    """List the workbench users."""
    from capture.db import get_sync_engine
    from tasks.review_users import list_users

    with get_sync_engine(_url()).connect() as conn:
        for name, role, active in list_users(conn):
            console.print(f"{name}\t{role}\t{'active' if active else 'disabled'}")


@review_round_app.command("open")
def round_open(
    *,
    name: Annotated[str | None, typer.Option("--name", help="Shown to reviewers.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Review budget.")] = 200,
    days: Annotated[int, typer.Option("--days", min=1, help="Window in days.")] = 7,
    strategy: Annotated[str, typer.Option("--strategy", help="Selection strategy.")] = "threshold",
    confidence_threshold: Annotated[
        float, typer.Option("--confidence-threshold", min=0.0, max=1.0)
    ] = 0.7,
    double_review_share: DoubleReviewShare = 0.1,
    seed: Seed = 0,
    embeddings: Annotated[
        bool,
        typer.Option(
            "--embeddings/--no-embeddings",
            help="Collapse near-duplicates by the serving model's embeddings (loads the model).",
        ),
    ] = False,
) -> None:
    """Open a review round filled by the review selection (as `export --mode review`)."""
    from capture.settings import get_settings
    from flows.entry import from_parameters
    from tasks.review_export import ReviewSelection
    from tasks.review_rounds import open_review_round

    embed = None
    if embeddings:
        from tasks.registry import current_model_dir, is_deployable

        model_dir = current_model_dir(get_settings().models_dir)
        if model_dir is not None and is_deployable(model_dir):
            from capture.classifier import OnnxClassifier

            embed = OnnxClassifier(model_dir).embed
    try:
        selection = from_parameters(ReviewSelection, locals())  # checks every value
        summary = open_review_round(
            _url(),
            name=name,
            selection=selection,
            double_review_share=double_review_share,
            embed=embed,
        )
    except ValueError as exc:  # a UserError goes to the app's handler as it is
        _fail(exc)
    console.print(
        f"round [bold]{summary.name}[/bold] ({summary.id}): {summary.items} prompts to review "
        f"({summary.members} near-duplicates in groups, {summary.double_review} double-reviewed) "
        f"of {summary.n_candidates} candidates"
    )


@review_round_app.command("list")
def round_list() -> None:
    """List the rounds, newest first."""
    from datetime import UTC, datetime

    from capture.db import get_sync_engine
    from tasks.review_progress import round_progress
    from tasks.review_rounds import list_rounds

    with get_sync_engine(_url()).connect() as conn:
        for r in list_rounds(conn):
            p = round_progress(conn, r.id, now=datetime.now(UTC))
            console.print(
                f"{r.id}\t{r.status}\t{r.name}\tdone {p.done} / {p.total}, left {p.left}, "
                f"waiting for an admin {p.disputed + p.proposals}"
            )


@review_round_app.command("close")
def round_close(round_id: Annotated[str, typer.Argument(help="Round id (see list).")]) -> None:
    """Close a round (its remaining items leave the queue)."""
    from capture.values import as_uuid
    from tasks.review_rounds import close_round

    try:
        round_uuid = as_uuid(round_id, "ROUND_ID")
    except ValueError:
        raise OptionError(
            f"ROUND_ID: expected a round id (a UUID) as `prompt-capture review-round list` "
            f"shows it, found {round_id!r}"
        ) from None
    _in_transaction(lambda conn: close_round(conn, round_uuid), ValueError)
    console.print(f"round {round_id} closed")


def register(app: typer.Typer) -> None:
    """Add ``review-ui``, ``review-user`` and ``review-round`` to the ``prompt-capture`` app."""
    app.command("review-ui")(review_ui)
    app.add_typer(review_user_app, name="review-user")
    app.add_typer(review_round_app, name="review-round")
