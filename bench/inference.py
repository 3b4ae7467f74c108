"""Serving benchmark: sentence-transformers torch vs ONNX Runtime fp32 vs ONNX int8, same run.

    .venv/bin/python -m bench.inference [--model DIR] [--threads 1 2] [--per-intent 40]
        [--n-single 300] [--n-batches 15] [--rounds 5] [--agreement-limit 0] [--work DIR]
        [--no-results]

Baseline: ``SentenceTransformer.encode`` (torch) + the same linear head, temperature and softmax
in numpy. Candidates: :class:`capture.classifier.OnnxClassifier` over the fp32 and the int8
export of the same model directory (``tasks.export_onnx.export_onnx``; the int8 file is exported
with the gate off so that it can be measured, and the gate verdict is reported separately).

Measured, tokenisation included, for each ``--threads`` value (intra-op threads, the same for
every backend): single-prompt latency p50/p99 (``predict`` of one prompt at a time) and batch-64
throughput. The backends take turns: ``--rounds`` rounds, each timing a share of the prompts and
batches on every backend in turn, so a slow spell of this shared machine falls on all of them
alike. Then top-1 agreement with the torch model on CLINC150 val+test texts (batched, and one
prompt at a time, the serving case) and top-1 accuracy against the gold labels.

Model: ``--model DIR`` (a trained model directory: encoder/, head.npz, metadata.json), otherwise
the bundled all-MiniLM-L6-v2 with a logistic-regression head (C=10) fit on frozen embeddings of
``--per-intent`` in-scope CLINC150 training rows per intent.

Targets (issue 3): p50 >= 12x faster than torch, batch-64 throughput >= 4x, agreement >= 99%.
A section with the date, the command and the table is appended to bench/RESULTS.md.

``--fast-path`` adds the cascade (issue 17): ``tasks.fast_path.build_fast_path`` on the int8
export (head fitted on the ``--data`` train split, threshold on its val split), served by
``OnnxClassifier(..., fast_path=True)`` and timed in the same rounds. Its quality is measured on
the test split only (val fitted the threshold): top-1 agreement of the served intent with the
int8 model alone (one prompt at a time), and the share of prompts the fast path answers.
Targets: p50 >= 25x torch, agreement with int8 >= 99.5%, p99 <= int8 p99 + 10%. Run it once per
domain (``--data .../clinc150 --model DIR``, ``--data .../hwu64 --model DIR``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import os
import platform
import random
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("bench.inference")
REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__ and sys.path[0] == str(REPO / "bench"):
    # Run as a script: bench/ is first on sys.path and bench/capture.py would shadow the
    # ``capture`` package; put the repository root there instead.
    sys.path[0] = str(REPO)
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "clinc150"
RESULTS = REPO / "bench" / "RESULTS.md"
RESULTS_HEADER = (
    "# Benchmark results\n\n"
    "Each section is appended by a benchmark under bench/ (run on purpose, never in tests), "
    "with the date, the command and the machine.\n"
)
OOS = "oos"
BATCH = 64
TARGET_P50 = 12.0
TARGET_THROUGHPUT = 4.0
TARGET_AGREEMENT = 0.99
TARGET_CASCADE_P50 = 25.0
TARGET_CASCADE_AGREEMENT = 0.995
TARGET_CASCADE_P99 = 1.10  # times the int8 model's p99
CASCADE = "cascade (fast path + int8)"
# A pause before each backend's turn: the previous backend's worker threads (torch's OpenMP pool,
# ONNX Runtime's intra-op pool) spin for a while after their last task and would take the cores
# from the next backend.
SETTLE_S = 0.5
# Untimed prompts at the start of each turn: the other backends' turns pushed this one's weights
# out of the CPU caches, where a serving process that runs one model keeps them.
TURN_WARMUP = 10


@dataclass(frozen=True)
class Timing:
    """A backend's single-prompt latencies (ms) and batch-64 throughput, as timed."""

    name: str
    p50_ms: float
    p99_ms: float
    mean_ms: float
    batch_texts_per_s: float


