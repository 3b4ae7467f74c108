"""Benchmark and proof of production A/B testing (docs/AB_TESTING.md). Run on purpose:

    .venv/bin/python bench/ab.py decisions [--seeds 200] [--weekly 100000] [--share 0.2]
        [--champion 0.85]
    .venv/bin/python bench/ab.py e2e [--seeds 200] [--weekly 100000] [--share 0.2]
        [--champion 0.85] [--workers 2] [--users 5000] [--postgres SERVER_URL] [--log FILE]
        [--summarise]
    .venv/bin/python -m bench.ab overhead --models DIR [--rates 50,100,200,400] [--url URL]

``decisions``: the canary decision over many seeds. The stand-in world: prompts arrive at
``weekly`` per week (Poisson per hour), a sticky ``share`` goes to the candidate, a workflow
succeeds exactly when the answered intent is right, so each arm's success rate is its accuracy
(champion 0.85; candidate worse by 3 points, equal, better by 2). Every hour the evidence is read
with :func:`tasks.ab_decision.canary_decision` (the function the ab-check flow applies) until it
decides or ``max_days`` pass. Reports promote / rollback / expired rates and the median prompts
(all arms) and days per decision.

``e2e``: the same world through the real path: synthetic classifiers of known accuracy behind
``NLUService`` (sticky canary routing over ``users`` users, the capture logger writing every row
and outcome), and every simulated hour :func:`tasks.ab_readout.ab_readout` +
:func:`tasks.ab_candidate.apply_decision` (the ab-check's steps, without Prefect). Seeds run in
``workers`` processes; each keeps ONE database (an SQLite file, or with ``--postgres`` a
PostgreSQL database of its own, dropped at exit) and registry for all its runs, emptied in
between. ``--log`` appends each run as a JSON line; ``--summarise`` prints the table of a log
(e.g. of an unfinished run). The numbers: bench/RESULTS.md.

``overhead``: with real ONNX models (``DIR``: a registry with versions 1 and 2 exported), the
request-path cost of shadow mode, the candidate predicting in the shadow worker process: for each
of ``rates`` (req/s), ``rounds`` interleaved phases of ``seconds`` with shadow off (no hook) and
on, ``process_message`` p50/p99 and the added p50/p99 (pooled, and p99 per round), with the
shadow coverage at that rate; the shadow hook alone (``active()`` + ``submit()``); capture rows/s
with a trivial champion (the capture path is the bottleneck) off vs on, and the coverage at that
saturating rate (what the worker wrote while the phase ran / prompts offered).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from capture import db
from capture.ab_routing import CandidateServing
from capture.classifier import HotReloadingClassifier
from capture.pointers import write_candidate, write_pointer
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
        f"share {args.share:.0%}, champion success {args.champion:.0%}, checked hourly, "
        f"mSPRT alpha {plan.alpha}, tau {plan.tau}, margin {plan.margin}, max {plan.max_days:g} "
        "days",
        "",
        "| candidate | promoted | rolled back | expired | median prompts | median days |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, delta in SCENARIOS:
        runs = [
            simulate_one(
                args.champion,
                args.champion + delta,
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


class _E2EWorld:
    """One worker process's database and registry, reused by every run it is given."""

    def __init__(self, root: Path, server: str | None) -> None:
        self.root = root
        self.server = server
        self.url = (
            db.create_database(server, "pc_bench_ab")
            if server
            else f"sqlite:///{root / f'e2e-{os.getpid()}.db'}"
        )
        db.upgrade(self.url)
        self.models = root / f"models-{os.getpid()}"
        for version in ("1", "2"):
            (self.models / version).mkdir(parents=True)
            for name in ("metadata.json", "model.onnx", "tokenizer.json"):
                (self.models / version / name).write_text("{}")

    def reset(self) -> None:
        """Empty tables, champion 1 serving, no candidate, no history: a fresh world."""
        from sqlalchemy import text

        with db.get_sync_engine(self.url).begin() as conn:
            for table in ("nlu_prompt_logs", "nlu_shadow_predictions"):
                conn.execute(text(f"DELETE FROM {table}"))
        (self.models / "candidate").unlink(missing_ok=True)
        (self.models / "history.jsonl").unlink(missing_ok=True)
        write_pointer(self.models, "1")

    def close(self) -> None:
        db.clear_engine_cache()
        if self.server:
            db.drop_database(self.server, self.url)


_WORLD: dict[str, _E2EWorld] = {}  # this worker process's world


