"""Benchmark and proof of production A/B testing (docs/AB_TESTING.md). Run on purpose:

    .venv/bin/python bench/ab.py decisions [--seeds 200] [--weekly 100000] [--share 0.2]
    .venv/bin/python bench/ab.py e2e [--seeds 1] [--weekly 100000] [--share 0.2]
    .venv/bin/python bench/ab.py overhead --models DIR [--rate 200] [--calls 3000] [--url URL]

``decisions``: the canary decision over many seeds. The stand-in world: prompts arrive at
``weekly`` per week (Poisson per hour), a sticky ``share`` goes to the candidate, a workflow
succeeds exactly when the answered intent is right, so each arm's success rate is its accuracy
(champion 0.85; candidate worse by 3 points, equal, better by 2). Every hour the evidence is read
with :func:`tasks.ab_decision.canary_decision` (the function the ab-check flow applies) until it
decides or ``max_days`` pass. Reports promote / rollback / expired rates and the median prompts
(all arms) and days per decision.

``e2e``: the same world through the real path: synthetic classifiers of known accuracy behind
``NLUService`` (sticky canary routing, the capture logger, outcomes) on SQLite, and every
simulated hour :func:`tasks.ab_readout.ab_readout` + :func:`tasks.ab_candidate.apply_decision`
(the ab-check's steps, without Prefect). Slow: a few seeds.

``overhead``: with real ONNX models (``DIR``: a registry with versions 1 and 2 exported), the
request-path cost of shadow mode: ``process_message`` latency at ``rate`` requests/s with shadow
off and on (p50/p99, added), the shadow hook alone (``active()`` + ``submit()``), capture rows/s
with a trivial champion with shadow off and on, and the shadow coverage.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from capture import db
from capture.ab_routing import CandidateServing
from capture.classifier import HotReloadingClassifier
from capture.model_dir import write_candidate, write_pointer
from capture.service import create_nlu_service
from capture.settings import Settings
from capture.types import Prediction
from tasks.ab_decision import ABPlan, canary_decision

logger = logging.getLogger(__name__)

CHAMPION_ACCURACY = 0.85
SCENARIOS = (("worse by 3 points", -0.03), ("equal", 0.0), ("better by 2 points", 0.02))


# decisions


def simulate_one(
    p_champion: float, p_candidate: float, seed: int, *, weekly: int, share: float, plan: ABPlan
) -> tuple[str, int, float]:
    """One canary test read hourly: (decision, prompts seen by both arms, days)."""
    rng = np.random.default_rng(seed)
    per_hour = weekly / (7 * 24)
    sa = na = sb = nb = 0
    hours = int(plan.max_days * 24)
    for hour in range(1, hours + 1):
        n = int(rng.poisson(per_hour))
        b = int(rng.binomial(n, share))
        na += n - b
        nb += b
        sa += int(rng.binomial(n - b, p_champion))
        sb += int(rng.binomial(b, p_candidate))
        result = canary_decision((sa, na), (sb, nb), plan=plan, days=hour / 24)
        if result.decision != "keep-testing":
            return result.decision, na + nb, hour / 24
    return "expired", na + nb, plan.max_days


def decisions(args: argparse.Namespace) -> str:
    plan = ABPlan()
    lines = [
        f"A/B canary decision, {args.seeds} seeds per row: {args.weekly} prompts/week, canary "
        f"share {args.share:.0%}, champion success {CHAMPION_ACCURACY:.0%}, checked hourly, "
        f"mSPRT alpha {plan.alpha}, tau {plan.tau}, margin {plan.margin}, max {plan.max_days:g} "
        "days",
        "",
        "| candidate | promoted | rolled back | expired | median prompts | median days |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, delta in SCENARIOS:
        runs = [
            simulate_one(
                CHAMPION_ACCURACY,
                CHAMPION_ACCURACY + delta,
                seed,
                weekly=args.weekly,
                share=args.share,
                plan=plan,
            )
            for seed in range(args.seeds)
        ]
        count = {d: sum(r[0] == d for r in runs) / len(runs) for d in ("promote", "rollback")}
        expired = 1 - sum(count.values())
        lines.append(
            f"| {name} | {count['promote']:.1%} | {count['rollback']:.1%} | {expired:.1%} | "
            f"{statistics.median(r[1] for r in runs):,.0f} | "
            f"{statistics.median(r[2] for r in runs):.1f} |"
        )
    return "\n".join(lines)


# e2e


class SyntheticArm:
    """Answers the prompt's true intent (its first word) with probability ``accuracy``, decided
    by a hash of (seed, prompt), else a wrong one: an arm of known accuracy."""

    def __init__(self, version: str, accuracy: float, seed: int) -> None:
        self.version, self.accuracy, self.seed = version, accuracy, seed

    def predict(self, text: str) -> Prediction:
        truth = text.split(maxsplit=1)[0]
        digest = hashlib.blake2b(f"{self.seed}:{self.version}:{text}".encode(), digest_size=8)
        right = int.from_bytes(digest.digest(), "big") / 2**64 < self.accuracy
        return Prediction(truth if right else f"{truth}_wrong", 0.9)


async def e2e_one(
    accuracy: float, seed: int, args: argparse.Namespace, root: Path
) -> tuple[str, int, float]:
    from tasks.ab_candidate import apply_decision, set_candidate
    from tasks.ab_readout import ab_readout

    models = root / f"models-{seed}-{accuracy}"
    for version in ("1", "2"):
        (models / version).mkdir(parents=True)
        for name in ("metadata.json", "model.onnx", "tokenizer.json"):
            (models / version / name).write_text("{}")
    write_pointer(models, "1")
    url = f"sqlite:///{root / f'e2e-{seed}-{accuracy}.db'}"
    db.upgrade(url)
    set_candidate(models, "2", mode="canary", share=args.share)
    candidate = SyntheticArm("2", accuracy, seed)
    ab = CandidateServing(models, loader=lambda path: candidate, watch=False)
    settings = Settings(home=root / "home", database_url=url, flush_interval_s=0.05)
    service = create_nlu_service(
        SyntheticArm("1", CHAMPION_ACCURACY, seed), url=url, settings=settings, candidate=ab
    )
    rng = np.random.default_rng(seed)
    users = [uuid.UUID(int=int(x)) for x in rng.integers(1, 2**62, size=5000)]
    plan = ABPlan()
    per_hour = args.weekly / (7 * 24)
    prompts = 0
    decision = "expired"
    days = plan.max_days
    for hour in range(1, int(plan.max_days * 24) + 1):
        days = hour / 24
        for _ in range(int(rng.poisson(per_hour))):
            intent = f"intent{int(rng.integers(0, 20))}"
            user = users[int(rng.integers(0, len(users)))]
            result = await service.process_message(f"{intent} {prompts}", user_id=user)
            await service.update_workflow_outcome(
                result.log_id, result.intent == intent, "stand-in"
            )
            prompts += 1
        await service.flush(timeout=60)
        readout = ab_readout(url, models, plan=plan)
        if readout.decision not in {"keep-testing", "none"}:
            decision = readout.decision
            apply_decision(models, decided_on="2", decision=decision, reason=readout.reason)
            break
    await service.aclose()
    return decision, prompts, days


def e2e(args: argparse.Namespace) -> str:
    root = Path(tempfile.mkdtemp(prefix="ab-e2e-"))
    lines = [
        f"A/B e2e through NLUService + logger + readout (SQLite), {args.seeds} seed(s): "
        f"{args.weekly} prompts/week, share {args.share:.0%}",
        "",
        "| candidate | seed | decision | prompts | days |",
        "|---|---:|---|---:|---:|",
    ]
    try:
        for name, delta in SCENARIOS:
            for seed in range(args.seeds):
                d, n, days = asyncio.run(e2e_one(CHAMPION_ACCURACY + delta, seed, args, root))
                lines.append(f"| {name} | {seed} | {d} | {n:,} | {days:.1f} |")
    finally:
        db.clear_engine_cache()
        shutil.rmtree(root, ignore_errors=True)
    return "\n".join(lines)


# overhead


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def _latencies(service: Any, calls: int, rate: float) -> list[float]:
    out = []
    gap = 1.0 / rate
    user = uuid.uuid4()
    next_at = time.perf_counter()
    for i in range(calls):
        now = time.perf_counter()
        if now < next_at:
            await asyncio.sleep(next_at - now)
        next_at += gap
        start = time.perf_counter_ns()
        await service.process_message(f"will it rain in city {i % 97} tomorrow", user_id=user)
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


async def overhead_async(args: argparse.Namespace, root: Path) -> list[str]:
    models = root / "models"
    url = args.url or f"sqlite:///{root / 'overhead.db'}"
    db.upgrade(url)
    settings = Settings(home=root / "home", database_url=url, flush_interval_s=0.05)
    champion = HotReloadingClassifier(models, watch=False)
    results: dict[str, Any] = {}
    for label, mode in (("off", None), ("on", "shadow")):
        if mode:
            write_candidate(models, "2", mode, 0.0)
        ab = CandidateServing(models, watch=False) if mode else None
        service = create_nlu_service(champion, url=url, settings=settings, candidate=ab)
        _budget(service, args)
        await _latencies(service, 200, args.rate)  # warm-up
        lat = await _latencies(service, args.calls, args.rate)
        await service.flush(timeout=60)
        shadow = service.shadow
        if shadow is not None:
            shadow.flush(120)
            results["coverage_rate"] = shadow.stats().to_dict()
            shadow.close()  # the worker stops; submit still queues: time the hook alone
            hook = []
            created = db_now()
            for _ in range(20000):
                start = time.perf_counter_ns()
                if shadow.active():
                    shadow.submit(b"\0" * 16, created, "hook timing")
                hook.append((time.perf_counter_ns() - start) / 1000)
                if len(shadow._queue) > 100:
                    shadow._queue.clear()
            shadow._queue.clear()
            results["hook"] = (_pct(hook, 50), _pct(hook, 99))
        results[label] = (_pct(lat, 50), _pct(lat, 99))
        await service.aclose()
        (models / "candidate").unlink(missing_ok=True)
    # Capture rows/s, trivial champion, shadow off vs on (real ONNX candidate in the background).
    for label, mode in (("rows_off", None), ("rows_on", "shadow")):
        if mode:
            write_candidate(models, "2", mode, 0.0)
        ab = CandidateServing(models, watch=False) if mode else None
        service = create_nlu_service(
            _Trivial(), url=url, settings=settings, candidate=ab, model_version="1"
        )
        _budget(service, args)
        t0 = time.perf_counter()
        for i in range(args.rows):
            await service.process_message(f"book a table {i}")
        await service.flush(timeout=120)
        results[label] = args.rows / (time.perf_counter() - t0)
        if service.shadow is not None:
            results["coverage_max"] = service.shadow.stats().to_dict()
            service.shadow.candidate = CandidateServing(root / "none", watch=False)
        await service.aclose()
        (models / "candidate").unlink(missing_ok=True)
    off, on = results["off"], results["on"]
    drop = 1 - results["rows_on"] / results["rows_off"]
    return [
        f"A/B shadow overhead ({url.split(':')[0]}), real ONNX champion and candidate, "
        f"{args.calls} calls at {args.rate:g} req/s, shadow cpu_budget "
        f"{args.cpu_budget or 'default'}",
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| process_message p50 / p99, shadow off (µs) | {off[0]:.0f} / {off[1]:.0f} | |",
        f"| process_message p50 / p99, shadow on (µs) | {on[0]:.0f} / {on[1]:.0f} | |",
        f"| added p99 (µs) | {on[1] - off[1]:+.0f} | ≤ 50 |",
        f"| shadow hook alone p50 / p99 (µs) | {results['hook'][0]:.2f} / "
        f"{results['hook'][1]:.2f} | ≤ 50 |",
        f"| shadow coverage at {args.rate:g} req/s | "
        f"{results['coverage_rate']['coverage']:.1%} (dropped "
        f"{results['coverage_rate']['dropped_full']}) | counted |",
        f"| capture rows/s, trivial champion, shadow off | {results['rows_off']:,.0f} | |",
        f"| capture rows/s, trivial champion, shadow on | {results['rows_on']:,.0f} | |",
        f"| rows/s drop | {drop:.1%} | ≤ 10% |",
        f"| shadow coverage at max rate | {results['coverage_max']['coverage']:.1%} "
        f"(dropped {results['coverage_max']['dropped_full']}) | counted |",
    ]


def _budget(service: Any, args: argparse.Namespace) -> None:
    if service.shadow is not None and args.cpu_budget is not None:
        service.shadow.cpu_budget = args.cpu_budget


def db_now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


class _Trivial:
    version = "1"
    _p = Prediction("restaurant", 0.9)

    def predict(self, text: str) -> Prediction:
        return self._p


def overhead(args: argparse.Namespace) -> str:
    root = Path(tempfile.mkdtemp(prefix="ab-overhead-"))
    try:
        shutil.copytree(Path(args.models) / "1", root / "models" / "1")
        shutil.copytree(Path(args.models) / "2", root / "models" / "2")
        write_pointer(root / "models", "1")
        return "\n".join(asyncio.run(overhead_async(args, root)))
    finally:
        db.clear_engine_cache()
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("decisions", "e2e"):
        p = sub.add_parser(name)
        p.add_argument("--seeds", type=int, default=200 if name == "decisions" else 1)
        p.add_argument("--weekly", type=int, default=100_000)
        p.add_argument("--share", type=float, default=0.2)
    p = sub.add_parser("overhead")
    p.add_argument("--models", required=True, help="registry with exported versions 1 and 2")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--url", default=None)
    p.add_argument("--cpu-budget", type=float, default=None, help="ShadowWorker.cpu_budget")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    text = {"decisions": decisions, "e2e": e2e, "overhead": overhead}[args.command](args)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
