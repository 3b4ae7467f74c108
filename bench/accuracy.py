"""Accuracy benchmark: frozen MiniLM + logistic regression vs the default training, on CLINC150
and HWU64 side by side, full data and few-shot (8 examples per label), in the same run.

Each domain is trained on train.jsonl, selected and calibrated on val.jsonl, scored on
test.jsonl (folders ``<datasets>/<domain>``, rows ``{"text", "label"}``; CLINC150's
out-of-scope rows are labelled ``oos``):

    nice -n 19 .venv/bin/python -m bench.accuracy [--domains clinc150,hwu64]
        [--regimes full,few-shot] [--shots 8] [--datasets ../shared/datasets]
        [--device auto] [--threads N] [--work /tmp/bench-accuracy] [--json out.json]
        [--cache /tmp/bench-accuracy/frozen.npz] [--no-results]

Baseline (frozen+LR): the bundled all-MiniLM-L6-v2, frozen, L2-normalised embeddings,
multinomial logistic regression on the in-scope training rows with C chosen on validation
(closed-set accuracy) from 1, 3, 10, 30, 100, a temperature fitted on validation, the OOS
threshold chosen on val by the same rule as the trained model (balanced accuracy).
Trained: ``tasks.train.train_model`` with the default ``TrainConfig`` (``--device`` and
``--threads`` aside); the other heads built by the same run (``TrainResult.candidate_heads``)
are scored too, for the choice of the default head.
Reported per domain and regime: closed-set in-scope accuracy (arg-max over in-scope intents)
and its delta, ECE (after calibration, in-scope test rows), 151-way joint accuracy and OOS
recall on CLINC150, the training's wall time and CPU seconds (user + system of this process,
all threads) and the load average (the 2-core machine is shared). A section is appended to
bench/RESULTS.md unless ``--no-results``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tasks.calibration import choose_oos_threshold, fit_temperature, softmax
from tasks.evaluate import (
    TorchModel,
    bundled_base_model,
    compute_report,
    encode_texts,
    load_encoder,
)
from tasks.records import Record, load_records
from tasks.train import TrainConfig, fit_logreg_head, train_model

logger = logging.getLogger("bench.accuracy")
DEFAULT_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
DOMAINS = ("clinc150", "hwu64")
REGIMES = ("full", "few-shot")
OOS = "oos"
C_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
KEYS = ("closed_set_accuracy", "in_scope_accuracy", "oos_recall", "accuracy", "macro_f1", "ece")


def few_shot(records: list[Record], shots: int, seed: int) -> list[Record]:
    rng = random.Random(seed)
    by_label: dict[str, list[Record]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    return [
        r
        for lab in sorted(by_label)
        for r in rng.sample(by_label[lab], min(shots, len(by_label[lab])))
    ]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _score(
    labels: list[str],
    probs: Callable[[list[Record]], np.ndarray],
    val: list[Record],
    test: list[Record],
) -> dict[str, Any]:
    threshold = choose_oos_threshold(probs(val), labels, [r.label for r in val], OOS)
    report = compute_report(
        labels, probs(test), [r.label for r in test], oos_label=OOS, oos_threshold=threshold
    )
    return {**{k: getattr(report, k) for k in KEYS}, "threshold": threshold}


def baseline(
    train: list[Record],
    val: list[Record],
    test: list[Record],
    emb: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Frozen embeddings + LR on in-scope rows, C chosen on val (closed-set accuracy), a
    temperature fitted on val; OOS threshold on val."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    rows = [r for r in train if r.label != OOS]
    labels = sorted({r.label for r in rows})
    index = {lab: i for i, lab in enumerate(labels)}
    x = np.stack([emb[r.text] for r in rows])
    y = np.array([index[r.label] for r in rows])
    val_in = [r for r in val if r.label in index]
    x_val = np.stack([emb[r.text] for r in val_in])
    y_val = np.array([index[r.label] for r in val_in])
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    for c in C_GRID:
        W, b = fit_logreg_head(x, y, len(labels), c=c, seed=0)
        acc = float(np.mean((x_val @ W.T + b).argmax(axis=1) == y_val))
        if best is None or acc > best[0]:
            best = (acc, c, W, b)
    assert best is not None
    _, c_best, W, b = best
    temperature = fit_temperature(x_val @ W.T + b, y_val)

    def probs(records: list[Record]) -> np.ndarray:
        return softmax((np.stack([emb[r.text] for r in records]) @ W.T + b) / temperature)

    return {
        **_score(labels, probs, val, test),
        "C": c_best,
        "temperature": temperature,
        "train_s": time.perf_counter() - t0,
        "cpu_s": cpu_seconds() - c0,
    }


def trained(
    train: list[Record], val: list[Record], test: list[Record], out: Path, config: TrainConfig
) -> dict[str, Any]:
    """The default training on ``train``; test scores of the published head and of every
    candidate head of the same run."""
    if out.exists():
        shutil.rmtree(out)
    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = train_model(train, val, out, config=config)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    load_after = os.getloadavg()[0]
    model = TorchModel.load(out)
    test_emb = dict(zip((r.text for r in test), model.embed([r.text for r in test]), strict=False))
    val_emb = dict(zip((r.text for r in val), model.embed([r.text for r in val]), strict=False))
    emb = {**test_emb, **val_emb}
    heads: dict[str, dict[str, Any]] = {}
    for name, cand in result.candidate_heads.items():
        W, b, t = cand.head.weight, cand.head.bias, cand.temperature

        def probs(records: list[Record], W: Any = W, b: Any = b, t: float = t) -> np.ndarray:
            return softmax((np.stack([emb[r.text] for r in records]) @ W.T + b) / t)

        heads[name] = _score(result.labels, probs, val, test)
    return {
        **heads[config.head],
        "head": config.head,
        "heads": heads,
        "train_s": seconds,
        "cpu_s": cpu,
        "fine_tune_s": result.train_seconds,
        "steps": result.steps,
        "fine_tune_texts": result.metrics.get("fine_tune_texts"),
        "temperature": result.temperature,
        "device": result.metrics.get("device"),
        "loadavg": [round(load_before, 1), round(load_after, 1)],
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per (regime, domain): frozen+LR vs trained, side by side."""
    header = (
        f"{'regime':<10}{'domain':<10}{'rows':>6}{'frozen+LR':>10}{'C':>5}{'trained':>9}"
        f"{'delta':>7}{'ECE f/t':>13}{'joint f/t':>14}{'steps':>6}{'wall s':>8}{'CPU s':>8}"
        f"  heads (closed-set: logreg / cosine / ensemble)"
    )
    lines = [header]
    for key, r in results.items():
        regime, domain = key.split("/")
        f, t = r["frozen_lr"], r["trained"]
        delta = 100 * (t["closed_set_accuracy"] - f["closed_set_accuracy"])
        heads = " / ".join(
            _pct(t["heads"][h]["closed_set_accuracy"]) if h in t["heads"] else "-"
            for h in ("logreg", "cosine", "ensemble")
        )
        lines.append(
            f"{regime:<10}{domain:<10}{r['train_rows']:>6}"
            f"{_pct(f['closed_set_accuracy']):>10}{f['C']:>5g}{_pct(t['closed_set_accuracy']):>9}"
            f"{delta:>+7.2f}{f['ece']:>7.3f}/{t['ece']:.3f}"
            f"{_pct(f['accuracy']):>8}/{_pct(t['accuracy'])}"
            f"{t['steps']:>6}{t['train_s']:>8.0f}{t['cpu_s']:>8.0f}  {heads}"
        )
    return "\n".join(lines)


