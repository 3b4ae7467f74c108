"""``prompt-capture`` commands on model directories and the registry: train, evaluate,
export-onnx, convert-to-pairs, models, deploy, rollback. They run without Prefect (no flow
run, no API server)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from deployments.cli_support import (
    CLI_LOCK_TIMEOUT_S,
    AsJson,
    LockTimeout,
    OptionError,
    Seed,
    add_commands,
    command,
    console,
    percent,
    print_json,
    require_file,
    require_home,
    require_model_dir,
    require_new_file,
)

if TYPE_CHECKING:
    from capture.pointers import CandidatePointer
    from tasks.deploy import DeployResult
    from tasks.evaluate import EvalReport
    from tasks.registry import ModelEntry


@command("train")
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
        int | None,
        typer.Option(
            "--max-pairs",
            min=0,
            help="Fine-tune on the texts of at most this many pairs (default: all).",
        ),
    ] = None,
    seed: Seed = 0,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", min=1, help="Cap on optimiser steps (quick runs)."),
    ] = None,
    device: Annotated[
        str,
        typer.Option("--device", help="auto (CUDA when available, else CPU), cpu or cuda."),
    ] = "auto",
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
    config = TrainConfig(
        seed=seed,
        max_pairs=max_pairs,
        max_steps=max_steps,
        device=device,  # type: ignore[arg-type]
    )
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
            f"validation: accuracy {percent(val_metrics['accuracy'])}, "
            f"macro-F1 {percent(val_metrics['macro_f1'])}, ECE {val_metrics['ece']:.4f}"
        )


@command("evaluate")
def evaluate_cmd(
    *,
    model: Annotated[Path, typer.Option("--model", help="Model directory.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled JSONL ({text, label} per line).")],
    as_json: AsJson = False,
    backend: Annotated[
        str, typer.Option("--backend", help="auto (ONNX if exported), torch, onnx.")
    ] = "auto",
) -> None:
    """Score a model directory: accuracy, macro-F1, ECE, in-scope accuracy, OOS recall."""
    import json

    from capture.settings import get_settings
    from tasks.evaluate import evaluate_model
    from tasks.records import load_records

    if backend not in ("auto", "torch", "onnx"):
        raise OptionError(f"--backend: expected auto, torch or onnx, found {backend!r}")
    require_model_dir(model, "--model")
    rows = load_records(data, min_labels=1)
    settings = get_settings()  # latency as the service would serve: its threads, fast path
    report = evaluate_model(
        model,
        rows,
        backend=backend,  # type: ignore[arg-type]
        serving_threads=settings.onnx_threads,
        fast_path=settings.fast_path,
    )
    if as_json:
        typer.echo(json.dumps(report.to_dict(details=False)))
        return
    console.print(evaluation_line(report))
    if report.latency_ms_p50 is not None and report.latency_ms_p99 is not None:
        source = report.latency_source or ""
        if source.startswith("temporary"):
            source += ", deleted: the directory has no model.onnx (`prompt-capture export-onnx`)"
        console.print(
            f"serving latency: p50 {report.latency_ms_p50:.2f} ms, p99 "
            f"{report.latency_ms_p99:.2f} ms, 1 prompt at a time ({source})"
        )
    for true, pred, count in report.confusions[:5]:
        console.print(f"  confused {true} -> {pred}: {count}")


def evaluation_line(report: EvalReport) -> str:
    """``evaluate``'s first line: every accuracy, F1 and recall a percent with 2 decimals
    (``-``: no row to score it on, e.g. no ``oos`` row), the ECE a number."""
    return (
        f"n={report.n} accuracy={percent(report.accuracy)} macro_f1={percent(report.macro_f1)} "
        f"ece={report.ece:.4f} in_scope_accuracy={percent(report.in_scope_accuracy)} "
        f"oos_recall={percent(report.oos_recall)} ({report.backend})"
    )


@command("export-onnx")
def export_onnx_cmd(
    *,
    model: Annotated[Path, typer.Option("--model", help="Trained model directory.")],
    fp32: Annotated[
        bool, typer.Option("--fp32", help="Publish the fp32 graph: no int8 quantisation.")
    ] = False,
    val: Annotated[
        Path | None,
        typer.Option(
            "--val",
            help="Labelled JSONL whose texts are the parity check's (default: built-in prompts).",
        ),
    ] = None,
    as_json: AsJson = False,
    lock_timeout: LockTimeout = CLI_LOCK_TIMEOUT_S,
) -> None:
    """Export a model directory to ONNX for serving (int8 when it passes the parity gate).

    Writes model.onnx and tokenizer.json into the directory and the export report under
    "export" in its metrics.json (with PROMPT_CAPTURE_FAST_PATH on, the fast path too, as the
    deploy flow builds it). A registry version that serves keeps its file.
    """
    from rich.markup import escape

    from capture.model_dir import MODEL_FILE, TOKENIZER_FILE
    from capture.settings import get_settings
    from tasks.deploy import export_model
    from tasks.retrain import METRICS_FILE

    require_model_dir(model, "--model")
    settings = get_settings()
    done = export_model(
        model,
        quantize=not fp32,
        validation_data=require_file(val, "--val") if val is not None else None,
        models_dir=settings.models_dir,
        settings=settings,
        lock_timeout=lock_timeout,
    )
    report, fast = done.onnx, done.fast_path
    if as_json:
        print_json(
            {"export": report.to_dict(), "fast_path": fast.to_dict() if fast is not None else None}
        )
        return
    quantization = f", {report.int8_recipe}" if report.int8_recipe else ""
    console.print(
        f"exported version [bold]{report.version}[/bold] to ONNX {report.published}"
        f"{quantization} in {report.seconds:.0f}s"
    )
    for path, what in (
        (model / MODEL_FILE, f"{report.published_size_bytes / 1e6:.1f} MB"),
        (model / TOKENIZER_FILE, "the serving tokenizer"),
        (model / METRICS_FILE, 'this report, under "export"'),
    ):
        console.print(f"  wrote {path} ({what})", markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"  parity with the torch model on {report.n_validation} texts: top-1 agreement "
        f"{report.agreement:.4f}, max prob diff {report.max_abs_prob_diff:.2e} "
        f"(fp32 graph: {report.fp32_agreement:.4f}, {report.fp32_max_abs_prob_diff:.2e})"
    )
    if fp32:
        console.print("  int8 not tried (--fp32)")
    elif report.fallback_reason:
        console.print(f"  [yellow]int8 not published:[/] {escape(report.fallback_reason)}")
    else:
        console.print(
            f"  int8 parity gate passed: agreement {report.int8_agreement:.4f} >= "
            f"{report.min_agreement}"
        )
    if fast is not None:
        state = "built" if fast.published else "not built"
        console.print(
            f"  fast path {state}: {escape(fast.reason)}", highlight=False, soft_wrap=True
        )


@command("convert-to-pairs")
def convert_to_pairs_cmd(
    *,
    input_path: Annotated[Path, typer.Option("--input", help="Labelled JSONL ({text, label}).")],
    output: Annotated[Path, typer.Option("--output", help="Pairs JSONL to write.")],
    max_pairs: Annotated[
        int | None,
        typer.Option("--max-pairs", min=0, help="Pair budget (default: one per example)."),
    ] = None,
    seed: Seed = 0,
    negatives: Annotated[
        bool, typer.Option("--negatives", help="Add a negative to every pair.")
    ] = False,
) -> None:
    """Build balanced same-intent contrastive pairs from labelled records."""
    from tasks.pairs import build_pairs, write_pairs
    from tasks.records import load_records

    require_new_file(output, "--output")
    rows = load_records(input_path)
    budget = max_pairs if max_pairs is not None else len(rows)
    pairs = build_pairs(rows, max_pairs=budget, seed=seed, with_negatives=negatives)
    write_pairs(output, pairs)
    console.print(f"wrote {len(pairs)} pairs to {output}")


@command("models")
def models_cmd(as_json: AsJson = False) -> None:
    """List the registry's versions, their metrics, which one serves, and the candidate under
    A/B test (its mode and, for a canary, its share of users)."""
    from rich.table import Table

    from capture.settings import get_settings
    from tasks.registry import list_models

    settings = get_settings()
    require_home(settings)
    models_dir = settings.models_dir
    entries = list_models(models_dir)
    if as_json:
        print_json(
            [
                {
                    "version": e.version,
                    "serving": e.serving,
                    "candidate": None if e.candidate is None else _test_of(e.candidate),
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
        if models_dir.is_dir():
            console.print(f"no models in {models_dir}")
        else:
            console.print(f"no registry at {models_dir}: `prompt-capture init` sets one up")
        return
    table = Table(title=f"models in {models_dir}")
    for column in ("", "version", "gate", "accuracy", "champion acc", "train rows", "created"):
        table.add_column(column)
    for e in entries:
        evaluation = e.metrics.get("evaluation", {}).get("all", {})
        acc = (evaluation.get("challenger") or {}).get("accuracy")
        old = (evaluation.get("champion") or {}).get("accuracy")
        table.add_row(
            _status(e),
            e.version,
            e.gate or "-",
            percent(acc),
            percent(old),
            str(e.training.get("n_train", "-")),
            (e.created_at or "")[:19],
        )
    console.print(table)


def _test_of(pointer: CandidatePointer) -> dict[str, object]:
    """The A/B test a version is under, as ``models --json`` gives it."""
    return {"mode": pointer.mode, "share": pointer.share}


def _status(entry: ModelEntry) -> str:
    """The first cell of a version's row: serving, the candidate's test, or not exported."""
    if entry.serving:
        return "[bold green]serving[/]"
    if (test := entry.candidate) is not None:
        share = f" {percent(test.share)} of users" if test.mode == "canary" else ""
        return f"[bold yellow]candidate[/]: {test.mode}{share}"
    return "" if entry.deployable else "not exported"


@command("deploy")
def deploy_cmd(
    version: Annotated[str, typer.Argument(help="Registry version to serve (exported to ONNX).")],
    force: Annotated[
        bool, typer.Option("--force", help="Deploy even while an A/B candidate is under test.")
    ] = False,
    allow_rejected: Annotated[
        bool, typer.Option("--allow-rejected", help="Deploy a version the gate rejected.")
    ] = False,
    lock_timeout: LockTimeout = CLI_LOCK_TIMEOUT_S,
) -> None:
    """Serve VERSION (atomic switch; running services hot-reload): rollback's forward twin.

    Refused while an A/B candidate is under test unless --force. A version without model.onnx
    is refused: export it first with `prompt-capture export-onnx --model DIR`.
    """
    from capture.settings import get_settings
    from tasks.deploy import switch_serving

    result = switch_serving(
        get_settings().models_dir,
        version,
        action="deploy",
        force=force,
        allow_rejected=allow_rejected,
        lock_timeout=lock_timeout,
    )
    _print_switch(result)


@command("rollback")
def rollback_cmd(
    to: Annotated[
        str | None, typer.Option("--to", help="Version to serve (default: the previous one).")
    ] = None,
    lock_timeout: LockTimeout = CLI_LOCK_TIMEOUT_S,
) -> None:
    """Serve the previous good version again (atomic switch; running services hot-reload)."""
    from capture.settings import get_settings
    from tasks.deploy import switch_serving

    models_dir = get_settings().models_dir
    _print_switch(switch_serving(models_dir, to, action="rollback", lock_timeout=lock_timeout))


def _print_switch(result: DeployResult) -> None:
    if result.previous == result.version:
        console.print(f"version [bold]{result.version}[/bold] serves already; nothing changed")
    else:
        console.print(f"now serving version [bold]{result.version}[/bold] (was {result.previous})")
    if result.candidate_cleared is not None:
        console.print(f"candidate {result.candidate_cleared} is no longer under test: it serves")
    if result.candidate_kept is not None:
        console.print(
            f"[yellow]candidate {result.candidate_kept} stays under test[/], now beside "
            f"version {result.version}"
        )


def register(app: typer.Typer) -> None:
    """Add the model and registry commands to ``app``."""
    add_commands(app, __name__)