def _e2e_init(root: str, server: str | None) -> None:
    logging.basicConfig(level=logging.WARNING)
    world = _WORLD["world"] = _E2EWorld(Path(root), server)
    atexit.register(world.close)


async def e2e_one(
    world: _E2EWorld, accuracy: float, seed: int, args: argparse.Namespace
) -> tuple[str, int, float]:
    """One canary test through the real path: (decision, prompts answered, simulated days)."""
    from tasks.ab_candidate import apply_decision, set_candidate
    from tasks.ab_readout import ab_readout

    world.reset()
    models, url = world.models, world.url
    set_candidate(models, "2", mode="canary", share=args.share)
    candidate = SyntheticArm("2", accuracy, seed)
    ab = CandidateServing(models, loader=lambda path: candidate, watch=False)
    settings = Settings(home=world.root / "home", database_url=url, flush_interval_s=0.05)
    service = create_nlu_service(
        SyntheticArm("1", args.champion, seed), url=url, settings=settings, candidate=ab
    )
    rng = np.random.default_rng(seed)
    users = [uuid.UUID(int=int(x)) for x in rng.integers(1, 2**62, size=args.users)]
    plan = ABPlan()
    per_hour = args.weekly / (7 * 24)
    prompts = 0
    decision = "expired"
    days = plan.max_days
    try:
        for hour in range(1, int(plan.max_days * 24) + 1):
            days = hour / 24
            n = int(rng.poisson(per_hour))
            for i, u in zip(
                rng.integers(0, 20, size=n).tolist(),
                rng.integers(0, len(users), size=n).tolist(),
                strict=True,
            ):
                intent = f"intent{i}"
                result = await service.process_message(f"{intent} {prompts}", user_id=users[u])
                # The stand-in world: the workflow succeeds exactly when the answer was right.
                await service.update_workflow_outcome(
                    result.log_id, result.intent == intent, "stand-in"
                )
                prompts += 1
            await service.flush(timeout=120)
            # The hourly ab-check's steps, without Prefect: the readout, then the decision.
            readout = ab_readout(url, models, plan=plan)
            if readout.decision not in {"keep-testing", "none"}:
                decision = readout.decision
                apply_decision(models, decided_on="2", decision=decision, reason=readout.reason)
                break
    finally:
        await service.aclose()
    return decision, prompts, days


def _e2e_job(job: tuple[str, float, int, argparse.Namespace]) -> tuple[str, int, str, int, float]:
    name, accuracy, seed, args = job
    decision, prompts, days = asyncio.run(e2e_one(_WORLD["world"], accuracy, seed, args))
    return name, seed, decision, prompts, days


def e2e(args: argparse.Namespace) -> str:
    """``args.seeds`` seeds per scenario on ``args.workers`` processes, each with ONE database
    (SQLite file, or a PostgreSQL database of its own with ``--postgres``) and registry reused
    by its runs (emptied in between)."""
    import multiprocessing

    root = Path(tempfile.mkdtemp(prefix="ab-e2e-"))
    jobs = [
        (name, args.champion + delta, seed, args)
        for seed in range(args.seeds)
        for name, delta in SCENARIOS
    ]
    started = time.perf_counter()
    runs: dict[str, list[tuple[str, int, float]]] = {name: [] for name, _ in SCENARIOS}
    if args.summarise:  # the table of the runs a (possibly unfinished) --log holds
        for line in Path(args.log).read_text(encoding="utf-8").splitlines():
            run = json.loads(line)
            runs[run["scenario"]].append((run["decision"], run["prompts"], run["days"]))
        return _e2e_table(runs, args, None)
    context = multiprocessing.get_context("spawn")
    log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115
    try:
        with context.Pool(
            args.workers, initializer=_e2e_init, initargs=(str(root), args.postgres)
        ) as pool:
            for done, (name, seed, decision, prompts, days) in enumerate(
                pool.imap_unordered(_e2e_job, jobs), start=1
            ):
                runs[name].append((decision, prompts, days))
                if log is not None:
                    record = {"scenario": name, "seed": seed, "decision": decision}
                    log.write(json.dumps({**record, "prompts": prompts, "days": days}) + "\n")
                    log.flush()
                if done % 30 == 0 or done == len(jobs):
                    logger.warning(
                        "e2e: %d/%d runs, %.0f s", done, len(jobs), time.perf_counter() - started
                    )
            pool.close()
            pool.join()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if log is not None:
            log.close()
    return _e2e_table(runs, args, time.perf_counter() - started)


