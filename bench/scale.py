"""Scale benchmark of the partitioned ``nlu_prompt_logs`` (PostgreSQL, migration 0007): how cost
grows with rows. Run on purpose, not in CI (20M rows: tens of GB of disk and about an hour).

    .venv/bin/python -m bench.scale [--rows 20000000] [--repeats 7] [--url postgresql://...]
                                    [--probe-rows 100000] [--skip-fresh] [--json PATH]

1. A database of its own (``capture.db.create_database``), migrated; daily partitions over the
   120 days of data (what the retention flow keeps ahead; ``ensure_partitions``).
2. ``--rows`` synthetic rows (realistic intent / confidence / outcome / correction mix, as in
   ``bench/queries.py``) over the 120 days before today's UTC midnight, loaded through the
   capture writer (``capture.copy_writer.PostgresWriter``: binary COPY of wire rows, 5,000 per
   transaction) in three rounds, each spread over the whole 120 days: up to N/20, N/2 and N rows
   (1M, 10M and 20M by default).
3. Ingest: before the first round and after the second and third, ``--probe-rows`` live rows
   (``created_at`` = now: today's partition, no trigger fires, as live traffic) through the same
   writer, three times (median rows/s); then deleted and vacuumed.
4. At each checkpoint (after ``VACUUM ANALYZE`` and a rollup refresh): every monitoring
   statistic as the repository runs it (rollup cover + statement; the raw statements too, for
   reference), the review queries, a lookup by id (near its time: one partition), the monitor's
   hourly query, and the two exports (review candidates and retraining rows of the last 7 days,
   reported as rows/s). Median of ``--repeats`` after a warm-up.
5. Retention of the oldest 30 days (``tasks.retention.run_retention`` with ``now`` = the data's
   end and 90 days: exactly 30 whole partitions): detach (the lock), copy into the training
   store (rows/s), drop; and the table + index size on disk before and after, against a fresh
   load of the remaining rows into a new database (no bloat: equal sizes).

Targets (issue 16): ingest at N within 10% of ingest at 0; every monitoring / review query
<= 20 ms at N; dropping 30 days of partitions <= 10 s.
"""

from __future__ import annotations

import asyncio
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
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from bench.queries import (
    ROLLUP_CASES,
    _backend_cpu_ms,
    _schedstat_ns,
    rollup_runner,
    server_parser,
)
from bench.scale_data import RowMaker, round_chunks
from capture import db, offline_statements, partitions, statements, stats_rollup
from capture.copy_writer import PostgresWriter
from capture.settings import PartitionInterval, normalise_database_url
from capture.spool_format import INSERT, Op
from capture.values import floor_day, floor_hour, since_days
from tasks.retention import run_retention

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
DAYS = 120
RETENTION_DAYS = 90
TARGET_MS = 20.0
BATCH = 5_000  # the capture logger's batch_size


async def _write(url: str, rows: list[Any]) -> tuple[float, float | None]:
    """``rows`` through the capture writer, ``BATCH`` per transaction (as the logger does);
    returns (wall seconds, the server backend's CPU seconds or None when not on this host)."""
    writer = PostgresWriter(url, "pc-bench-scale")
    try:
        conn = await writer._connection()
        pid = conn.info.backend_pid
        cpu_before = _schedstat_ns(pid)
        started = time.perf_counter()
        for i in range(0, len(rows), BATCH):
            ops: list[Op] = [
                (INSERT, i + j, row, None) for j, row in enumerate(rows[i : i + BATCH])
            ]
            unknown = await writer.apply(ops, idempotent=False)
            assert not unknown
        wall = time.perf_counter() - started
        cpu_after = _schedstat_ns(pid)
    finally:
        await writer.close()
    cpu = None if cpu_before is None or cpu_after is None else (cpu_after - cpu_before) / 1e9
    return wall, cpu


def load(url: str, chunks: Iterator[list[Any]]) -> tuple[int, float]:
    """(rows, seconds spent writing) — generation time is not counted."""
    total, seconds = 0, 0.0
    for rows in chunks:
        wall, _ = asyncio.run(_write(url, rows))
        seconds += wall
        total += len(rows)
    return total, seconds


