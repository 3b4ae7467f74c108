"""Benchmark of the monitoring and review queries on 1,000,000 realistic rows (PostgreSQL).

Creates a fresh database on the server, migrates it, loads the rows with COPY (and reports the
ingest rate with every index in place), runs VACUUM ANALYZE, then times each statement from
``capture.statements`` (the ones the repository and the flows run): median and p95 of several runs,
and the plan's scan kind from EXPLAIN. Then the monitoring rollup (migration 0004): the cost of
a full refresh, of an hourly incremental one and of one after late corrections, and the three
statistics read through it (plan query + statement, as the repository runs them), next to the
raw statements and the baseline. Drops the database at the end.

    .venv/bin/python -m bench.queries [--rows 1000000] [--repeats 15] [--url postgresql://...]

Data: created_at uniform over 90 days (physically in arrival order), 150 intents (the CLINC150
labels and texts when ../shared/datasets is present) with a Zipf-like skew, confidence from
Beta(6, 1.6), ~70% with an outcome, ~10% of all rows failed, ~2% corrected (both likelier at low
confidence), ~20k users (5% anonymous). Target: every query ≤ 20 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from sqlalchemy import Connection, Engine, create_engine, func, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from capture import db, statements, stats_rollup
from capture.settings import normalise_database_url
from capture.values import floor_hour, since_days

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_MS = 20.0
# The floor for a 7-day statistic: counting the window's index entries, nothing else.
BASELINE = "baseline: count(*) 7d (index-only)"
DAYS = 90
N_USERS = 20_000
COLUMNS = (
    "id, user_id, prompt, predicted_intent, confidence, secondary_intents, corrected_intent, "
    "correction_notes, corrected_at, was_successful, workflow_type, execution_error, "
    "conversation_id, message_index, model_version, created_at, updated_at"
)
CLINC = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "clinc150"


def _server_url(url: str | None) -> str:
    url = url or os.environ.get("PROMPT_CAPTURE_BENCH_POSTGRES_URL") or DEFAULT_SERVER
    return db.libpq_url(url)


def _texts_by_intent(rng: np.random.Generator) -> dict[str, list[str]]:
    path = CLINC / "train.jsonl"
    if path.exists():
        by: dict[str, list[str]] = {}
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                by.setdefault(record["label"], []).append(record["text"])
        by.pop("oos", None)
        return by
    words = ["schedule", "meeting", "weather", "alarm", "transfer", "balance", "song", "timer"]
    return {
        f"intent_{i:03d}": [" ".join(rng.choice(words, 6)) + f" {i}" for _ in range(50)]
        for i in range(150)
    }


def _copy_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _uuid_strings(rng: np.random.Generator, n: int, ms: np.ndarray | None = None) -> list[str]:
    """n UUID strings: v4, or v7 with the given Unix milliseconds."""
    raw = rng.integers(0, 2**63, size=(n, 2), dtype=np.int64).astype(np.uint64)
    hi, lo = raw[:, 0], raw[:, 1]
    if ms is None:
        hi = (hi & np.uint64(0xFFFFFFFFFFFF0FFF)) | np.uint64(0x4000)
    else:
        hi = (ms.astype(np.uint64) << np.uint64(16)) | np.uint64(0x7000) | (hi & np.uint64(0xFFF))
    lo = (lo & np.uint64(0x3FFFFFFFFFFFFFFF)) | np.uint64(0x8000000000000000)
    out = []
    for h, low in zip(hi.tolist(), lo.tolist(), strict=True):
        s = f"{h:016x}{low:016x}"
        out.append(f"{s[:8]}-{s[8:12]}-{s[12:16]}-{s[16:20]}-{s[20:]}")
    return out


def _ts(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def generate_copy_chunks(
    n: int, now: datetime, *, seed: int = 0, chunk_rows: int = 50_000
) -> Iterator[bytes]:
    """The rows as COPY text-format chunks (vectorised draws, then one line per row)."""
    rng = np.random.default_rng(seed)
    texts = _texts_by_intent(rng)
    intents = sorted(texts)
    rng.shuffle(intents)  # which intents are frequent is arbitrary
    k = len(intents)
    weights = 1.0 / np.arange(1, k + 1) ** 1.1
    weights /= weights.sum()

    end = now.timestamp()
    created = np.sort(end - rng.uniform(0, DAYS * 86_400, n))
    ms = (created * 1000).astype(np.int64)
    ids = _uuid_strings(rng, n, ms)
    conv = _uuid_strings(rng, n)
    users = _uuid_strings(rng, N_USERS)
    user_of = rng.integers(0, N_USERS, n)
    anonymous = rng.random(n) < 0.05
    intent = rng.choice(k, n, p=weights)
    conf = rng.beta(6.0, 1.6, n).astype(np.float32)
    second = (intent + 1 + rng.integers(0, k - 1, n)) % k
    third = (second + 1 + rng.integers(0, k - 2, n)) % k
    third = np.where(third == intent, (third + 1) % k, third)
    conf2 = ((1 - conf) * rng.uniform(0.3, 0.8, n)).astype(np.float32)
    conf3 = ((1 - conf - conf2) * rng.uniform(0.2, 0.8, n)).astype(np.float32)
    lowness = (1 - conf) / float(np.mean(1 - conf))
    has_outcome = rng.random(n) < 0.70
    failed = has_outcome & (rng.random(n) < np.clip(0.10 / 0.70 * lowness, 0, 1))
    corrected = rng.random(n) < np.clip(0.02 * lowness, 0, 1)
    corrected_to = (intent + 1 + rng.integers(0, k - 1, n)) % k
    corrected_after = rng.uniform(3_600, 10 * 86_400, n)
    message_index = rng.integers(0, 12, n)
    pick = rng.random(n)

    lines: list[str] = []
    for i in range(n):
        name = intents[intent[i]]
        pool = texts[name]
        prompt = _copy_escape(pool[int(pick[i] * len(pool))])
        secondary = json.dumps(
            [
                {"intent": intents[second[i]], "confidence": round(float(conf2[i]), 4)},
                {"intent": intents[third[i]], "confidence": round(float(conf3[i]), 4)},
            ]
        )
        created_s = _ts(created[i])
        if corrected[i]:
            corr = (
                f"{intents[corrected_to[i]]}\t\\N\t{_ts(min(created[i] + corrected_after[i], end))}"
            )
        else:
            corr = "\\N\t\\N\t\\N"
        if failed[i]:
            outcome = f"f\t{name}\tworkflow {name} failed: upstream timeout"
        elif has_outcome[i]:
            outcome = f"t\t{name}\t\\N"
        else:
            outcome = "\\N\t\\N\t\\N"
        user = "\\N" if anonymous[i] else users[user_of[i]]
        version = f"v{1 + int(created[i] - created[0]) // (7 * 86_400)}"  # weekly models
        lines.append(
            f"{ids[i]}\t{user}\t{prompt}\t{name}\t{float(conf[i])!r}\t{secondary}\t{corr}\t"
            f"{outcome}\t{conv[i]}\t{message_index[i]}\t{version}\t{created_s}\t{created_s}\n"
        )
        if len(lines) == chunk_rows:
            yield "".join(lines).encode()
            lines.clear()
    if lines:
        yield "".join(lines).encode()


def _plan_kind(plan: dict[str, Any]) -> str:
    """A short description of the plan: the scans (with their index) under the top node."""
    scans: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        kind = node["Node Type"]
        if "Scan" in kind:
            index = node.get("Index Name")
            target = index or node.get("Relation Name") or node.get("Alias")
            scans.append(f"{kind} {target}")
        for child in node.get("Plans", ()):
            walk(child)

    walk(plan)
    unique = list(dict.fromkeys(scans))
    return f"{plan['Node Type']} <- {', '.join(unique)}"


Runner = Callable[[Connection], int]


def _runner(statement: Any) -> Runner:
    def run(conn: Connection) -> int:
        return len(conn.execute(statement).all())

    return run


def _time(engine: Engine, run: Runner, repeats: int) -> tuple[list[float], int]:
    timings: list[float] = []
    n_rows = 0
    with engine.connect() as conn:
        run(conn)  # warm the plan and the cache
        for _ in range(repeats):
            start = time.perf_counter()
            n_rows = run(conn)
            timings.append((time.perf_counter() - start) * 1000)
    return timings, n_rows


def _schedstat_ns(pid: int) -> int | None:
    """CPU time a local process has used (ns), or None when the server is not on this host."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _backend_cpu_ms(engine: Engine, run: Runner, repeats: int) -> float | None:
    """Median CPU time the server backend spends per run, with parallel workers off.

    Wall times on a busy machine measure the machine; this measures the query: what one idle
    core would take on the server side (result transfer and client decoding not included).
    """
    samples: list[float] = []
    with engine.connect() as conn:
        conn.exec_driver_sql("SET max_parallel_workers_per_gather = 0")
        pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        run(conn)
        for _ in range(repeats):
            before = _schedstat_ns(pid)
            run(conn)
            after = _schedstat_ns(pid)
            if before is None or after is None:
                return None
            samples.append((after - before) / 1e6)
    return statistics.median(samples)