def _e2e_table(
    runs: dict[str, list[tuple[str, int, float]]], args: argparse.Namespace, seconds: float | None
) -> str:
    database = "PostgreSQL" if args.postgres else "SQLite"
    n = min(len(rows) for rows in runs.values())
    wall = f"{seconds / 60:.1f} min wall" if seconds is not None else f"from {args.log}"
    lines = [
        f"A/B e2e through NLUService (sticky canary routing) + capture logger ({database}) + "
        f"ab_readout + apply_decision, read hourly: {n} seeds per row, "
        f"{args.weekly:,} prompts/week (Poisson per hour), canary share {args.share:.0%}, "
        f"{args.users:,} users, champion success {args.champion:.0%}, mSPRT defaults "
        f"(alpha 0.05, tau 0.02, margin 0.01, >= 200 outcomes per arm, max 28 days); "
        f"{args.workers} worker processes, {wall}",
        "",
        "| candidate | runs | promoted | rolled back | expired | median prompts per decision "
        "| median days |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, _ in SCENARIOS:
        rows = runs[name]
        share = {d: sum(r[0] == d for r in rows) / len(rows) for d in ("promote", "rollback")}
        lines.append(
            f"| {name} | {len(rows)} | {share['promote']:.1%} | {share['rollback']:.1%} | "
            f"{1 - sum(share.values()):.1%} | {statistics.median(r[1] for r in rows):,.0f} | "
            f"{statistics.median(r[2] for r in rows):.1f} |"
        )
    return "\n".join(lines)


# overhead


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def _paced(
    service: Any, calls: int, rate: float, cpu: list[float] | None = None
) -> list[float]:
    """``process_message`` wall latencies (µs) of ``calls`` requests started ``rate`` per
    second; with ``cpu``, the request thread's CPU time per call (µs) is appended to it (CPU
    time does not count the time other processes of a busy machine take the core)."""
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
        cpu_start = time.thread_time_ns()
        await service.process_message(f"will it rain in city {i % 97} tomorrow", user_id=user)
        if cpu is not None:
            cpu.append((time.thread_time_ns() - cpu_start) / 1000)
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def _thread_cpu_s(thread: Any) -> float:
    """CPU seconds a thread of this process has used (Linux: its CPU-time clock)."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def _process_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) process ``pid`` has used, from /proc (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _order(round_: int) -> tuple[str, str]:
    """Alternate which phase goes first, so a drift in machine load hits both alike."""
    return ("off", "on") if round_ % 2 == 0 else ("on", "off")


async def _latency_at(service: Any, worker: Any, rate: float, args: argparse.Namespace) -> dict:
    """Interleaved rounds at ``rate``: shadow off (no hook) and on (hook + worker process)."""
    calls = max(200, int(rate * args.seconds))
    pooled: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    added_p99: list[float] = []
    offered = written = dropped = predicted = 0
    sender_s = worker_s = 0.0
    for round_ in range(args.rounds):
        phase: dict[str, list[float]] = {}
        for label in _order(round_):
            service.shadow = worker if label == "on" else None
            before = worker.stats()
            sender0, worker0 = _thread_cpu_s(worker._thread), _process_cpu_s(worker.pid)
            phase[label] = await _paced(service, calls, rate, cpu[label])
            await service.flush(timeout=120)
            if label == "on":
                after = _settle(worker)
                offered += after.offered - before.offered
                written += after.written - before.written
                dropped += after.dropped_full - before.dropped_full
                predicted += after.predicted - before.predicted
                sender_s += _thread_cpu_s(worker._thread) - sender0
                worker_s += _process_cpu_s(worker.pid) - worker0
        for label, values in phase.items():
            pooled[label] += values
        added_p99.append(_pct(phase["on"], 99) - _pct(phase["off"], 99))
    return {
        "rate": rate,
        "calls": calls,
        "off": (_pct(pooled["off"], 50), _pct(pooled["off"], 99)),
        "on": (_pct(pooled["on"], 50), _pct(pooled["on"], 99)),
        "cpu_off": (_pct(cpu["off"], 50), _pct(cpu["off"], 99)),
        "cpu_on": (_pct(cpu["on"], 50), _pct(cpu["on"], 99)),
        "added_p99_rounds": added_p99,
        "coverage": written / offered if offered else 1.0,
        "dropped": dropped,
        "sender_us": sender_s * 1e6 / offered if offered else 0.0,
        "worker_ms": worker_s * 1e3 / predicted if predicted else 0.0,
    }


async def _rows(service: Any, worker: Any, args: argparse.Namespace) -> dict:
    """Capture rows/s at the maximum rate (trivial champion), shadow off vs on, interleaved."""
    rates: dict[str, list[float]] = {"off": [], "on": []}
    cpu_us: dict[str, list[float]] = {"off": [], "on": []}
    offered = written = dropped = 0
    busy_s = 0.0
    for round_ in range(args.rounds):
        for label in _order(round_):
            service.shadow = worker if label == "on" else None
            before = worker.stats()
            t0, cpu0 = time.perf_counter(), _self_cpu_s()
            for i in range(args.rows):
                await service.process_message(f"book a table for {i % 12} people")
            await service.flush(timeout=300)
            elapsed = time.perf_counter() - t0
            rates[label].append(args.rows / elapsed)
            cpu_us[label].append((_self_cpu_s() - cpu0) * 1e6 / args.rows)
            if label == "on":
                during = _settle(worker)
                offered += during.offered - before.offered
                written += during.written - before.written
                dropped += during.dropped_full - before.dropped_full
                busy_s += elapsed
    return {
        "off": statistics.median(rates["off"]),
        "on": statistics.median(rates["on"]),
        "ratios": [on / off for on, off in zip(rates["on"], rates["off"], strict=True)],
        "cpu_off": statistics.median(cpu_us["off"]),
        "cpu_on": statistics.median(cpu_us["on"]),
        "coverage": written / offered if offered else 1.0,
        "dropped": dropped,
        "throughput": written / busy_s if busy_s else 0.0,
    }


def _settle(worker: Any) -> Any:
    """After an "on" phase: the worker's stats once it had 2 s more to catch up; then what is
    still queued is discarded (not counted as written: coverage is written / offered by then)
    and the batches in flight finish, so the next phase starts with an idle worker."""
    worker.flush(2.0)
    stats = worker.stats()
    worker._queue.clear()  # the bench's own shortcut: a sustained run keeps the queue full
    worker.flush(600)
    return stats


def _self_cpu_s() -> float:
    """CPU seconds (user + system) of this process, all its threads, not its children."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _hook(worker: Any) -> tuple[float, float]:
    """The request path's shadow cost alone: ``active()`` + ``submit()`` (µs)."""
    created = datetime.now(UTC)
    times = []
    queue = worker._queue
    for _ in range(20_000):
        start = time.perf_counter_ns()
        if worker.active():
            worker.submit(b"\0" * 16, created, "hook timing")
        times.append((time.perf_counter_ns() - start) / 1000)
        if len(queue) > 100:
            queue.clear()
    queue.clear()
    return _pct(times, 50), _pct(times, 99)


async def overhead_async(args: argparse.Namespace, root: Path) -> list[str]:
    from capture.shadow import DEFAULT_BATCH, DEFAULT_NICE, DEFAULT_QUEUE

    models = root / "models"
    url = args.url or f"sqlite:///{root / 'overhead.db'}"
    db.upgrade(url)
    settings = Settings(home=root / "home", database_url=url, flush_interval_s=0.05)
    write_candidate(models, "2", "shadow", 0.0)
    load_before = os.getloadavg()
    # Real ONNX champion; the candidate (real ONNX) predicts in the shadow worker process.
    champion = HotReloadingClassifier(models, watch=False)
    ab = CandidateServing(models, watch=False)
    service = create_nlu_service(champion, url=url, settings=settings, candidate=ab)
    worker = service.shadow
    assert worker is not None
    await _paced(service, 300, 200.0)  # warm-up: starts the worker, which loads candidate 2
    if not worker.flush(300):
        raise RuntimeError(f"the shadow worker did not start: {worker.stats()}")
    isolation = worker.isolation
    latency = [await _latency_at(service, worker, rate, args) for rate in args.rates]
    service.shadow = worker
    hook = _hook(worker)
    await service.aclose()
    # Capture rows/s: a trivial champion, so the capture path is the bottleneck.
    service = create_nlu_service(
        _Trivial(), url=url, settings=settings, candidate=ab, model_version="1"
    )
    worker = service.shadow
    assert worker is not None
    for i in range(300):
        await service.process_message(f"warm up {i}")
    worker.flush(300)
    rows = await _rows(service, worker, args)
    await service.aclose()
    load_after = os.getloadavg()
    lines = [
        f"A/B shadow overhead ({url.split(':')[0]}): real ONNX champion (v1) and candidate (v2), "
        f"shadow worker isolation {isolation!r} (nice {DEFAULT_NICE}, SCHED_IDLE "
        f"{worker.idle_priority}, 1 ONNX thread, queue "
        f"{DEFAULT_QUEUE}, batch {DEFAULT_BATCH}); {args.rounds} interleaved off/on rounds of "
        f"{args.seconds:g} s per rate; {os.cpu_count()} CPUs ({_cpu_name()}); load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after",
        "",
        "Wall: `process_message` latency. CPU: the request thread's CPU time per call (not "
        "counting time other processes hold the core). Sender: the service-side sender thread's "
        "CPU per prompt (the most it can hold the GIL). Worker: the worker process's CPU per "
        "prediction.",
        "",
        "| rate (req/s) | calls per phase | wall p50 off / on (µs) | wall p99 off / on (µs) | "
        "added wall p50 / p99 (µs) | added wall p99 per round (µs) | CPU p50 off / on (µs) | "
        "CPU p99 off / on (µs) | added CPU p50 / p99 (µs) | sender µs/prompt | worker ms/pred "
        "| shadow coverage |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in latency:
        (p50_off, p99_off), (p50_on, p99_on) = r["off"], r["on"]
        (c50_off, c99_off), (c50_on, c99_on) = r["cpu_off"], r["cpu_on"]
        per_round = ", ".join(f"{v:+.0f}" for v in r["added_p99_rounds"])
        lines.append(
            f"| {r['rate']:g} | {r['calls']} | {p50_off:.0f} / {p50_on:.0f} | "
            f"{p99_off:.0f} / {p99_on:.0f} | {p50_on - p50_off:+.0f} / {p99_on - p99_off:+.0f} | "
            f"{per_round} | {c50_off:.0f} / {c50_on:.0f} | {c99_off:.0f} / {c99_on:.0f} | "
            f"{c50_on - c50_off:+.0f} / {c99_on - c99_off:+.0f} | {r['sender_us']:.1f} | "
            f"{r['worker_ms']:.2f} | {r['coverage']:.1%} (dropped {r['dropped']}) |"
        )
    ratios = ", ".join(f"{1 - v:+.1%}" for v in rows["ratios"])
    lines += [
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| shadow hook alone (`active()` + `submit()`) p50 / p99 (µs) | {hook[0]:.2f} / "
        f"{hook[1]:.2f} | ≤ 50 |",
        f"| capture rows/s, trivial champion, shadow off / on (median of {args.rounds}) | "
        f"{rows['off']:,.0f} / {rows['on']:,.0f} | |",
        f"| rows/s drop (per round: {ratios}) | {1 - rows['on'] / rows['off']:.1%} | ≤ 10% |",
        f"| service process CPU per row, shadow off / on (µs, median) | {rows['cpu_off']:.1f} / "
        f"{rows['cpu_on']:.1f} | |",
        f"| shadow coverage at saturation (written by 2 s after the phase / offered) | "
        f"{rows['coverage']:.1%} (dropped {rows['dropped']}; the worker wrote "
        f"{rows['throughput']:,.0f} predictions/s) | counted |",
    ]
    return lines


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


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
        p.add_argument("--seeds", type=int, default=200)
        p.add_argument("--weekly", type=int, default=100_000, help="prompts per week")
        p.add_argument("--share", type=float, default=0.2, help="canary share of users")
        p.add_argument("--champion", type=float, default=CHAMPION_ACCURACY, help="its accuracy")
    p.add_argument("--workers", type=int, default=2, help="processes (one database each)")
    p.add_argument("--users", type=int, default=5000, help="distinct users per run")
    p.add_argument("--log", default=None, help="append each run as a JSON line to this file")
    p.add_argument(
        "--summarise", action="store_true", help="print the table of the runs in --log only"
    )
    p.add_argument(
        "--postgres",
        default=None,
        metavar="SERVER_URL",
        help="a PostgreSQL server: each worker creates (and drops) a database there; "
        "default: one SQLite file per worker",
    )
    p = sub.add_parser("overhead")
    p.add_argument("--models", required=True, help="registry with exported versions 1 and 2")
    p.add_argument(
        "--rates",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[50.0, 100.0, 200.0, 400.0],
        help="request rates (req/s), comma-separated",
    )
    p.add_argument("--seconds", type=float, default=8.0, help="per phase and rate")
    p.add_argument("--rounds", type=int, default=4, help="interleaved off/on rounds")
    p.add_argument("--rows", type=int, default=30_000, help="rows per rows/s phase")
    p.add_argument("--url", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    text = {"decisions": decisions, "e2e": e2e, "overhead": overhead}[args.command](args)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
