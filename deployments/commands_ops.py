"""``prompt-capture`` commands for operating and studying the loop: init, report, retention,
monitor, demo-traffic and simulate."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from deployments.cli_support import (
    Hyperparameters,
    Now,
    OptionError,
    add_commands,
    command,
    console,
    parse_hyperparameters,
    parse_now,
    percent,
    prefect_env,
    print_json,
    require_database,
    require_new_file,
    warn,
)

if TYPE_CHECKING:
    from capture.demo_traffic import DemoTrafficReport


@command("init")
def init_cmd(
    *,
    home: Annotated[
        Path | None,
        typer.Option("--home", help="The home to set up (default: PROMPT_CAPTURE_HOME)."),
    ] = None,
) -> None:
    """Set up a PROMPT_CAPTURE_HOME: the folder and its (empty) model registry. The flows that
    read or change the registry refuse a home without one; run this once on the shared home.
    Changes nothing in a home that is set up already."""
    from capture.settings import get_settings, home_problem
    from tasks.layout import HomeLayout
    from tasks.registry import versions

    if home is not None and (problem := home_problem(home)) is not None:
        raise OptionError(f"--home {home}: {problem}")
    layout = HomeLayout((home or get_settings().home).resolve())
    existed = layout.models_dir.is_dir()
    layout.create_registry()
    found = versions(layout.models_dir)
    print_json(
        {
            "home": str(layout.home),
            "registry": str(layout.models_dir),
            "created": not existed,
            "versions": found,
            "next": (
                "prompt-capture db upgrade; put base_train.jsonl, base_val.jsonl and "
                f"base_test.jsonl into {layout.data_dir}; the first weekly cycle "
                "(`prompt-capture cycle`) trains, gates and deploys version 1"
            )
            if not found
            else "",
        }
    )


@command("report")
def report_cmd(
    *,
    days: Annotated[float, typer.Option("--days", help="Window: the last N days.")] = 30,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="HTML file (default HOME/reports/report-<date>.html)."),
    ] = None,
    low_confidence: Annotated[
        float | None,
        typer.Option(
            "--low-confidence",
            min=0,
            max=1,
            help="Low-confidence threshold (default: the setting).",
        ),
    ] = None,
    now: Now = None,
) -> None:
    """Write the monitoring dashboard: one self-contained HTML file with plots and tables."""
    from capture.offline_statements import check_days
    from capture.settings import get_settings

    settings = get_settings()
    end = parse_now(now)
    check_days(days, "--days")
    if output is not None:
        require_new_file(output, "--output")
    require_database(settings)
    from tasks.report import write_report

    if output is None:
        stamp = (end or datetime.now(UTC)).strftime("%Y-%m-%d")
        output = settings.reports_dir / f"report-{stamp}.html"
    data = write_report(
        output,
        settings.resolved_database_url,
        days=days,
        low_confidence_threshold=(
            settings.review_confidence_threshold if low_confidence is None else low_confidence
        ),
        models_dir=settings.models_dir,
        now=end,
    )
    console.print(
        f"report over [bold]{data.total:,}[/bold] prompts (last {days:g} days, "
        f"{len(data.models)} model versions) written to [bold]{output}[/bold]"
    )


@command("retention")
def retention_cmd(
    *,
    days: Annotated[
        float, typer.Option("--days", help="Raw-log retention: logs older than this move.")
    ] = 90,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Rows per transaction.")
    ] = 1000,
    now: Now = None,
) -> None:
    """Move raw logs older than --days, PII-scrubbed, into the training store (the daily flow's
    work, run once here without Prefect)."""
    from capture.settings import get_settings

    settings = get_settings()
    url = require_database(settings)
    from tasks.retention import run_retention

    result = run_retention(
        url,
        retention_days=days,
        batch_size=batch_size,
        now=parse_now(now),
        # as the daily flow: new partitions get the configured width
        partition_interval=settings.partition_interval,
    )
    print_json(result.as_dict())


@command("monitor")
def monitor_cmd(
    *,
    max_catch_up_hours: Annotated[
        int,
        typer.Option(
            "--max-catch-up-hours",
            min=0,
            help="Completed hours not checked yet are checked up to this far back.",
        ),
    ] = 168,
    webhook_url: Annotated[
        str | None, typer.Option("--webhook-url", help="Default: PROMPT_CAPTURE_ALERT_WEBHOOK_URL.")
    ] = None,
    notification_block: Annotated[
        str | None, typer.Option("--block", help="Prefect notification block <type>/<name>.")
    ] = None,
    min_count: Annotated[int, typer.Option("--min-count", min=0)] = 20,
    now: Now = None,
) -> None:
    """Run the alert checks once (the hourly monitor flow: every completed UTC hour not checked
    yet) and print its result as JSON."""
    prefect_env()
    from capture.settings import get_settings

    require_database(get_settings())
    from flows.monitor import monitor_flow

    print_json(
        monitor_flow(
            max_catch_up_hours=max_catch_up_hours,
            webhook_url=webhook_url,
            notification_block=notification_block,
            min_count=min_count,
            now=parse_now(now),
        )
    )


@command("demo-traffic")
def demo_traffic_cmd(
    *,
    count: Annotated[int, typer.Option("--count", min=1, help="Prompts to send.")] = 500,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the traffic and outcomes.")] = 0,
    users: Annotated[
        int, typer.Option("--users", min=1, help="Simulated users (a canary split is per user).")
    ] = 200,
) -> None:
    """Send demo prompts through the NLU service, record outcomes, print the monitoring stats.

    The prompts are the traffic part of the packaged demo dataset, spread over --users
    simulated users. The registry's serving model answers when one is deployed under
    PROMPT_CAPTURE_HOME (and its A/B candidate, when one is set). When none is, a stand-in
    answers, the keyword classifier keyword-v1 fitted on the train part, and a warning line
    says so first (deploy a model: `prompt-capture demo`, or `prompt-capture deploy VERSION`).
    Workflows of a wrong intent usually fail.
    """
    import asyncio

    from capture.pointers import read_pointer
    from capture.settings import get_settings

    settings = get_settings()
    require_database(settings)
    if read_pointer(settings.models_dir) is None:  # as run_demo_traffic decides
        from capture.demo_data import KeywordClassifier

        warn(
            f"no model is deployed in {settings.models_dir}, so the stand-in keyword "
            f"classifier {KeywordClassifier.version} answers the demo traffic; to send it "
            "through a trained model, deploy one (`prompt-capture demo` trains and deploys "
            "one, `prompt-capture deploy VERSION` serves a registry version)"
        )
    from capture.demo_traffic import run_demo_traffic

    report = asyncio.run(run_demo_traffic(count=count, seed=seed, settings=settings, users=users))
    _print_demo_traffic(report)


def _print_demo_traffic(report: DemoTrafficReport) -> None:
    from rich.table import Table

    stats = report.stats
    console.print(
        f"sent [bold]{report.sent}[/bold] prompts in {report.seconds:.2f} s "
        f"(classifier agrees with the demo labels on {percent(report.agreement)}); "
        f"outcomes recorded: {report.outcomes} ({report.failures} failed)"
    )
    console.print(
        f"capture: queued {stats.queued}, written {stats.written}, merged {stats.merged}, "
        f"spooled {stats.spooled}, replayed {stats.replayed}, rejected {stats.rejected}"
    )
    buckets = Table(title="Confidence distribution (last 7 days)")
    buckets.add_column("confidence", justify="right")
    buckets.add_column("count", justify="right")
    for b in report.confidence:
        buckets.add_row("-" if b.bucket is None else f"{b.bucket:.1f}", str(b.count))
    console.print(buckets)
    intents = Table(title="Intent distribution (last 7 days)")
    for column in ("intent", "count", "avg confidence", "corrections"):
        intents.add_column(column, justify="left" if column == "intent" else "right")
    for i in report.intents:
        avg = "-" if i.avg_confidence is None else f"{i.avg_confidence:.3f}"
        intents.add_row(i.predicted_intent, str(i.count), avg, str(i.corrections))
    console.print(intents)
    success = Table(title="Workflow success rate by intent")
    for column in ("intent", "total", "successes", "success rate %"):
        success.add_column(column, justify="left" if column == "intent" else "right")
    for r in report.success:
        success.add_row(r.predicted_intent, str(r.total), str(r.successes), f"{r.success_rate:.1f}")
    console.print(success)
    console.print(
        f"{report.low_confidence} prompts below the review threshold "
        f"{report.review_threshold:.2f} (see `prompt-capture export --mode review`)"
    )


@command("simulate")
def simulate_cmd(
    *,
    dataset: Annotated[
        Path, typer.Option("--dataset", help="Folder with train.jsonl and test.jsonl.")
    ],
    weeks: Annotated[int, typer.Option("--weeks", min=1)] = 4,
    review_budget: Annotated[int, typer.Option("--review-budget", min=0)] = 300,
    strategy: Annotated[
        list[str] | None,
        typer.Option(
            "--strategy",
            help="random, threshold, margin, failed-first, diverse, or all; repeat to compare.",
        ),
    ] = None,
    seed: Annotated[list[int] | None, typer.Option("--seed", help="Repeat for more.")] = None,
    initial_per_intent: Annotated[int, typer.Option("--initial-per-intent", min=1)] = 5,
    traffic_per_week: Annotated[int, typer.Option("--traffic-per-week", min=1)] = 3000,
    output: Annotated[Path, typer.Option("--output")] = Path("simulation"),
    gate_per_intent: Annotated[
        int, typer.Option("--gate-per-intent", min=1, help="Labelled gate set per intent.")
    ] = 3,
    max_intents: Annotated[
        int | None,
        typer.Option("--max-intents", min=1, help="Only the first N intents (quick runs)."),
    ] = None,
    exclude_label: Annotated[
        list[str] | None, typer.Option("--exclude-label", help="Dropped labels (default oos).")
    ] = None,
    reference: Annotated[
        bool, typer.Option("--reference/--no-reference", help="Also train on all labels.")
    ] = False,
    hyperparameters: Hyperparameters = None,
    max_pairs: Annotated[int, typer.Option("--max-pairs", min=0)] = 2000,
    quantize: Annotated[bool, typer.Option("--quantize/--no-quantize")] = True,
) -> None:
    """Simulate weeks of the learning loop through the real service and flows; compare review
    strategies (CSV + PNG + table under --output)."""
    prefect_env()
    from tasks.simulate.data import SimulationError, check_strategies

    params = parse_hyperparameters(hyperparameters)
    for name in ("train.jsonl", "test.jsonl"):
        if not (dataset / name).is_file():
            raise SimulationError(f"--dataset {dataset}: expected {name} in it, found none")
    if strategy:
        check_strategies(strategy)  # before Prefect starts
    from flows.simulate import simulate_flow

    result = simulate_flow(
        str(dataset),
        strategies=strategy or None,
        seeds=seed or None,
        weeks=weeks,
        review_budget=review_budget,
        initial_per_intent=initial_per_intent,
        traffic_per_week=traffic_per_week,
        output=str(output),
        gate_per_intent=gate_per_intent,
        max_intents=max_intents,
        exclude_labels=exclude_label or None,
        reference=reference,
        hyperparameters=params,
        max_pairs=max_pairs,
        quantize=quantize,
    )
    typer.echo(result["table"])
    console.print(
        f"best strategy: [bold]{result['best']}[/bold]; CSV {result['csv']}; plot {result['png']}",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add the operating and simulation commands to ``app``."""
    add_commands(app, __name__)