@dataclass(frozen=True)
class Quality:
    """A backend's top-1 agreement with the torch model (batched, single prompts, single prompts
    with an in-scope gold label), in-scope accuracy and size; ``None`` where not measured."""

    agreement: float | None = None
    agreement_single: float | None = None
    agreement_single_in_scope: float | None = None
    accuracy: float | None = None
    size_mb: float | None = None


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def build_default_model(
    work: Path, data: Path, *, per_intent: int, seed: int, batch_size: int = BATCH
) -> Path:
    """Base encoder + LR head (C=10) on frozen embeddings of a per-intent training subsample."""
    from capture.model_dir import ENCODER_DIR, Head, ModelMetadata
    from tasks.evaluate import bundled_base_model, encode_texts, load_encoder
    from tasks.train import fit_logreg_head

    rows = [r for r in read_jsonl(data / "train.jsonl") if r["label"] != OOS]
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row["text"])
    rng = random.Random(seed)
    labels = sorted(by_label)
    sample = [
        (text, i)
        for i, label in enumerate(labels)
        for text in rng.sample(by_label[label], min(per_intent, len(by_label[label])))
    ]
    encoder = load_encoder(bundled_base_model())
    started = time.perf_counter()
    embeddings = encode_texts(encoder, [t for t, _ in sample], batch_size=batch_size)
    logger.info("embedded %d training texts in %.1fs", len(sample), time.perf_counter() - started)
    weight, bias = fit_logreg_head(
        embeddings, np.array([i for _, i in sample]), len(labels), c=10.0, seed=seed
    )
    model_dir = work / "model"
    model_dir.mkdir(parents=True)
    (model_dir / ENCODER_DIR).symlink_to(bundled_base_model(), target_is_directory=True)
    Head(weight, bias).write(model_dir)
    ModelMetadata(
        version=f"bench-frozen-lr-{per_intent}",
        labels=tuple(labels),
        oos_label=OOS,
        oos_threshold=None,
        temperature=1.0,
        base_model="all-MiniLM-L6-v2",
        parent_version=None,
        created_at=dt.datetime.now(dt.UTC).isoformat(),
        hyperparameters={"head": "logreg", "C": 10.0, "per_intent": per_intent, "seed": seed},
        metrics={},
        max_seq_length=int(encoder.max_seq_length),
        embedding_dim=int(weight.shape[1]),
    ).write(model_dir)
    return model_dir


def staged_copy(model_dir: Path, dest: Path) -> Path:
    """A directory that exports can write into, sharing the (read-only) encoder by symlink."""
    from capture.model_dir import ENCODER_DIR, HEAD_FILE, METADATA_FILE

    dest.mkdir(parents=True)
    (dest / ENCODER_DIR).symlink_to((model_dir / ENCODER_DIR).resolve(), target_is_directory=True)
    for name in (HEAD_FILE, METADATA_FILE):
        shutil.copy2(model_dir / name, dest / name)
    return dest


@dataclass
class Backend:
    """One thing to time: how to classify one prompt and a batch, and what to do before a turn
    (torch's thread count is process-wide, so its turn sets it)."""

    name: str
    predict_one: Callable[[str], object]
    predict_many: Callable[[list[str]], object]
    before_turn: Callable[[], None] = lambda: None


