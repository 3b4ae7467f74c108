"""``prompt-capture`` commands on model directories and the registry: train, evaluate,
convert-to-pairs, models, rollback. They run without Prefect."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from deployments.cli_support import OptionError, console, print_json

logger = logging.getLogger(__name__)


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

    train_rows = load_records(train)
    val_rows = load_records(val, min_labels=1) if val is not None else None
    extra = read_pairs(pairs) if pairs is not None else None
    config = TrainConfig(seed=seed, max_pairs=max_pairs, max_steps=max_steps)
    result = train_model(
        train_rows, val_rows, output, config=config, base_model=base_model, extra_pairs=extra
    )
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
        raise OptionError(f"--backend: expected auto, torch or onnx, found {backend!r}")
    rows = load_records(data, min_labels=1)
    report = evaluate_model(model, rows, backend=backend)  # type: ignore[arg-type]
    if as_json:
        typer.echo(json.dumps(report.to_dict(details=False)))
        return
    console.print(
        f"n={report.n} accuracy={report.accuracy:.4f} macro_f1={report.macro_f1:.4f} "
        f"ece={report.ece:.4f} in_scope_accuracy={report.in_scope_accuracy} "
        f"oos_recall={report.oos_recall} latency_ms_p50={report.latency_ms_p50} "
        f"({report.backend})"
    )
    for true, pred, count in report.confusions[:5]:
        console.print(f"  confused {true} -> {pred}: {count}")


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

    rows = load_records(input_path)
    budget = max_pairs if max_pairs is not None else len(rows)
    pairs = build_pairs(rows, max_pairs=budget, seed=seed, with_negatives=negatives)
    write_pairs(output, pairs)
    console.print(f"wrote {len(pairs)} pairs to {output}")


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
        print_json(
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


def rollback_cmd(
    to: Annotated[
        str | None, typer.Option("--to", help="Version to serve (default: the previous one).")
    ] = None,
) -> None:
    """Serve the previous good version again (atomic switch; running services hot-reload)."""
    from capture.settings import get_settings
    from tasks.registry import rollback

    previous, now = rollback(get_settings().models_dir, to)
    console.print(f"now serving version [bold]{now}[/bold] (was {previous})")


def register(app: typer.Typer) -> None:
    """Add the model and registry commands to ``app``."""
    app.command("train")(train_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("convert-to-pairs")(convert_to_pairs_cmd)
    app.command("models")(models_cmd)
    app.command("rollback")(rollback_cmd)