def probe_ingest(
    url: str, maker: RowMaker, n: int, seed: int, repeats: int = 5
) -> dict[str, float | None]:
    """``n`` live rows (created now, into today's partition) ``repeats`` times: median rows/s
    and median server CPU µs per row. Each run's rows are deleted and the partition vacuumed
    afterwards, so every run starts from the same table."""
    rates, cpus = [], []
    for r in range(repeats):
        rng = np.random.default_rng(seed + r)
        with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # every run starts with no dirty buffers to write back
        now = time.time()
        rows = maker.rows(np.sort(now + rng.uniform(0, 60, n)), rng, now)
        wall, cpu = asyncio.run(_write(url, rows))
        rates.append(n / wall)
        if cpu is not None:
            cpus.append(cpu / n * 1e6)
        with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
            conn.execute(
                "DELETE FROM nlu_prompt_logs WHERE created_at >= to_timestamp(%s)", (now - 1,)
            )
            today = partitions.partition_name(floor_day(datetime.fromtimestamp(now, UTC)))
            conn.execute(f"VACUUM {today}")
    return {
        "rows_per_s": statistics.median(rates),
        "server_cpu_us_per_row": statistics.median(cpus) if cpus else None,
    }


# --------------------------------------------------------------------------- queries

Runner = Callable[[Connection], int]


def _statement(stmt: Any) -> Runner:
    return lambda conn: len(conn.execute(stmt).all())


def cases(
    now: datetime, data_end: datetime, user_id: Any, log_id: Any
) -> list[tuple[str, str, Runner]]:
    """(kind, label, runner): ``monitoring`` / ``review`` (20 ms targets), ``raw`` (reference:
    the statistics without the rollup), ``export`` (rows/s). The monitor's hourly query reads
    the last hour of data."""
    week = now - timedelta(days=7)
    hour = floor_hour(data_end) - timedelta(hours=1)
    s = statements
    out: list[tuple[str, str, Runner]] = [
        ("monitoring", label, rollup_runner(builder, since_days(now, days)))
        for label, builder, days in ROLLUP_CASES
    ]
    out += [
        (
            "monitoring",
            "monitor: intent counts, last hour",
            _statement(
                offline_statements.select_intent_counts(
                    start=hour, end=hour + timedelta(hours=1), low_confidence_threshold=0.7
                )
            ),
        ),
        ("review", "low_confidence(0.7, 100)", _statement(s.select_low_confidence())),
        ("review", "low_confidence(0.7, 100, 7d)", _statement(s.select_low_confidence(since=week))),
        ("review", "failed_workflows(100)", _statement(s.select_failed_workflows())),
        ("review", "user_prompts(50)", _statement(s.select_user_prompts(user_id))),
        (
            "review",
            "prompt_log by id (near its time)",
            _statement(s.select_prompt_log(log_id, near_id_time=True)),
        ),
        ("raw", "raw prompt_log by id (every partition)", _statement(s.select_prompt_log(log_id))),
        (
            "raw",
            "raw confidence_distribution(7d)",
            _statement(s.select_confidence_distribution(since=week)),
        ),
        (
            "raw",
            "raw intent_distribution(7d)",
            _statement(s.select_intent_distribution(since=week)),
        ),
        ("raw", "raw success_rate_by_intent(all)", _statement(s.select_success_rate_by_intent())),
        (
            "export",
            "export: review candidates (7d)",
            _statement(
                offline_statements.select_review_candidates(
                    confidence_below=0.7, since=week, until=now
                )
            ),
        ),
        (
            "export",
            "export: prompts_for_retraining(7d)",
            _statement(s.select_for_retraining(since=week)),
        ),
    ]
    return out


def time_case(engine: Engine, run: Runner, repeats: int) -> dict[str, Any]:
    """Median and p95 wall ms after one warm-up run, rows, and the server backend's median CPU
    ms per run with a serial plan (what one idle core needs; the machine may be busy)."""
    timings = []
    with engine.connect() as conn:
        rows = run(conn)
        for _ in range(repeats):
            started = time.perf_counter()
            rows = run(conn)
            timings.append((time.perf_counter() - started) * 1000)
    return {
        "median_ms": statistics.median(timings),
        "p95_ms": float(np.percentile(timings, 95)),
        "cpu_ms": _backend_cpu_ms(engine, run, repeats),
        "rows": rows,
    }


