"""The ``prompt-capture`` command line (typer). Heavy modules are imported inside each command."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Prompt Capture: the learning loop of an intent classifier.",
)
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic migrations).")
app.add_typer(db_app, name="db")
console = Console()


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Apply migrations (to the database in PROMPT_CAPTURE_DATABASE_URL, SQLite by default)."""
    from capture import db

    db.upgrade(revision=revision)
    console.print(f"database at revision [bold]{db.current_revision()}[/bold]")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. base.")) -> None:
    """Revert migrations down to REVISION."""
    from capture import db

    db.downgrade(revision=revision)
    console.print(f"database at revision [bold]{db.current_revision() or 'base'}[/bold]")


@db_app.command("current")
def db_current() -> None:
    """Show the schema revision of the database and the one this code needs."""
    from capture import db

    console.print(f"current: {db.current_revision() or 'none'}; head: {db.head_revision()}")


@db_app.command("refresh-stats")
def db_refresh_stats(
    wait_timeout: Annotated[
        float,
        typer.Option(
            "--wait-timeout",
            min=0,
            help="Seconds to wait for transactions writing the logs (PostgreSQL).",
        ),
    ] = 30.0,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Drop the rollup and recompute every hour.")
    ] = False,
) -> None:
    """Bring the monitoring rollup up to date (the hourly monitor flow does it every run).

    The confidence / intent / success-rate statistics read it for closed hours and the raw
    table for the rest; they are exact either way, the rollup keeps them fast.
    """
    from sqlalchemy.orm import Session

    from capture import db, queries

    try:
        db.ensure_migrated()
    except db.DatabaseNotMigratedError as exc:
        _fail_bad_input(exc)
    with Session(db.get_sync_engine()) as session:
        if rebuild:
            queries.reset_prompt_stats(session)
        result = queries.refresh_prompt_stats(session=session, wait_timeout=wait_timeout)
        session.commit()
    if result.writers_left:
        console.print(
            f"[yellow]{result.writers_left} transaction(s) were still writing the logs after "
            f"{wait_timeout:g} s: the watermark did not advance; run it again later[/yellow]"
        )
    watermark = "none" if result.watermark is None else result.watermark.isoformat()
    console.print(
        f"statistics rollup: hours before [bold]{watermark}[/bold] rolled up "
        f"({'full' if result.full else 'incremental'}: {result.dirty_hours} dirty hours, "
        f"{result.hourly_rows} hourly rows, {result.daily_rows} daily rows written)"
    )


def _fail_bad_input(exc: Exception) -> None:
    """Print a data/model error without a traceback and exit with status 2."""
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
    raise typer.Exit(code=2)


