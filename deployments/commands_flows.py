"""``prompt-capture`` commands that run the weekly-cycle flows once, now: export,
import-corrections, cycle, demo, and serve (every deployment of ``prefect.yaml``).

The flows read the home and the database from the environment (PROMPT_CAPTURE_HOME,
PROMPT_CAPTURE_DATABASE_URL) at their entry; the commands pass only what the user typed. Each
command checks the options, the files and the database schema before the flow starts, so a
mistake is one line and exit code 2 (never a failed run with Prefect's traceback and retries).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from deployments.cli_support import (
    AsJson,
    Hyperparameters,
    OptionError,
    Seed,
    add_commands,
    command,
    console,
    parse_hyperparameters,
    prefect_env,
    print_json,
    require_bindable,
    require_database,
    require_file,
    require_new_file,
)


@command("export")
def export_cmd(
    *,
    mode: Annotated[
        str, typer.Option("--mode", help="retraining (JSONL for training) or review (JSON list).")
    ],
    days: Annotated[
        int | None, typer.Option("--days", help="Only the last N days (default: all).")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", help="File to write.")] = None,
    confidence_threshold: Annotated[
        float | None,
        typer.Option(
            "--confidence-threshold",
            help="review: export prompts below it (default 0.7); retraining: the minimum "
            "confidence of uncorrected predictions (default 0.9).",
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="review: the review budget.")] = 200,
    strategy: Annotated[
        str | None, typer.Option("--strategy", help="review: selection strategy.")
    ] = None,
    file_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="review: json (the review file) or label-studio (Label Studio tasks, and the "
            "labeling config next to them).",
        ),
    ] = "json",
    open_round: Annotated[
        bool,
        typer.Option(
            "--open-round/--no-open-round",
            help="review: also open a review-workbench round with the same selection.",
        ),
    ] = True,
) -> None:
    """Export production prompts for retraining or for human review (the spec's formats)."""
    prefect_env()
    from capture.offline_statements import check_days, check_fraction
    from capture.settings import get_settings

    if mode not in ("retraining", "review"):
        raise OptionError(f"--mode: expected 'retraining' or 'review', found {mode!r}")
    if output is not None:
        require_new_file(output, "--output")
    if file_format not in ("json", "label-studio") or (mode != "review" and file_format != "json"):
        raise OptionError(
            f"--format: expected 'json' or 'label-studio' (with --mode review), found "
            f"{file_format!r}"
        )
    if mode == "review":
        from tasks.review_export import ReviewSelection
        from tasks.review_select import DEFAULT_STRATEGY

        selection = ReviewSelection(  # checks every value (ParameterError names it)
            days=days,
            confidence_threshold=0.7 if confidence_threshold is None else confidence_threshold,
            limit=limit,
            strategy=strategy or DEFAULT_STRATEGY,
        )
        require_database(get_settings())
        from flows.review import review_export_flow

        review = review_export_flow(
            days=selection.days,
            confidence_threshold=selection.confidence_threshold,
            limit=selection.limit,
            strategy=selection.strategy,
            output=str(output) if output else None,
            file_format=file_format,
            open_round=open_round,
        )
        if file_format == "label-studio":
            from tasks.label_studio import config_path_for

            console.print(
                f"wrote {review.n_selected} Label Studio tasks (of {review.n_candidates} "
                f"candidates) to [bold]{review.path}[/bold] and the labeling config to "
                f"[bold]{config_path_for(review.path)}[/bold]; import both into a Label Studio "
                "project, annotate, export JSON, then `prompt-capture import-corrections FILE`"
            )
            return
        console.print(
            f"wrote {review.n_selected} prompts for review (of {review.n_candidates} "
            f"candidates) to [bold]{review.path}[/bold]; fill in corrected_intent, then "
            "`prompt-capture import-corrections FILE`"
        )
        return
    check_days(days, "--days")
    min_confidence = 0.9 if confidence_threshold is None else confidence_threshold
    check_fraction(min_confidence, "--confidence-threshold")
    require_database(get_settings())
    from flows.training_data import training_data_flow

    export = training_data_flow(
        days=days, min_confidence=min_confidence, output=str(output) if output else None
    )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(export.counts.items()))
    console.print(
        f"wrote {export.n_train} training rows ({counts}) to [bold]{export.path}[/bold]; "
        f"{export.n_holdout} held out in {export.holdout_path}"
    )