def _explain(engine: Engine, statement: Any) -> str:
    compiled = statement.compile(
        dialect=engine.dialect, compile_kwargs={"render_postcompile": True}
    )
    with engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + str(compiled), compiled.params)
        return _plan_kind(plan.scalar_one()[0]["Plan"])


def benchmark_cases(now: datetime, user_id: str) -> list[tuple[str, Any]]:
    """(label, statement) for every timed query; windows end at ``now``."""
    week = since_days(now, 7)
    assert week is not None
    baseline = (
        select(func.count()).select_from(statements.TABLE).where(statements.C.created_at > week)
    )
    return [
        (BASELINE, baseline),
        ("low_confidence(0.7, 100)", statements.select_low_confidence()),
        ("low_confidence(0.7, 100, days=7)", statements.select_low_confidence(since=week)),
        ("failed_workflows(100)", statements.select_failed_workflows()),
        ("user_prompts(50)", statements.select_user_prompts(user_id)),
        ("confidence_distribution(7d)", statements.select_confidence_distribution(since=week)),
        ("intent_distribution(7d)", statements.select_intent_distribution(since=week)),
        ("success_rate_by_intent(7d)", statements.select_success_rate_by_intent(since=week)),
        ("success_rate_by_intent(all)", statements.select_success_rate_by_intent()),
        ("prompts_for_retraining(7d)", statements.select_for_retraining(since=week)),
    ]