@app.command("train")
def train_cmd(
    *,
    train: Annotated[
        Path, typer.Option("--train", help="Training JSONL ({text, label} per line).")
    ],
    val: Annotated[
        Path | None,
        typer.Option(
            "--val", help="Validation JSONL: temperature and OOS threshold are fit on it."
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", help="Model directory to write (new or empty).")
    ],
    base_model: Annotated[
        Path | None,
        typer.Option(
            "--base-model", help="Warm start from this model directory (default: bundled)."
        ),
    ] = None,
    max_pairs: Annotated[
        int | None, typer.Option("--max-pairs", help="Pair budget (default ~n).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Cap on optimiser steps (quick runs).")
    ] = None,
    pairs: Annotated[
        Path | None, typer.Option("--pairs", help="Extra pairs JSONL from `convert-to-pairs`.")
    ] = None,
) -> None:
    """Fine-tune the encoder, fit head, temperature and OOS threshold; write a model directory."""
    from tasks.pairs import read_pairs
    from tasks.records import load_records
    from tasks.train import TrainConfig, train_model

    try:
        train_rows = load_records(train)
        val_rows = load_records(val, min_labels=1) if val is not None else None
        extra = read_pairs(pairs) if pairs is not None else None
        config = TrainConfig(seed=seed, max_pairs=max_pairs, max_steps=max_steps)
        result = train_model(
            train_rows, val_rows, output, config=config, base_model=base_model, extra_pairs=extra
        )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        _fail_bad_input(exc)
        return
    val_metrics = result.metrics.get("val") or {}
    console.print(
        f"model [bold]{result.version}[/bold] -> {result.model_dir} "
        f"({len(result.labels)} labels, {result.steps} steps, {result.total_seconds:.0f}s; "
        f"T={result.temperature:.3f}, OOS threshold={result.oos_threshold})"
    )
    if val_metrics:
        console.print(
            f"validation: accuracy {val_metrics['accuracy']:.4f}, "
            f"macro-F1 {val_metrics['macro_f1']:.4f}, ECE {val_metrics['ece']:.4f}"
        )


@app.command("evaluate")
def evaluate_cmd(
    *,
    model: Annotated[Path, typer.Option("--model", help="Model directory.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled JSONL ({text, label} per line).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    backend: Annotated[
        str, typer.Option("--backend", help="auto (ONNX if exported), torch, onnx.")
    ] = "auto",
) -> None:
    """Score a model directory: accuracy, macro-F1, ECE, in-scope accuracy, OOS recall."""
    import json

    from tasks.evaluate import evaluate_model
    from tasks.records import load_records

    if backend not in ("auto", "torch", "onnx"):
        _fail_bad_input(ValueError(f"--backend: expected auto, torch or onnx, found {backend!r}"))
    try:
        rows = load_records(data, min_labels=1)
        report = evaluate_model(model, rows, backend=backend)  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError) as exc:
        _fail_bad_input(exc)
        return
    if as_json:
        print(json.dumps(report.to_dict(details=False)))
        return
    console.print(
        f"n={report.n} accuracy={report.accuracy:.4f} macro_f1={report.macro_f1:.4f} "
        f"ece={report.ece:.4f} in_scope_accuracy={report.in_scope_accuracy} "
        f"oos_recall={report.oos_recall} latency_ms_p50={report.latency_ms_p50} "
        f"({report.backend})"
    )
    for true, pred, count in report.confusions[:5]:
        console.print(f"  confused {true} -> {pred}: {count}")


@app.command("convert-to-pairs")
def convert_to_pairs_cmd(
    *,
    input_path: Annotated[Path, typer.Option("--input", help="Labelled JSONL ({text, label}).")],
    output: Annotated[Path, typer.Option("--output", help="Pairs JSONL to write.")],
    max_pairs: Annotated[
        int | None, typer.Option("--max-pairs", help="Pair budget (default: one per example).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    negatives: Annotated[
        bool, typer.Option("--negatives", help="Add a negative to every pair.")
    ] = False,
) -> None:
    """Build balanced same-intent contrastive pairs from labelled records."""
    from tasks.pairs import build_pairs, write_pairs
    from tasks.records import load_records

    try:
        rows = load_records(input_path)
    except (ValueError, FileNotFoundError) as exc:
        _fail_bad_input(exc)
        return
    budget = max_pairs if max_pairs is not None else len(rows)
    pairs = build_pairs(rows, max_pairs=budget, seed=seed, with_negatives=negatives)
    write_pairs(output, pairs)
    console.print(f"wrote {len(pairs)} pairs to {output}")


# --------------------------------------------------------------------------- weekly cycle (D)


def _prefect_env() -> None:
    """Before Prefect is imported: give its local ephemeral server time to start on a busy
    machine (the default 20 s is too short on 2 loaded cores)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network needed
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise


def _print_json(data: object) -> None:
    import json

    typer.echo(json.dumps(data, indent=2, default=str))


@app.command("export")
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
) -> None:
    """Export production prompts for retraining or for human review (the spec's formats)."""
    _prefect_env()
    if mode not in ("retraining", "review"):
        _fail_bad_input(ValueError(f"--mode: expected 'retraining' or 'review', found {mode!r}"))
    if mode == "review":
        from flows.review import review_export_flow
        from tasks.review_select import DEFAULT_STRATEGY

        review = review_export_flow(
            days=days,
            confidence_threshold=0.7 if confidence_threshold is None else confidence_threshold,
            limit=limit,
            strategy=strategy or DEFAULT_STRATEGY,
            output=str(output) if output else None,
        )
        console.print(
            f"wrote {review['selected']} prompts for review (of {review['candidates']} "
            f"candidates) to [bold]{review['path']}[/bold]; fill in corrected_intent, then "
            "`prompt-capture import-corrections FILE`"
        )
        return
    from flows.training_data import training_data_flow

    summary = training_data_flow(
        days=days,
        min_confidence=0.9 if confidence_threshold is None else confidence_threshold,
        output=str(output) if output else None,
    )
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary["counts"].items()))
    console.print(
        f"wrote {summary['n_train']} training rows ({counts}) to "
        f"[bold]{summary['training_data']}[/bold]; {summary['n_holdout']} held out in "
        f"{summary['holdout_data']}"
    )


@app.command("import-corrections")
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
) -> None:
    """Apply a reviewed file (all or nothing); re-importing the same file changes nothing."""
    _prefect_env()
    from capture.settings import get_settings
    from flows.corrections import corrections_flow

    if file is not None and not file.is_file():
        _fail_bad_input(FileNotFoundError(f"{file}: no such file"))
    results = corrections_flow(file=str(file) if file else None, allow_new_intent=allow_new_intent)
    if not results:
        console.print(f"no files in {get_settings().inbox_dir}")
    rejected = False
    for result in results:
        status = "[green]applied[/green]" if not result["rejected"] else "[red]REJECTED[/red]"
        console.print(
            f"{result['file']}: {status}: applied {result['applied']}, unchanged "
            f"{result['unchanged']}, not reviewed {result['not_reviewed']}, rejected rows "
            f"{len(result['rejected'])}"
        )
        for reason in result["rejected"]:
            console.print(f"  - {reason}", highlight=False, markup=False)
        rejected = rejected or bool(result["rejected"])
    if rejected:
        console.print("nothing was applied from the rejected file(s); fix them and import again")
        raise typer.Exit(code=1)


