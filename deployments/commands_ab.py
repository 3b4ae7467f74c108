"""``prompt-capture`` commands of production A/B testing (docs/AB_TESTING.md):
``candidate set VERSION --mode shadow|canary [--share 0.1]``, ``candidate clear``,
``candidate show`` and ``ab [--json]`` (the readout and the decision). They run without Prefect.
Wire them with ``commands_ab.register(app)`` in ``deployments.cli``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from deployments.cli_support import (
    CLI_LOCK_TIMEOUT_S,
    AsJson,
    LockTimeout,
    OptionError,
    command_group,
    console,
    print_json,
    require_database,
    require_home,
)

candidate_app = command_group(
    "The candidate model under test beside the champion (shadow or canary)."
)


@candidate_app.command("set")
def candidate_set_cmd(
    version: Annotated[str, typer.Argument(help="Registry version to test (not the champion).")],
    mode: Annotated[
        str, typer.Option("--mode", help="shadow (predicted after answering) or canary.")
    ] = "shadow",
    share: Annotated[
        float | None,
        typer.Option(
            "--share",
            help="Canary only: share of users it answers, > 0 and <= 1 (default: 0.1).",
        ),
    ] = None,
    lock_timeout: LockTimeout = CLI_LOCK_TIMEOUT_S,
) -> None:
    """Put VERSION under test; running services pick it up within their reload interval.

    The same command again changes nothing (the test keeps its start); a new --share for the
    canary under test keeps its start; another version or shadow -> canary starts a new test.
    """
    from capture.model_dir import ModelDirError
    from capture.settings import get_settings
    from tasks.ab_candidate import candidate, set_candidate
    from tasks.ab_readout import ab_tests

    models_dir = get_settings().models_dir
    try:
        before = candidate(models_dir) if models_dir.is_dir() else None
    except ModelDirError:
        before = None  # a malformed pointer is replaced
    pointer = set_candidate(models_dir, version, mode=mode, share=share, lock_timeout=lock_timeout)
    extra = f", share {pointer.share:.1%} of users" if pointer.mode == "canary" else ""
    if pointer == before:  # the same file: nothing was written
        tests = ab_tests(models_dir)
        since = tests[-1].since if tests and tests[-1].until is None else None
        console.print(
            f"candidate [bold]{pointer.version}[/bold] is already under test in "
            f"{pointer.mode}{extra}, since {since.isoformat() if since else 'an unknown time'}; "
            "nothing changed"
        )
        return
    console.print(f"candidate [bold]{pointer.version}[/bold] under test in {pointer.mode}{extra}")


@candidate_app.command("clear")
def candidate_clear_cmd(
    reason: Annotated[str | None, typer.Option("--reason", help="Recorded in the history.")] = None,
    lock_timeout: LockTimeout = CLI_LOCK_TIMEOUT_S,
) -> None:
    """Stop testing the candidate: the champion answers all traffic again."""
    from capture.settings import get_settings
    from tasks.ab_candidate import clear_candidate

    before = clear_candidate(get_settings().models_dir, reason=reason, lock_timeout=lock_timeout)
    if before is None:
        console.print("no candidate was under test")
    else:
        console.print(f"candidate {before.version} ({before.mode}) cleared")


@candidate_app.command("show")
def candidate_show_cmd() -> None:
    """Print the candidate pointer (or that there is none)."""
    from capture.settings import get_settings
    from tasks.ab_candidate import candidate

    settings = get_settings()
    require_home(settings)
    pointer = candidate(settings.models_dir)
    if pointer is None:
        console.print("no candidate under test")
    else:
        print_json(pointer.to_dict())


def ab_cmd(
    as_json: AsJson = False,
    margin: Annotated[
        float,
        typer.Option(
            "--margin",
            help="Non-inferiority margin, a fraction in [0, 1) (0.01 = 1 point).",
        ),
    ] = 0.01,
) -> None:
    """The A/B readout of the candidate under test and what the ab-check would decide."""
    from capture.settings import get_settings
    from tasks.ab_decision import ABPlan
    from tasks.ab_readout import ab_readout

    if not 0 <= margin < 1:
        raise OptionError(
            f"--margin: expected a fraction in [0, 1) (0.01 = 1 point), found {margin:g}"
        )
    settings = get_settings()
    require_home(settings)
    url = require_database(settings)
    readout = ab_readout(url, settings.models_dir, plan=ABPlan(margin=margin))
    if as_json:
        print_json(readout.to_dict())
    else:
        console.print(readout.to_markdown(), markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``candidate set|clear|show`` and ``ab`` to ``app``."""
    app.add_typer(candidate_app, name="candidate")
    app.command("ab")(ab_cmd)
