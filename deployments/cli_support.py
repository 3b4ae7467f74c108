"""What the ``prompt-capture`` command modules share: the console, the Prefect environment,
JSON output, and the parsers of option values that are not plain types.

A bad option value raises :class:`capture.errors.UserError`; the one handler in
``deployments.cli`` turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from typing import Any

import typer
from rich.console import Console

from capture.errors import UserError

logger = logging.getLogger(__name__)

console = Console()


class OptionError(UserError, ValueError):
    """A command-line option's value cannot be used; the message names the option."""


def prefect_env() -> None:
    """Before Prefect is imported: give its local ephemeral server time to start on a busy
    machine (the default 20 s is too short on 2 loaded cores), and keep it off the network."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise


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