@app.command("cycle")
def cycle_cmd(
    *,
    days: Annotated[int | None, typer.Option("--days", help="Production data window.")] = 30,
    hyperparameters: Annotated[
        str | None,
        typer.Option(
            "--hyperparameters", help='TrainConfig fields as JSON, e.g. {"max_steps": 50}.'
        ),
    ] = None,
    deploy: Annotated[bool, typer.Option("--deploy/--no-deploy")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run the weekly cycle now: inbox, training data, pairs, retrain, gate, export, deploy."""
    _prefect_env()
    import json

    from flows.weekly import weekly_cycle

    try:
        params = json.loads(hyperparameters) if hyperparameters else None
    except json.JSONDecodeError as exc:
        _fail_bad_input(ValueError(f"--hyperparameters: expected a JSON object ({exc.msg})"))
        return
    summary = weekly_cycle(days=days, hyperparameters=params, deploy=deploy)
    if as_json:
        _print_json(summary)
    else:
        console.print(summary["message"], highlight=False)


@app.command("models")
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the registry's versions, their metrics, and which one serves."""
    from rich.table import Table

    from capture.settings import get_settings
    from tasks.registry import list_models

    models_dir = get_settings().models_dir
    entries = list_models(models_dir)
    if as_json:
        _print_json(
            [
                {
                    "version": e.version,
                    "serving": e.serving,
                    "deployable": e.deployable,
                    "gate": e.gate,
                    "created_at": e.created_at,
                    "parent_version": e.parent_version,
                    "path": str(e.path),
                    "metrics": e.metrics,
                }
                for e in entries
            ]
        )
        return
    if not entries:
        console.print(f"no models in {models_dir}")
        return
    table = Table(title=f"models in {models_dir}")
    for column in ("", "version", "gate", "accuracy", "champion acc", "train rows", "created"):
        table.add_column(column)
    for e in entries:
        evaluation = e.metrics.get("evaluation", {}).get("all", {})
        acc = (evaluation.get("challenger") or {}).get("accuracy")
        old = (evaluation.get("champion") or {}).get("accuracy")
        table.add_row(
            "[bold green]serving[/]" if e.serving else ("" if e.deployable else "not exported"),
            e.version,
            e.gate or "-",
            f"{acc:.2%}" if acc is not None else "-",
            f"{old:.2%}" if old is not None else "-",
            str(e.training.get("n_train", "-")),
            (e.created_at or "")[:19],
        )
    console.print(table)


@app.command("rollback")
def rollback_cmd(
    to: Annotated[
        str | None, typer.Option("--to", help="Version to serve (default: the previous one).")
    ] = None,
) -> None:
    """Serve the previous good version again (atomic switch; running services hot-reload)."""
    from capture.settings import get_settings
    from tasks.registry import RegistryError, rollback

    try:
        previous, now = rollback(get_settings().models_dir, to)
    except RegistryError as exc:
        _fail_bad_input(exc)
        return
    console.print(f"now serving version [bold]{now}[/bold] (was {previous})")


@app.command("serve")
def serve_cmd(
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Serve only these deployments.")
    ] = None,
) -> None:
    """Serve every prefect.yaml deployment with its schedule from this process (no work pool)."""
    _prefect_env()
    from deployments.serve import serve_all

    serve_all(only=only)


@app.command("demo")
def demo_cmd(
    *,
    first_steps: Annotated[
        int, typer.Option("--first-steps", help="Training steps of the first model.")
    ] = 30,
    retrain_steps: Annotated[
        int, typer.Option("--retrain-steps", help="Training steps of the weekly retrain.")
    ] = 20,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """The whole loop on the bundled demo dataset, from an empty PROMPT_CAPTURE_HOME."""
    _prefect_env()
    from flows.demo import run_demo

    run_demo(console, first_steps=first_steps, retrain_steps=retrain_steps, seed=seed)


def _parse_now(value: str | None) -> datetime | None:
    """``--now``: an ISO 8601 time with a zone (for reproducible reports and checks)."""
    if value is None:
        return None
    from capture.queries import to_utc

    try:
        return to_utc(datetime.fromisoformat(value), "--now")
    except ValueError as exc:
        _fail_bad_input(
            ValueError(
                f"--now: expected an ISO 8601 time with a zone, e.g. "
                f"2026-11-26T12:00:00+00:00; {exc}"
            )
        )
        raise  # unreachable: _fail_bad_input exits


@app.command("report")
def report_cmd(
    *,
    days: Annotated[float, typer.Option("--days", help="Window: the last N days.")] = 30,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="HTML file (default HOME/reports/report-<date>.html)."),
    ] = None,
    low_confidence: Annotated[
        float | None,
        typer.Option("--low-confidence", help="Low-confidence threshold (default: the setting)."),
    ] = None,
    now: Annotated[str | None, typer.Option("--now", help="End of the window (ISO 8601).")] = None,
) -> None:
    """Write the monitoring dashboard: one self-contained HTML file with plots and tables."""
    from capture.settings import get_settings
    from tasks.report import write_report

    settings = get_settings()
    end = _parse_now(now)
    if output is None:
        stamp = (end or datetime.now(UTC)).strftime("%Y-%m-%d")
        output = settings.reports_dir / f"report-{stamp}.html"
    try:
        data = write_report(output, days=days, low_confidence_threshold=low_confidence, now=end)
    except ValueError as exc:
        _fail_bad_input(exc)
    console.print(
        f"report over [bold]{data.total:,}[/bold] prompts (last {days:g} days, "
        f"{len(data.models)} model versions) written to [bold]{output}[/bold]"
    )