def timed_rounds(
    backends: Sequence[Backend],
    texts: Sequence[str],
    *,
    n_single: int,
    n_batches: int,
    rounds: int,
) -> list[Timing]:
    """Single-prompt latencies (ms) and batch-64 throughput of every backend, in ``rounds``
    turns: each round gives every backend its share of the prompts and of the batches."""
    if not texts:
        raise ValueError("timed_rounds: expected at least one text to time, found none")
    # Texts are reused in turn when there are fewer than n_batches * BATCH of them.
    batches = [
        [texts[(i * BATCH + j) % len(texts)] for j in range(BATCH)] for i in range(n_batches)
    ]
    single: dict[str, list[float]] = {b.name: [] for b in backends}
    batch_seconds = dict.fromkeys(single, 0.0)
    batch_count = dict.fromkeys(single, 0)
    for backend in backends:  # warm-up
        backend.before_turn()
        for text in texts[:20]:
            backend.predict_one(text)
        backend.predict_many(batches[0])
    for r in range(rounds):
        prompts = range(r * n_single // rounds, (r + 1) * n_single // rounds)
        round_batches = batches[r * n_batches // rounds : (r + 1) * n_batches // rounds]
        for backend in backends:
            backend.before_turn()
            time.sleep(SETTLE_S)
            for text in texts[:TURN_WARMUP]:  # the other backends' turns evicted its weights
                backend.predict_one(text)
            for i in prompts:
                text = texts[i % len(texts)]
                started = time.perf_counter()
                backend.predict_one(text)
                single[backend.name].append((time.perf_counter() - started) * 1000.0)
            started = time.perf_counter()
            for batch in round_batches:
                backend.predict_many(batch)
            batch_seconds[backend.name] += time.perf_counter() - started
            batch_count[backend.name] += len(round_batches)
    return [
        summarise(
            b.name, single[b.name], batch_count[b.name] * BATCH / max(batch_seconds[b.name], 1e-9)
        )
        for b in backends
    ]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summarise(name: str, times: list[float], texts_per_s: float) -> Timing:
    return Timing(
        name=name,
        p50_ms=percentile(times, 50),
        p99_ms=percentile(times, 99),
        mean_ms=statistics.fmean(times),
        batch_texts_per_s=texts_per_s,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime
    import torch

    from capture.classifier import OnnxClassifier
    from tasks.calibration import softmax
    from tasks.evaluate import TorchModel
    from tasks.export_onnx import export_onnx

    untimed_threads = os.cpu_count() or 1  # building and reference runs are not timed
    torch.set_num_threads(untimed_threads)
    data = Path(args.data)
    work = Path(args.work) / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    work.mkdir(parents=True)
    if args.model:
        model_dir = Path(args.model)
        model_source = f"--model {model_dir}"
    else:
        model_dir = build_default_model(
            work, data, per_intent=args.per_intent, seed=args.seed, batch_size=BATCH
        )
        model_source = (
            f"bundled all-MiniLM-L6-v2 + LR head (C=10) on {args.per_intent} in-scope "
            "CLINC150 train rows per intent"
        )

    eval_rows = read_jsonl(data / "val.jsonl") + read_jsonl(data / "test.jsonl")
    if args.agreement_limit:
        eval_rows = random.Random(args.seed).sample(eval_rows, args.agreement_limit)
    texts = [r["text"] for r in eval_rows]
    gold = [r["label"] for r in eval_rows]
    rng = random.Random(args.seed + 1)
    timing_texts = rng.sample(texts, min(len(texts), max(args.n_single, args.n_batches * BATCH)))
    parity_texts = random.Random(args.seed + 2).sample(texts, min(len(texts), 500))

    logger.info("exporting fp32 and int8 (gate off for measurement)")
    fp32_dir = staged_copy(model_dir, work / "fp32")
    fp32_report = export_onnx(fp32_dir, quantize=False, validation_texts=parity_texts)
    int8_dir = staged_copy(model_dir, work / "int8")
    int8_report = export_onnx(
        int8_dir, quantize=True, validation_texts=parity_texts, min_agreement=0.0
    )

    torch_model = TorchModel.load(model_dir)
    encoder = torch_model.encoder
    weight, bias, temperature = torch_model.W, torch_model.b, torch_model.temperature
    labels = torch_model.labels

    def torch_proba(batch: list[str]) -> np.ndarray:
        emb = encoder.encode(
            batch,
            batch_size=BATCH,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return softmax((emb @ weight.T + bias) / temperature)

    def torch_one(text: str) -> object:
        row = torch_proba([text])[0]
        return labels[int(row.argmax())], float(row.max())

    logger.info("torch: reference probabilities of %d texts", len(texts))
    reference = np.concatenate(
        [torch_proba(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
    )
    ref_top = reference.argmax(axis=1)
    gold_index = np.array([labels.index(g) if g in labels else -1 for g in gold])
    in_scope = gold_index >= 0
    onnx_models = (
        ("onnx fp32", fp32_dir, fp32_report),
        (f"onnx int8 (per-channel, {int8_report.int8_recipe})", int8_dir, int8_report),
    )
    cascade = build_cascade(args, data, int8_dir, untimed_threads) if args.fast_path else None

    # Quality does not depend on the thread count: measured once.
    quality = {"torch": Quality(accuracy=float(np.mean(ref_top[in_scope] == gold_index[in_scope])))}
    for name, directory, report in onnx_models:
        classifier = OnnxClassifier(directory, threads=untimed_threads)
        probs = np.concatenate(
            [classifier.predict_proba(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
        )
        single = np.array([int(classifier.predict_proba([t])[0].argmax()) for t in texts])
        quality[name] = Quality(
            agreement=float(np.mean(probs.argmax(axis=1) == ref_top)),
            accuracy=float(np.mean(probs.argmax(axis=1)[in_scope] == gold_index[in_scope])),
            agreement_single=float(np.mean(single == ref_top)),
            agreement_single_in_scope=float(np.mean((single == ref_top)[in_scope])),
            size_mb=report.published_size_bytes / 1e6,
        )
    if cascade is not None:
        quality[CASCADE] = cascade_quality(
            cascade,
            data,
            texts=texts,
            ref_top=ref_top,
            gold_index=gold_index,
            in_scope=in_scope,
            threads=untimed_threads,
        )

    runs = []
    for threads in args.threads:
        logger.info(
            "%d thread(s): %d single prompts and %d batches of %d per backend, %d rounds",
            threads,
            args.n_single,
            args.n_batches,
            BATCH,
            args.rounds,
        )
        backends = [
            Backend(
                "torch (sentence-transformers encode + head)",
                torch_one,
                torch_proba,
                functools.partial(torch.set_num_threads, threads),
            )
        ]
        for name, directory, _ in onnx_models:
            classifier = OnnxClassifier(directory, threads=threads)
            backends.append(Backend(name, classifier.predict, classifier.predict_batch))
        keys = ["torch", *(m[0] for m in onnx_models)]
        if cascade is not None:
            served = OnnxClassifier(int8_dir, threads=threads, fast_path=True)
            backends.append(Backend(CASCADE, served.predict, served.predict_batch))
            keys.append(CASCADE)
        results = timed_rounds(
            backends,
            timing_texts,
            n_single=args.n_single,
            n_batches=args.n_batches,
            rounds=args.rounds,
        )
        base = results[0]
        runs.append(
            {
                "threads": threads,
                "results": [
                    {
                        **asdict(t),
                        **asdict(quality[key]),
                        "p50_speedup": base.p50_ms / t.p50_ms,
                        "throughput_ratio": t.batch_texts_per_s / base.batch_texts_per_s,
                    }
                    for t, key in zip(results, keys, strict=True)
                ],
            }
        )
    torch.set_num_threads(untimed_threads)

    summary = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([".venv/bin/python", "bench/inference.py", *sys.argv[1:]]),
        "model": model_source,
        "threads": list(args.threads),
        "rounds": args.rounds,
        "n_agreement": len(texts),
        "n_single": args.n_single,
        "n_batches": args.n_batches,
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": os.getloadavg(),
        "int8_gate": {
            "recipe": int8_report.int8_recipe,
            "attempts": list(int8_report.int8_attempts),
            "export_agreement_on_500": int8_report.int8_agreement,
            "would_publish_int8_at_0.99": bool(
                (int8_report.int8_agreement or 0.0) >= TARGET_AGREEMENT
            ),
        },
        "runs": runs,
        "work_dir": str(work),
        "data": data.name,
        "cascade": cascade,
    }
    return summary


def build_cascade(
    args: argparse.Namespace, data: Path, int8_dir: Path, threads: int
) -> dict[str, Any]:
    """Build the fast path of the int8 export (train split: head; val split: threshold)."""
    from tasks.fast_path import build_fast_path

    logger.info("fast path: distilling and fitting on %s", data)
    report = build_fast_path(
        int8_dir,
        [r["text"] for r in read_jsonl(data / "train.jsonl")],
        [r["text"] for r in read_jsonl(data / "val.jsonl")],
        threads=threads,
    )
    logger.info("fast path: %s", report.reason)
    if not report.published:
        raise SystemExit(f"fast path not published: {report.reason}")
    return {"build": report.to_dict()}


def cascade_quality(
    cascade: dict[str, Any],
    data: Path,
    *,
    texts: list[str],
    ref_top: np.ndarray,
    gold_index: np.ndarray,
    in_scope: np.ndarray,
    threads: int,
) -> Quality:
    """Agreement with torch (as the other rows), returned; and in ``cascade["test"]``, on the
    test split: agreement of the served intent with the int8 model alone and the share answered
    by the fast path."""
    from capture.classifier import OnnxClassifier

    int8_dir = Path(cascade["build"]["model_dir"])
    alone = OnnxClassifier(int8_dir, threads=threads)
    served = OnnxClassifier(int8_dir, threads=threads, fast_path=True)
    fast = served.fast_path
    assert fast is not None
    labels = list(served.labels)

    def top(prediction_intent: str, runners: tuple[tuple[str, float], ...]) -> int:
        # The label the prediction ranks first (an OOS decision ranks its best in-scope label).
        if prediction_intent in labels:
            return labels.index(prediction_intent)
        return labels.index(runners[0][0]) if runners and runners[0][0] in labels else -1

    single = np.array([top(p.intent, p.secondary_intents) for p in map(served.predict, texts)])
    batched = np.array(
        [
            top(p.intent, p.secondary_intents)
            for i in range(0, len(texts), BATCH)
            for p in served.predict_batch(texts[i : i + BATCH])
        ]
    )
    test = [r["text"] for r in read_jsonl(data / "test.jsonl")]
    answered = [fast.predict(t) is not None for t in test]
    agree = [served.predict(t).intent == alone.predict(t).intent for t in test]
    n_answered = sum(answered)
    cascade["test"] = {
        "n": len(test),
        "agreement_with_int8": float(np.mean(agree)),
        "share_answered": n_answered / len(test),
        "agreement_answered": (
            sum(a for a, f in zip(agree, answered, strict=True) if f) / n_answered
            if n_answered
            else None
        ),
        "threshold": fast.threshold,
    }
    return Quality(
        agreement=float(np.mean(batched == ref_top)),
        agreement_single=float(np.mean(single == ref_top)),
        agreement_single_in_scope=float(np.mean((single == ref_top)[in_scope])),
        accuracy=float(np.mean(single[in_scope] == gold_index[in_scope])),
        size_mb=sum((int8_dir / name).stat().st_size for name in ("model.onnx", "fast_path.npz"))
        / 1e6,
    )


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(run: dict[str, Any]) -> str:
    head = (
        "| backend | p50 ms | p99 ms | p50 speed-up | batch-64 texts/s | throughput ratio | "
        "agreement (batched) | agreement (single) | agreement (single, in-scope texts) | "
        "in-scope accuracy | size MB |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {r['name']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p50_speedup']:.1f}x | "
        f"{r['batch_texts_per_s']:.0f} | {r['throughput_ratio']:.1f}x | "
        f"{fmt(r['agreement'], '.2%')} | {fmt(r['agreement_single'], '.2%')} | "
        f"{fmt(r['agreement_single_in_scope'], '.2%')} | "
        f"{fmt(r['accuracy'], '.2%')} | {fmt(r['size_mb'], '.1f')} |"
        for r in run["results"]
    ]
    return f"{run['threads']} thread(s):\n\n" + head + "\n".join(rows) + "\n"


def cascade_verdicts(run: dict[str, Any], cascade: dict[str, Any]) -> str:
    rows = {r["name"]: r for r in run["results"]}
    if CASCADE not in rows:
        return ""
    served, int8 = rows[CASCADE], run["results"][2]
    test = cascade["test"]
    p99_ratio = served["p99_ms"] / int8["p99_ms"]
    checks = [
        (
            "cascade p50 speed-up",
            served["p50_speedup"] >= TARGET_CASCADE_P50,
            f"{served['p50_speedup']:.1f}x (target >= {TARGET_CASCADE_P50:g}x)",
        ),
        (
            "cascade top-1 agreement with int8 (test, single prompts)",
            test["agreement_with_int8"] >= TARGET_CASCADE_AGREEMENT,
            f"{test['agreement_with_int8']:.2%} on {test['n']} (target >= "
            f"{TARGET_CASCADE_AGREEMENT:.1%})",
        ),
        (
            "cascade p99 / int8 p99",
            p99_ratio <= TARGET_CASCADE_P99,
            f"{p99_ratio:.2f} ({served['p99_ms']:.2f} vs {int8['p99_ms']:.2f} ms; target <= "
            f"{TARGET_CASCADE_P99:.2f})",
        ),
    ]
    lines = [
        f"- {run['threads']} thread(s), {name}: {shown}: {'met' if ok else 'NOT met'}"
        for name, ok, shown in checks
    ]
    answered = test["agreement_answered"]
    lines.append(
        f"- share answered by the fast path (test): {test['share_answered']:.1%} at threshold "
        f"{test['threshold']:.4f}; agreement on the answered share "
        f"{fmt(answered, '.2%')}"
    )
    return "\n".join(lines)


def verdicts(run: dict[str, Any]) -> str:
    int8 = run["results"][2]
    checks = [
        ("int8 p50 speed-up", int8["p50_speedup"], TARGET_P50, f"{int8['p50_speedup']:.1f}x"),
        (
            "int8 batch-64 throughput ratio",
            int8["throughput_ratio"],
            TARGET_THROUGHPUT,
            f"{int8['throughput_ratio']:.1f}x",
        ),
        (
            "int8 top-1 agreement (single prompts)",
            int8["agreement_single"],
            TARGET_AGREEMENT,
            f"{int8['agreement_single']:.2%}",
        ),
    ]
    return "\n".join(
        f"- {run['threads']} thread(s), {name}: {shown} "
        f"(target >= {target:g}{'x' if target > 1 else ''}): "
        f"{'met' if value >= target else 'NOT met'}"
        for name, value, target, shown in checks
    )


def append_results(summary: dict[str, Any]) -> None:
    if not RESULTS.exists():
        RESULTS.write_text(RESULTS_HEADER, encoding="utf-8")
    load = ", ".join(f"{x:.2f}" for x in summary["load_average"])
    section = (
        f"\n## Inference: torch vs ONNX fp32 vs ONNX int8 ({summary['date']})\n\n"
        f"Command: `{summary['command']}`  \n"
        f"Model: {summary['model']}  \n"
        f"Threads: {', '.join(map(str, summary['threads']))} intra-op thread(s), the same for "
        f"every backend; {summary['n_single']} single prompts and {summary['n_batches']} batches "
        f"of {BATCH} per backend, in {summary['rounds']} interleaved rounds; "
        f"agreement/accuracy on {summary['n_agreement']} {summary['data']} val+test texts.  \n"
        f"Machine: {summary['cpu']}, load average {load} (shared); "
        f"torch {summary['versions']['torch']}, onnxruntime "
        f"{summary['versions']['onnxruntime']}.\n\n"
        + "\n".join(
            table(run)
            + "\n"
            + verdicts(run)
            + "\n"
            + (cascade_verdicts(run, summary["cascade"]) + "\n" if summary["cascade"] else "")
            for run in summary["runs"]
        )
    )
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write(section)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a trained model directory (default: build one)")
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help="dataset directory (train/val/test.jsonl)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1, 2],
        help="intra-op threads, the same for every backend; one timed run per value",
    )
    parser.add_argument("--per-intent", type=int, default=40, help="training rows per intent")
    parser.add_argument("--n-single", type=int, default=300, help="single prompts timed")
    parser.add_argument("--n-batches", type=int, default=15, help="batches of 64 timed")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument(
        "--agreement-limit", type=int, default=0, help="subsample val+test (0: all of them)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(REPO / "bench" / "out" / "inference"))
    parser.add_argument("--json", help="also write the summary as JSON here")
    parser.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument(
        "--fast-path", action="store_true", help="add the cascade row (fast path + int8)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.WARNING)  # quantize_dynamic logs per tensor at INFO
    for name in ("bench.inference", "tasks.export_onnx", "tasks.fast_path"):
        logging.getLogger(name).setLevel(logging.INFO)

    summary = run(args)
    for timed in summary["runs"]:
        print(table(timed))
        print(verdicts(timed))
        if summary["cascade"]:
            print(cascade_verdicts(timed, summary["cascade"]))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if not args.no_results:
        append_results(summary)
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