def append_results(path: Path, command: str, body: str) -> None:
    """Append a dated section to bench/RESULTS.md."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (
        f"\n## Model accuracy (CLINC150 and HWU64) — bench/accuracy.py — {stamp}\n\n"
        f"`{command}`  \n{os.cpu_count()} CPUs, load average at the end {load}\n\n"
        f"```\n{body}\n```\n"
    )
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)


def frozen_embeddings(texts: list[str], cache: Path | None) -> dict[str, np.ndarray]:
    """Base-model embeddings of ``texts``, reusing those stored in ``cache`` (an .npz)."""
    known: dict[str, np.ndarray] = {}
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            known = dict(zip(data["texts"].tolist(), data["emb"], strict=True))
    missing = [t for t in texts if t not in known]
    if missing:
        logger.info("embedding %d texts with the frozen base model", len(missing))
        encoder = load_encoder(bundled_base_model(), max_seq_length=TrainConfig().max_seq_length)
        known.update(zip(missing, encode_texts(encoder, missing), strict=True))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            keys = sorted(known)
            np.savez(cache, texts=np.array(keys), emb=np.stack([known[k] for k in keys]))
    return {t: known[t] for t in texts}


def _choices(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if v not in allowed]
    if bad or not chosen:
        raise SystemExit(f"{option}: expected some of {', '.join(allowed)}, found {value!r}")
    return chosen


def run_domain(
    domain: str, regimes: list[str], args: argparse.Namespace, config: TrainConfig
) -> dict[str, dict[str, Any]]:
    """Frozen+LR and the default training on one domain, for each regime."""
    data = args.datasets / domain
    train = load_records(data / "train.jsonl")
    val = load_records(data / "val.jsonl")
    test = load_records(data / "test.jsonl")
    shots = few_shot(train, args.shots, args.seed)
    sets = {"full": train, "few-shot": shots}
    needed = sorted({r.text for name in regimes for r in (*sets[name], *val, *test)})
    cache = args.cache or args.work / f"frozen-{domain}.npz"
    emb = frozen_embeddings(needed, cache)
    out: dict[str, dict[str, Any]] = {}
    for regime in regimes:
        rows = sets[regime]
        logger.info("%s, %s: %d training rows", domain, regime, len(rows))
        out[f"{regime}/{domain}"] = {
            "train_rows": len(rows),
            "frozen_lr": baseline(rows, val, test, emb),
            "trained": trained(rows, val, test, args.work / domain / regime, config),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--domains", default=",".join(DOMAINS), help="Comma-separated.")
    parser.add_argument("--regimes", default=",".join(REGIMES), help="full, few-shot.")
    parser.add_argument("--shots", type=int, default=8, help="Examples per label, few-shot.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-accuracy"))
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(__file__).with_name("RESULTS.md"),
        help="Markdown file the section is appended to.",
    )
    parser.add_argument("--no-results", action="store_true", help="Append nothing.")
    parser.add_argument(
        "--cache", type=Path, default=None, help="An .npz caching the frozen base embeddings."
    )
    args = parser.parse_args()
    domains = _choices(args.domains, DOMAINS, "--domains")
    regimes = _choices(args.regimes, REGIMES, "--regimes")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = TrainConfig(device=args.device, torch_threads=args.threads)

    results: dict[str, dict[str, Any]] = {}
    for domain in domains:
        results.update(run_domain(domain, regimes, args, config))
    ordered = {f"{g}/{d}": results[f"{g}/{d}"] for g in regimes for d in domains}
    table = format_table(ordered)
    sys.stdout.write(table + "\n")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"config": config.__dict__, "results": ordered}, indent=2),
            encoding="utf-8",
        )
    if not args.no_results:
        append_results(args.results, "python -m bench.accuracy " + " ".join(sys.argv[1:]), table)


if __name__ == "__main__":
    main()