@app.command("retention")
def retention_cmd(
    *,
    days: Annotated[
        float, typer.Option("--days", help="Raw-log retention: logs older than this move.")
    ] = 90,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per transaction.")] = 1000,
    now: Annotated[str | None, typer.Option("--now", help="Reference time (ISO 8601).")] = None,
) -> None:
    """Move raw logs older than --days, PII-scrubbed, into the training store (the daily flow's
    work, run once here without Prefect)."""
    from tasks.retention import run_retention

    try:
        result = run_retention(retention_days=days, batch_size=batch_size, now=_parse_now(now))
    except ValueError as exc:
        _fail_bad_input(exc)
    _print_json(result.as_dict())


@app.command("monitor")
def monitor_cmd(
    *,
    window_hours: Annotated[float, typer.Option("--window-hours")] = 1.0,
    webhook_url: Annotated[
        str | None, typer.Option("--webhook-url", help="Default: PROMPT_CAPTURE_ALERT_WEBHOOK_URL.")
    ] = None,
    notification_block: Annotated[
        str | None, typer.Option("--block", help="Prefect notification block <type>/<name>.")
    ] = None,
    min_count: Annotated[int, typer.Option("--min-count")] = 20,
    now: Annotated[str | None, typer.Option("--now", help="End of the window (ISO 8601).")] = None,
) -> None:
    """Run the alert checks once (the hourly monitor flow) and print its result as JSON."""
    from flows.monitor import monitor_flow

    _print_json(
        monitor_flow(
            window_hours=window_hours,
            webhook_url=webhook_url,
            notification_block=notification_block,
            min_count=min_count,
            now=_parse_now(now),
        )
    )


