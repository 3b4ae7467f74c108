"""The ``prompt-capture`` command line (typer). Heavy modules are imported inside each command."""

from __future__ import annotations

import logging
import os
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
        config = TrainConfig(seed=seed, max_pairs=max_pairs)
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


def main() -> None:
    app()