def plan_of_lookup(engine: Engine, log_id: Any) -> list[str]:
    stmt = statements.select_prompt_log(log_id, near_id_time=True)
    compiled = stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql("EXPLAIN " + str(compiled))]


def checkpoint(
    engine: Engine, url: str, now: datetime, data_end: datetime, repeats: int
) -> dict[str, Any]:
    """VACUUM ANALYZE, refresh the rollup, time every case."""
    out: dict[str, Any] = {}
    started = time.perf_counter()
    with psycopg.connect(db.libpq_url(url), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) nlu_prompt_logs")
        user = conn.execute(
            "SELECT user_id FROM nlu_prompt_logs WHERE user_id IS NOT NULL "
            "AND created_at > now() - interval '1 day' LIMIT 1"
        ).fetchone()
        log = conn.execute(
            "SELECT id FROM nlu_prompt_logs WHERE created_at > now() - interval '3 days' LIMIT 1"
        ).fetchone()
    out["vacuum_analyze_s"] = time.perf_counter() - started
    started = time.perf_counter()
    with Session(engine) as session:
        refresh = stats_rollup.refresh_prompt_stats(session=session, wait_timeout=5)
        session.commit()
    out["refresh_s"] = time.perf_counter() - started
    out["refresh"] = refresh.as_dict()
    assert user is not None and log is not None
    out["lookup_plan"] = plan_of_lookup(engine, log[0])
    out["queries"] = {}
    for kind, label, run in cases(now, data_end, user[0], log[0]):
        out["queries"][label] = {"kind": kind, **time_case(engine, run, repeats)}
    return out


# --------------------------------------------------------------------------- sizes