@app.command("demo-traffic")
def demo_traffic_cmd(
    *,
    count: Annotated[int, typer.Option("--count", min=1, help="Prompts to send.")] = 500,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the traffic and outcomes.")] = 0,
) -> None:
    """Send demo prompts through the NLU service, record outcomes, print the monitoring stats.

    The prompts are the traffic part of the packaged demo dataset; the classifier is the
    keyword classifier fitted on its train part. Workflows of a wrong intent usually fail.
    """
    import asyncio

    from capture import db
    from capture.demo_traffic import run_demo_traffic
    from capture.settings import get_settings

    try:
        report = asyncio.run(run_demo_traffic(count=count, seed=seed, settings=get_settings()))
    except db.DatabaseNotMigratedError as exc:
        _fail_bad_input(exc)
    _print_demo_traffic(report)


def _print_demo_traffic(report: object) -> None:
    from rich.table import Table

    from capture.demo_traffic import DemoTrafficReport

    assert isinstance(report, DemoTrafficReport)
    stats = report.stats
    console.print(
        f"sent [bold]{report.sent}[/bold] prompts in {report.seconds:.2f} s "
        f"(classifier agrees with the demo labels on {report.agreement:.0%}); "
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


# --------------------------------------------------------------------------- simulator (F)


@app.command("simulate")
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
        int | None, typer.Option("--max-intents", help="Only the first N intents (quick runs).")
    ] = None,
    exclude_label: Annotated[
        list[str] | None, typer.Option("--exclude-label", help="Dropped labels (default oos).")
    ] = None,
    reference: Annotated[
        bool, typer.Option("--reference/--no-reference", help="Also train on all labels.")
    ] = False,
    hyperparameters: Annotated[
        str | None,
        typer.Option(
            "--hyperparameters", help='TrainConfig fields as JSON, e.g. {"max_steps": 50}.'
        ),
    ] = None,
    max_pairs: Annotated[int, typer.Option("--max-pairs", min=0)] = 2000,
    quantize: Annotated[bool, typer.Option("--quantize/--no-quantize")] = True,
) -> None:
    """Simulate weeks of the learning loop through the real service and flows; compare review
    strategies (CSV + PNG + table under --output)."""
    _prefect_env()
    import json

    from tasks.simulate import SimulationError, check_strategies

    try:
        params = json.loads(hyperparameters) if hyperparameters else None
    except json.JSONDecodeError as exc:
        _fail_bad_input(ValueError(f"--hyperparameters: expected a JSON object ({exc.msg})"))
        return
    for name in ("train.jsonl", "test.jsonl"):
        if not (dataset / name).is_file():
            _fail_bad_input(
                SimulationError(f"--dataset {dataset}: expected {name} in it, found none")
            )
    try:
        if strategy:
            check_strategies(strategy)
    except SimulationError as exc:
        _fail_bad_input(exc)
        return
    from flows.simulate import simulate_flow

    try:
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
    except SimulationError as exc:
        _fail_bad_input(exc)
        return
    typer.echo(result["table"])
    console.print(
        f"best strategy: [bold]{result['best']}[/bold]; CSV {result['csv']}; plot {result['png']}",
        highlight=False,
    )


def main() -> None:
    app()