StatsBuilder = Callable[..., Any]
ROLLUP_CASES: list[tuple[str, StatsBuilder, float | None]] = [
    ("confidence_distribution(7d)", statements.select_confidence_distribution, 7),
    ("intent_distribution(7d)", statements.select_intent_distribution, 7),
    ("success_rate_by_intent(7d)", statements.select_success_rate_by_intent, 7),
    ("success_rate_by_intent(all)", statements.select_success_rate_by_intent, None),
]
#: Late corrections and outcomes applied to random rows of the last 30 days before the
#: "late changes" refresh (a week's review batch).
LATE_CHANGES = 200


def rollup_runner(builder: StatsBuilder, since: datetime | None) -> Runner:
    """What the repository runs for one statistic: the cover query, then the statement."""

    def run(conn: Connection) -> int:
        rows = conn.execute(stats_rollup.select_stats_cover_state()).all()
        cover = stats_rollup.stats_cover_from_rows(rows, since)
        return len(conn.execute(builder(since=since, cover=cover)).all())

    return run


def _refresh(
    engine: Engine, until: datetime | None
) -> tuple[stats_rollup.StatsRefresh, float, float]:
    """One refresh in its own transaction: (result, wall ms, server backend CPU ms)."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SET max_parallel_workers_per_gather = 0")
        pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
        conn.commit()
        with Session(bind=conn) as session:
            before = _schedstat_ns(pid)
            start = time.perf_counter()
            result = stats_rollup.refresh_prompt_stats(session=session, until=until, wait_timeout=5)
            session.commit()
            wall = (time.perf_counter() - start) * 1000
            after = _schedstat_ns(pid)
    cpu = float("nan") if before is None or after is None else (after - before) / 1e6
    return result, wall, cpu


def _late_changes(bench_url: str, now: datetime, n: int, seed: int) -> int:
    """Correct ``n`` random rows of the last 30 days and flip their outcome (what a weekly
    review import and late workflow callbacks do); returns the number of hours touched."""
    rng = np.random.default_rng(seed + 1)
    with psycopg.connect(bench_url) as conn:
        ids = conn.execute(
            "SELECT id FROM nlu_prompt_logs WHERE created_at > %s - interval '30 days' "
            "AND created_at < %s - interval '1 day'",
            (now, now),
        ).fetchall()
        picked = [ids[int(i)][0] for i in rng.choice(len(ids), n, replace=False)]
        conn.execute(
            "UPDATE nlu_prompt_logs SET corrected_intent = 'late_review', "
            "was_successful = NOT coalesce(was_successful, true) WHERE id = ANY(%s)",
            (picked,),
        )
        hours = conn.execute(
            "SELECT count(DISTINCT date_trunc('hour', created_at, 'UTC')) FROM nlu_prompt_logs "
            "WHERE id = ANY(%s)",
            (picked,),
        ).fetchone()
        conn.commit()
    return int(hours[0]) if hours else 0


def _timed_entry(
    engine: Engine, label: str, run: Runner, *, repeats: int, baseline_ms: float, plan: str
) -> dict[str, Any]:
    timings, n_rows = _time(engine, run, repeats)
    median = statistics.median(timings)
    return {
        "query": label,
        "median_ms": median,
        "p95_ms": float(np.percentile(timings, 95)),
        "x_baseline": median / baseline_ms if baseline_ms else 1.0,
        "server_cpu_ms": _backend_cpu_ms(engine, run, repeats),
        "rows": n_rows,
        "plan": plan,
        "target_met": median <= TARGET_MS,
    }


def _rollup_plan(engine: Engine, builder: StatsBuilder, since: datetime | None) -> str:
    with engine.connect() as conn:
        rows = conn.execute(stats_rollup.select_stats_cover_state()).all()
        cover = stats_rollup.stats_cover_from_rows(rows, since)
    if cover is None:
        return "raw (no cover)"
    parts = f"{len(cover.raw)} raw, {len(cover.hourly)} hourly, {len(cover.daily)} daily spans"
    return f"{_explain(engine, builder(since=since, cover=cover))}; {parts}"


def benchmark_rollup(
    engine: Engine,
    bench_url: str,
    now: datetime,
    *,
    repeats: int,
    baseline_ms: float,
    seed: int,
) -> list[dict[str, Any]]:
    """Refresh costs (full; +1 hour; +23 hours; after late corrections; nothing new) and the
    statistics through the rollup: right after a refresh, and with dirty hours pending."""
    results: list[dict[str, Any]] = []
    day_ago = floor_hour(now) - timedelta(days=1)

    def refresh(label: str, until: datetime | None) -> None:
        result, wall, cpu = _refresh(engine, until)
        results.append({"refresh": label, "wall_ms": wall, "cpu_ms": cpu, **result.as_dict()})

    def statistics(suffix: str) -> None:
        for label, builder, days in ROLLUP_CASES:
            since = since_days(now, days)
            results.append(
                _timed_entry(
                    engine,
                    f"{label} rollup{suffix}",
                    rollup_runner(builder, since),
                    repeats=repeats,
                    baseline_ms=baseline_ms,
                    plan=_rollup_plan(engine, builder, since),
                )
            )

    refresh("full: 90 days, up to 1 day ago", day_ago)
    refresh("incremental: +1 hour", day_ago + timedelta(hours=1))
    refresh("incremental: the remaining 23 hours", None)
    with psycopg.connect(bench_url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) nlu_prompt_stats_hourly, nlu_prompt_stats_daily")
    statistics("")
    hours = _late_changes(bench_url, now, LATE_CHANGES, seed)
    statistics(f", {hours} dirty h")
    refresh(f"incremental: {LATE_CHANGES} late corrections in {hours} hours", None)
    refresh("again: nothing new (idempotent)", None)
    return results


def run(
    url: str | None = None, *, rows: int = 1_000_000, repeats: int = 15, seed: int = 0
) -> list[dict[str, Any]]:
    """Load ``rows`` rows into a fresh database on the server at ``url``, time every query.

    Returns one dict per query (``query, median_ms, p95_ms, x_baseline, server_cpu_ms, rows,
    plan, target_met``; the first is the baseline) after an ``ingest`` entry (``rows_per_s`` of the
    COPY load, all indexes in place).
    """
    server = _server_url(url)
    bench_url = db.libpq_url(db.create_database(server, "pc_bench"))
    results: list[dict[str, Any]] = []
    engine = create_engine(normalise_database_url(bench_url), poolclass=NullPool)
    try:
        db.upgrade(bench_url)
        now = datetime.now(UTC).replace(microsecond=0)
        chunks = list(generate_copy_chunks(rows, now, seed=seed))
        with psycopg.connect(bench_url) as conn:
            start = time.perf_counter()
            with conn.cursor().copy(f"COPY nlu_prompt_logs ({COLUMNS}) FROM STDIN") as copy:
                for chunk in chunks:
                    copy.write(chunk)
            conn.commit()
            seconds = time.perf_counter() - start
        del chunks
        results.append(
            {
                # Every row is older than the late-change age, so migration 0004's insert
                # trigger marks its hour (a backfill); live traffic fires no trigger.
                "query": "ingest (COPY, all indexes, every row a late/backfill row)",
                "rows": rows,
                "rows_per_s": rows / seconds,
            }
        )
        with psycopg.connect(bench_url, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) nlu_prompt_logs")
            row = conn.execute(
                "SELECT user_id::text FROM nlu_prompt_logs WHERE user_id IS NOT NULL "
                "GROUP BY user_id ORDER BY count(*) DESC LIMIT 1"
            ).fetchone()
        assert row is not None
        baseline_ms = 0.0
        for label, statement in benchmark_cases(now, row[0]):
            entry = _timed_entry(
                engine,
                label,
                _runner(statement),
                repeats=repeats,
                baseline_ms=baseline_ms,
                plan=_explain(engine, statement),
            )
            baseline_ms = baseline_ms or entry["median_ms"]
            entry["x_baseline"] = entry["median_ms"] / baseline_ms
            results.append(entry)
        results += benchmark_rollup(
            engine, bench_url, now, repeats=repeats, baseline_ms=baseline_ms, seed=seed
        )
    finally:
        engine.dispose()
        db.drop_database(server, bench_url)
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        if "rows_per_s" in r:
            lines.append(f"{r['query']}: {r['rows']:,} rows at {r['rows_per_s']:,.0f} rows/s")
    header = f"{'median ms':>9} {'p95 ms':>8} {'x base':>6} {'cpu ms':>7} {'rows':>6}"
    lines.append(f"{'query':<44} {header}  plan")
    for r in results:
        if "median_ms" in r:
            flag = "" if r["target_met"] else "  (> target)"
            cpu = "-" if r["server_cpu_ms"] is None else f"{r['server_cpu_ms']:.2f}"
            lines.append(
                f"{r['query']:<44} {r['median_ms']:>9.2f} {r['p95_ms']:>8.2f} "
                f"{r['x_baseline']:>6.2f} {cpu:>7} {r['rows']:>6}  {r['plan']}{flag}"
            )
    refreshes = [r for r in results if "refresh" in r]
    if refreshes:
        lines.append(
            f"{'rollup refresh':<58} {'wall ms':>9} {'cpu ms':>8} {'dirty h':>7} "
            f"{'hourly':>7} {'daily':>6}  watermark"
        )
        for r in refreshes:
            lines.append(
                f"{r['refresh']:<58} {r['wall_ms']:>9.1f} {r['cpu_ms']:>8.1f} "
                f"{r['dirty_hours']:>7} {r['hourly_rows']:>7} {r['daily_rows']:>6}  "
                f"{r['watermark']}"
            )
    lines.append(
        "median/p95: wall time per run (parallel plans allowed); x base: median / baseline; "
        "cpu ms: server backend CPU per run, serial plan (what one idle core takes); "
        "rollup rows: the statistic through the rollup as the repository runs it (cover "
        "query + statement); refresh cpu ms: the refreshing backend's CPU"
    )
    return "\n".join(lines)


def server_parser(description: str, *, rows: int, repeats: int) -> argparse.ArgumentParser:
    """The options of a benchmark on a database of its own on a PostgreSQL server (this one and
    bench/scale.py): the server, how many rows, how many timed runs, the data's seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default=None, help="PostgreSQL server URL (any database on it)")
    parser.add_argument("--rows", type=int, default=rows)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = server_parser(__doc__.splitlines()[0], rows=1_000_000, repeats=15)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = run(args.url, rows=args.rows, repeats=args.repeats, seed=args.seed)
    print(format_table(results))
    print(f"target: median <= {TARGET_MS:.0f} ms per query")


if __name__ == "__main__":
    main()
