"""Accuracy benchmark on CLINC150: frozen MiniLM + logistic regression vs the default training.

Both are measured in the same run, on full data and few-shot (8 examples per label), trained on
train.jsonl, selected/calibrated on val.jsonl, scored on test.jsonl:

    .venv/bin/python -m bench.accuracy [--data ../shared/datasets/clinc150] [--shots 8]
        [--skip-full] [--skip-few-shot] [--work /tmp/bench-accuracy] [--json out.json]
        [--cache /tmp/bench-accuracy/frozen.npz]

Baseline: the bundled all-MiniLM-L6-v2, frozen, L2-normalised embeddings, multinomial logistic
regression (C=10) on the in-scope training rows, its raw probabilities (no temperature), the OOS
threshold chosen on val by the same rule as the trained model (balanced accuracy).
Trained: ``tasks.train.train_model`` with the default ``TrainConfig``.
Reported: closed-set in-scope accuracy (arg-max over in-scope intents), in-scope accuracy and OOS
recall with the threshold, 151-way joint accuracy, macro-F1, ECE, wall-clock training time (and
the load average, since the 2-core machine is shared).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tasks.evaluate import (
    TorchModel,
    bundled_base_model,
    choose_oos_threshold,
    compute_report,
    encode_texts,
    load_encoder,
    softmax,
)
from tasks.records import Record, load_records
from tasks.train import TrainConfig, fit_logreg_head, train_model

logger = logging.getLogger("bench.accuracy")
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "clinc150"
OOS = "oos"
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


def baseline(
    train: list[Record],
    val: list[Record],
    test: list[Record],
    emb: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Frozen embeddings + LR (C=10) on in-scope rows; threshold on val."""
    t0 = time.perf_counter()
    rows = [r for r in train if r.label != OOS]
    labels = sorted({r.label for r in rows})
    index = {lab: i for i, lab in enumerate(labels)}
    x = np.stack([emb[r.text] for r in rows])
    y = np.array([index[r.label] for r in rows])
    W, b = fit_logreg_head(x, y, len(labels), c=10.0, seed=0)
    seconds = time.perf_counter() - t0

    def probs(records: list[Record]) -> np.ndarray:
        return softmax(np.stack([emb[r.text] for r in records]) @ W.T + b)

    threshold = choose_oos_threshold(probs(val), labels, [r.label for r in val], OOS)
    report = compute_report(
        labels, probs(test), [r.label for r in test], oos_label=OOS, oos_threshold=threshold
    )
    return {**{k: getattr(report, k) for k in KEYS}, "train_s": seconds, "threshold": threshold}


def trained(
    train: list[Record], val: list[Record], test: list[Record], out: Path
) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = train_model(train, val, out, config=TrainConfig())
    seconds = time.perf_counter() - t0
    load_after = os.getloadavg()[0]
    model = TorchModel.load(out)
    report = compute_report(
        model.labels,
        model.predict_proba([r.text for r in test]),
        [r.label for r in test],
        oos_label=OOS,
        oos_threshold=model.oos_threshold,
    )
    return {
        **{k: getattr(report, k) for k in KEYS},
        "train_s": seconds,
        "fine_tune_s": result.train_seconds,
        "steps": result.steps,
        "threshold": model.oos_threshold,
        "temperature": model.temperature,
        "val_ece_before_calibration": result.metrics.get("val_ece_before_calibration"),
        "loadavg": [round(load_before, 1), round(load_after, 1)],
    }


def format_rows(title: str, base: dict[str, Any], new: dict[str, Any]) -> str:
    lines = [f"{title}", f"{'metric':<22}{'frozen+LR':>12}{'trained':>12}{'delta':>10}"]
    for key in KEYS:
        a, b = base[key], new[key]
        if a is None or b is None:
            continue
        lines.append(f"{key:<22}{a:>12.4f}{b:>12.4f}{b - a:>+10.4f}")
    err_a = 1 - base["closed_set_accuracy"]
    err_b = 1 - new["closed_set_accuracy"]
    lines.append(f"closed-set error ratio (trained / frozen+LR): {err_b / err_a:.2f}")
    lines.append(
        f"training wall time: {new['train_s']:.0f}s, {new['steps']} steps "
        f"(load average {new['loadavg'][0]} -> {new['loadavg'][1]}); "
        f"T={new['temperature']:.3f}, OOS threshold={new['threshold']}"
    )
    return "\n".join(lines)


def append_results(path: Path, command: str, sections: list[str]) -> None:
    """Append a dated section to bench/RESULTS.md."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    body = "\n\n".join(sections)
    text = (
        f"\n## Model accuracy (CLINC150) — bench/accuracy.py — {stamp}\n\n"
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
            keys = sorted(known)
            np.savez(cache, texts=np.array(keys), emb=np.stack([known[k] for k in keys]))
    return {t: known[t] for t in texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--skip-few-shot", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-accuracy"))
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(__file__).with_name("RESULTS.md"),
        help="Markdown file the section is appended to.",
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="An .npz caching the frozen base embeddings."
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    train = load_records(args.data / "train.jsonl")
    val = load_records(args.data / "val.jsonl")
    test = load_records(args.data / "test.jsonl")
    shots = few_shot(train, args.shots, args.seed)

    needed = sorted({r.text for r in (*(shots if args.skip_full else train), *val, *test)})
    emb = frozen_embeddings(needed, args.cache)

    results: dict[str, Any] = {"loadavg_start": os.getloadavg()[0]}
    sections: list[str] = []
    if not args.skip_full:
        results["full"] = {
            "frozen_lr": baseline(train, val, test, emb),
            "trained": trained(train, val, test, args.work / "full"),
        }
        sections.append(
            format_rows(
                f"full data ({len(train)} train rows)",
                results["full"]["frozen_lr"],
                results["full"]["trained"],
            )
        )
        print(sections[-1])
    if not args.skip_few_shot:
        results["few_shot"] = {
            "shots": args.shots,
            "frozen_lr": baseline(shots, val, test, emb),
            "trained": trained(shots, val, test, args.work / "few_shot"),
        }
        sections.append(
            format_rows(
                f"{args.shots} examples per label ({len(shots)} train rows)",
                results["few_shot"]["frozen_lr"],
                results["few_shot"]["trained"],
            )
        )
        print(sections[-1])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    if args.results is not None and sections:
        append_results(args.results, "python -m bench.accuracy " + " ".join(sys.argv[1:]), sections)


if __name__ == "__main__":
    main()