@command("import-corrections")
def import_corrections_cmd(
    file: Annotated[
        Path | None,
        typer.Argument(help="A reviewed file; without it, the inbox folder is drained."),
    ] = None,
    *,
    allow_new_intent: Annotated[
        bool,
        typer.Option("--allow-new-intent", help="Accept intents the serving model lacks."),
    ] = False,
    reviewer: Annotated[
        str | None,
        typer.Option("--reviewer", help="Who reviewed, for the audit (default: your OS user)."),
    ] = None,
) -> None:
    """Apply a reviewed file (all or nothing) — the review file filled in, or a Label Studio
    JSON export; re-importing the same file changes nothing."""
    prefect_env()
    from capture.settings import get_settings

    if file is not None:
        require_file(file, "FILE")
    require_database(get_settings())
    if file is not None:  # a refused file is one line, before any flow run
        from tasks.corrections import check_corrections_file

        check_corrections_file(
            file, allow_new_intent=allow_new_intent, models_dir=get_settings().models_dir
        )
    from flows.corrections import corrections_flow
    from tasks.corrections import importing_user

    results = corrections_flow(
        file=str(file) if file else None,
        allow_new_intent=allow_new_intent,
        reviewer=reviewer or importing_user(),
    )
    if not results:
        console.print(f"no files in {get_settings().inbox_dir}")
    for result in results:
        status = "[green]applied[/green]" if result.ok else "[red]REJECTED[/red]"
        console.print(
            f"{result.file}: {status}: applied {result.applied}, unchanged "
            f"{result.unchanged}, not reviewed {result.not_reviewed}, rejected rows "
            f"{len(result.rejected)}"
        )
        for reason in result.rejected:
            console.print(f"  - {reason}", highlight=False, markup=False)
    if any(not r.ok for r in results):
        console.print("nothing was applied from the rejected file(s); fix them and import again")
        raise typer.Exit(code=1)


@command("cycle")
def cycle_cmd(
    *,
    days: Annotated[int | None, typer.Option("--days", help="Production data window.")] = 30,
    hyperparameters: Hyperparameters = None,
    deploy: Annotated[bool, typer.Option("--deploy/--no-deploy")] = True,
    deploy_mode: Annotated[
        str,
        typer.Option(
            "--deploy-mode",
            help="shadow or canary: a promoted challenger becomes the A/B candidate "
            "(docs/AB_TESTING.md); direct: it takes all traffic now.",
        ),
    ] = "shadow",
    as_json: AsJson = False,
) -> None:
    """Run the weekly cycle now: inbox, training data, pairs, retrain, gate, export, deploy."""
    prefect_env()
    from capture.offline_statements import check_days
    from capture.settings import get_settings
    from tasks.retrain import train_config

    params = parse_hyperparameters(hyperparameters)
    train_config(params)  # unknown or bad hyperparameters: refused by name, before any run
    check_days(days, "--days")
    if deploy_mode not in {"shadow", "canary", "direct"}:
        raise OptionError(
            f"--deploy-mode: expected shadow, canary or direct, found {deploy_mode!r}"
        )
    settings = get_settings()
    from tasks.layout import HomeLayout

    HomeLayout(settings.home).require_registry()  # as the flow, first; but before Prefect
    require_database(settings)
    from flows.weekly import weekly_cycle

    result = weekly_cycle(days=days, hyperparameters=params, deploy=deploy, deploy_mode=deploy_mode)
    if as_json:
        print_json(result.as_dict())
    else:
        console.print(result.message, highlight=False)


@command("serve")
def serve_cmd(
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Serve only these deployments.")
    ] = None,
    review_ui: Annotated[
        bool, typer.Option("--review-ui", help="Also serve the review workbench.")
    ] = False,
    review_host: Annotated[
        str, typer.Option("--review-host", help="The workbench's address.")
    ] = "127.0.0.1",
    review_port: Annotated[
        int, typer.Option("--review-port", min=1, max=65535, help="The workbench's TCP port.")
    ] = 8765,
) -> None:
    """Serve every prefect.yaml deployment with its schedule from this process (no work pool),
    and with ``--review-ui`` the review workbench beside them (as `prompt-capture review-ui`)."""
    prefect_env()
    from deployments.serve import serve_all

    if review_ui:
        from deployments.review_commands import workbench_settings
        from review_ui.server import serve_in_background

        require_bindable(review_host, review_port, "--review-host", "--review-port")
        serve_in_background(workbench_settings(), host=review_host, port=review_port)
        console.print(f"review workbench on [bold]http://{review_host}:{review_port}/[/bold]")

    serve_all(only=only)


@command("demo")
def demo_cmd(
    *,
    first_steps: Annotated[
        int, typer.Option("--first-steps", min=1, help="Training steps of the first model.")
    ] = 30,
    retrain_steps: Annotated[
        int, typer.Option("--retrain-steps", min=1, help="Training steps of the weekly retrain.")
    ] = 20,
    seed: Seed = 0,
) -> None:
    """The whole loop on the bundled demo dataset, from an empty PROMPT_CAPTURE_HOME, as one
    Prefect flow run (``demo``) with the weekly-cycle flows as its subflows. It uses
    PROMPT_CAPTURE_DATABASE_URL when set (refused when that database holds data), else an
    SQLite file in the demo's home."""
    prefect_env()
    from capture.settings import get_settings
    from tasks.demo import check_demo_database, demo_story
    from tasks.run_settings import configured_database_url

    configured = configured_database_url(get_settings())
    if configured is not None:
        check_demo_database(configured)  # before Prefect starts: one line, exit 2
    from flows.demo import demo_flow

    result = demo_flow(first_steps=first_steps, retrain_steps=retrain_steps, seed=seed)
    api_url = os.environ.get("PREFECT_API_URL") or None
    for line in demo_story(result, retrain_steps=retrain_steps, api_url=api_url):
        console.print(line, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the flow-running commands to ``app``."""
    add_commands(app, __name__)