def sizes(url: str, since: datetime | None = None) -> dict[str, int]:
    """Bytes on disk of the partitions (those starting at or after ``since``, and the DEFAULT
    one): heap (with TOAST), indexes, total."""
    total = {"table": 0, "indexes": 0, "total": 0, "partitions": 0}
    engine = create_engine(normalise_database_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            kept = {
                p.name
                for p in partitions.list_partitions(conn)
                if since is None or p.start is None or p.start >= since
            }
            rows = conn.exec_driver_sql(
                "SELECT c.relname, pg_table_size(c.oid), pg_indexes_size(c.oid), "
                "pg_total_relation_size(c.oid) FROM pg_inherits AS i "
                "JOIN pg_class AS c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'nlu_prompt_logs'::regclass"
            ).all()
    finally:
        engine.dispose()
    for name, table, indexes, whole in rows:
        if name in kept:
            total["table"] += int(table)
            total["indexes"] += int(indexes)
            total["total"] += int(whole)
            total["partitions"] += 1
    return total


def fresh_load_size(
    server: str, url: str, start: datetime, end: datetime, interval: PartitionInterval
) -> dict[str, int]:
    """The sizes of the remaining rows loaded into a new database (binary COPY in the order
    they arrived, then VACUUM ANALYZE), to compare with the database they came from after its
    partitions were dropped."""
    fresh = db.create_database(server, "pc_bench_fresh")
    try:
        db.upgrade(fresh)
        engine = create_engine(normalise_database_url(fresh), poolclass=NullPool)
        with engine.begin() as conn:
            partitions.ensure_partitions(conn, start=start, end=end, interval=interval)
        engine.dispose()
        with (
            psycopg.connect(db.libpq_url(url)) as src,
            psycopg.connect(db.libpq_url(fresh)) as dst,
        ):
            with (
                # Partition by partition in heap order, i.e. in the order the rows arrived.
                src.cursor().copy(
                    "COPY (SELECT * FROM nlu_prompt_logs) TO STDOUT (FORMAT BINARY)"
                ) as out,
                dst.cursor().copy("COPY nlu_prompt_logs FROM STDIN (FORMAT BINARY)") as into,
            ):
                for data in out:
                    into.write(data)
            dst.commit()
        with psycopg.connect(db.libpq_url(fresh), autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) nlu_prompt_logs")
        return sizes(fresh)
    finally:
        db.clear_engine_cache()
        db.drop_database(server, fresh)


# --------------------------------------------------------------------------- the run


def run(
    url: str | None = None,
    *,
    rows: int = 20_000_000,
    repeats: int = 7,
    probe_rows: int = 100_000,
    seed: int = 0,
    fresh: bool = True,
    interval: PartitionInterval = "day",
) -> dict[str, Any]:
    server = db.libpq_url(
        url or os.environ.get("PROMPT_CAPTURE_BENCH_POSTGRES_URL") or DEFAULT_SERVER
    )
    bench_url = db.create_database(server, "pc_scale")
    engine = create_engine(bench_url, poolclass=NullPool)
    result: dict[str, Any] = {
        "rows": rows,
        "interval": interval,
        "checkpoints": {},
        "ingest": {},
    }
    try:
        db.upgrade(bench_url)
        end = floor_day(datetime.now(UTC))  # the data ends at today's UTC midnight
        start = end - timedelta(days=DAYS)
        with engine.begin() as conn:
            partitions.ensure_partitions(conn, start=start, end=end, interval=interval)
        maker = RowMaker(seed)
        marks = [max(1, rows // 20), max(2, rows // 2), rows]
        result["ingest"]["probe_0"] = probe_ingest(bench_url, maker, probe_rows, seed + 100)
        logger.warning("ingest probe at 0 rows: %s", result["ingest"]["probe_0"])
        present = 0
        for index, mark in enumerate(marks):
            chunks = round_chunks(
                maker, mark - present, start.timestamp(), end.timestamp(), seed + index
            )
            loaded, seconds = load(bench_url, chunks)
            present += loaded
            result["ingest"][f"load_round_{index + 1}"] = {
                "rows": loaded,
                "present_before": present - loaded,
                "rows_per_s": loaded / seconds,
            }
            logger.warning(
                "loaded %d rows (%d present) at %.0f rows/s", loaded, present, loaded / seconds
            )
            if index > 0:
                result["ingest"][f"probe_{present}"] = probe_ingest(
                    bench_url, maker, probe_rows, seed + 100 + index
                )
            result["checkpoints"][present] = checkpoint(
                engine, bench_url, datetime.now(UTC), end, repeats
            )
            result["checkpoints"][present]["sizes"] = sizes(bench_url)
        cutoff = end - timedelta(days=RETENTION_DAYS)
        before, kept_before = sizes(bench_url), sizes(bench_url, since=cutoff)
        retention = run_retention(
            bench_url,
            retention_days=RETENTION_DAYS,
            now=end,
            batch_size=10_000,
            partition_interval=interval,
        )
        after = sizes(bench_url)
        result["retention"] = {
            **retention.as_dict(),
            "seconds": retention.seconds,
            "sizes_before": before,
            "sizes_kept_before": kept_before,
            "sizes_after": after,
        }
        if fresh:
            result["retention"]["sizes_fresh_load"] = fresh_load_size(
                server, bench_url, cutoff, end + timedelta(days=14), interval
            )
    finally:
        engine.dispose()
        db.clear_engine_cache()
        db.drop_database(server, bench_url)
    return result


def format_report(result: dict[str, Any]) -> str:
    points = sorted(result["checkpoints"])
    lines = [f"rows present -> {', '.join(f'{p:,}' for p in points)}"]
    ingest = result["ingest"]
    probes = sorted((int(k.split("_")[1]), v) for k, v in ingest.items() if k.startswith("probe"))
    base = probes[0][1]
    lines.append(
        "ingest of live rows (capture writer: binary COPY, 5,000 per transaction; rows/s and "
        "the server backend's CPU per row):"
    )
    for present, probe in probes:
        rate, cpu = probe["rows_per_s"], probe["server_cpu_us_per_row"]
        cpu_text = "" if cpu is None else f", {cpu:.1f} µs CPU/row"
        if cpu is not None and base["server_cpu_us_per_row"]:
            cpu_text += f" ({cpu / base['server_cpu_us_per_row'] - 1:+.1%})"
        lines.append(
            f"  {present:>12,} present: {rate:>9,.0f} rows/s "
            f"({rate / base['rows_per_s'] - 1:+.1%} vs 0){cpu_text}"
        )
    for key in sorted(k for k in ingest if k.startswith("load_round")):
        r = ingest[key]
        lines.append(
            f"  load round {key[-1]} (backfill, {r['rows']:,} rows onto "
            f"{r['present_before']:,}): {r['rows_per_s']:,.0f} rows/s"
        )
    header = "".join(f"{p:>16,}" for p in points)
    lines.append(f"{'query: median wall ms / server CPU ms':<40}{header}  rows@N  20 ms target")
    queries = result["checkpoints"][points[-1]]["queries"]
    for label, last in queries.items():
        cells = ""
        for p in points:
            q = result["checkpoints"][p]["queries"][label]
            cpu = "-" if q["cpu_ms"] is None else f"{q['cpu_ms']:.1f}"
            cells += f"{q['median_ms']:>10.1f} /{cpu:>4}"
        target = ""
        if last["kind"] in ("monitoring", "review"):
            best = min(last["median_ms"], last["cpu_ms"] or last["median_ms"])
            target = (
                "met"
                if last["median_ms"] <= TARGET_MS
                else ("met on CPU (wall > 20 ms)" if best <= TARGET_MS else "MISSED")
            )
        elif last["kind"] == "export":
            target = f"export: {last['rows'] / (last['median_ms'] / 1000):,.0f} rows/s"
        else:
            target = "(reference, not what the code runs)"
        lines.append(f"{label:<40}{cells}{last['rows']:>8}  {target}")
    for p in points:
        c = result["checkpoints"][p]
        sz = c["sizes"]
        lines.append(
            f"at {p:>12,}: VACUUM ANALYZE {c['vacuum_analyze_s']:.1f} s, rollup refresh "
            f"{c['refresh_s']:.1f} s; table {sz['table'] / 2**20:,.0f} MiB + indexes "
            f"{sz['indexes'] / 2**20:,.0f} MiB in {sz['partitions']} partitions"
        )
    lines.append(
        "lookup by id near its time: "
        + " / ".join(line.strip() for line in result["checkpoints"][points[-1]]["lookup_plan"][:2])
    )
    r = result["retention"]
    secs = r["seconds"]
    copy_rate = r["copied"] / secs["copy"] if secs.get("copy") else float("nan")
    lines.append(
        f"retention of the oldest {DAYS - RETENTION_DAYS} days: {r['partitions_dropped']} "
        f"partitions, {r['deleted']:,} rows; detach (one lock) {secs.get('detach', 0) * 1000:.0f} "
        f"ms, drop {secs.get('drop', 0) * 1000:.0f} ms, copy to the training store "
        f"{secs.get('copy', 0):.1f} s = {copy_rate:,.0f} rows/s, row-wise rest "
        f"{secs.get('rows', 0) * 1000:.0f} ms"
    )

    def mib(sz: dict[str, int]) -> str:
        return (
            f"{sz['total'] / 2**20:,.0f} MiB (table {sz['table'] / 2**20:,.0f} + indexes "
            f"{sz['indexes'] / 2**20:,.0f}, {sz['partitions']} partitions)"
        )

    lines.append(f"size on disk before retention: {mib(r['sizes_before'])}")
    lines.append(f"  the partitions kept, before: {mib(r['sizes_kept_before'])}")
    lines.append(f"  after the drop:              {mib(r['sizes_after'])}")
    if "sizes_fresh_load" in r:
        f, a = r["sizes_fresh_load"], r["sizes_after"]
        lines.append(
            f"  fresh load of those rows:    {mib(f)}: after/fresh {a['total'] / f['total']:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = server_parser(__doc__.splitlines()[0], rows=20_000_000, repeats=7)
    parser.add_argument("--probe-rows", type=int, default=100_000)
    parser.add_argument("--skip-fresh", action="store_true", help="no fresh-load comparison")
    parser.add_argument("--interval", choices=partitions.INTERVALS, default="day")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    result = run(
        args.url,
        rows=args.rows,
        repeats=args.repeats,
        probe_rows=args.probe_rows,
        seed=args.seed,
        fresh=not args.skip_fresh,
        interval=args.interval,
    )
    result["wall_s"] = time.perf_counter() - started
    print(format_report(result))
    print(f"wall time {result['wall_s'] / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
