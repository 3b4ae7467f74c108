"""Benchmark of the review workbench: the server's handler time per decision, 10 reviewers at once,
a queue of 100,000 prompts, on SQLite and PostgreSQL. Target: p95 ≤ 30 ms.

For each database: a fresh database (a temporary SQLite file; a new database on the PostgreSQL
server, dropped at the end) is migrated and seeded directly — ``--prompts`` logged prompts with
three runners-up each, one open round whose queue holds all of them (10 % marked for double
review, as the default share), ``--reviewers`` users. The workbench then runs in a separate
process (uvicorn, one worker, as ``prompt-capture review-ui`` does), and ``--reviewers`` client
threads log in and decide as fast as they can: ``POST /api/decide`` (two in three confirm, one in
three picks the first alternative), which writes the decision and answers with the next leased
item, each after a pause of ``--think-ms`` (default 500 ms, uniform 0.5x-1.5x: a fast human;
``--think-ms 0`` saturates the server, and then the handler time is mostly queueing). The
handler time is the server's own ``Server-Timing: handler;dur=`` (request arrival to
response start, measured inside the server process), so client-side time is excluded.

    .venv/bin/python -m bench.review_ui [--prompts 100000] [--reviewers 10] [--decisions 200]
        [--postgres-url postgresql://postgres@127.0.0.1:5432/postgres] [--only sqlite|postgres]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
from argon2 import PasswordHasher
from sqlalchemy import Table, insert

from capture import db
from capture.ids import uuid7
from capture.models import PromptLog
from capture.values import as_real
from tasks.review_tables import items, rounds, users
from tests.test_review_ui_support import make_home

logger = logging.getLogger(__name__)

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
LABELS = [f"intent_{i:03d}" for i in range(150)] + ["oos"]
PASSWORD = "bench password 1"
TARGET_MS = 30.0
CHUNK = 5_000
CSRF = re.compile(r'name="csrf-token" content="([^"]+)"')
TIMING = re.compile(r"handler;dur=([0-9.]+)")


def seed(url: str, n_prompts: int, n_reviewers: int) -> uuid.UUID:
    """Logs, one round with every log queued (10 % double review), reviewers; the round id."""
    logs = cast(Table, PromptLog.__table__)
    now = datetime.now(UTC)
    engine = db.get_sync_engine(url)
    round_id = uuid7()
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            insert(rounds).values(
                id=round_id,
                name="bench",
                status="open",
                strategy="threshold",
                budget=n_prompts,
                double_review_share=0.1,
                params={},
                created_by=None,
                created_at=now,
            )
        )
        hashed = PasswordHasher().hash(PASSWORD)
        conn.execute(
            insert(users),
            [
                {
                    "id": uuid7(),
                    "name": f"reviewer{i}",
                    "role": "reviewer",
                    "password_hash": hashed,
                    "active": True,
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(n_reviewers)
            ],
        )
    for start in range(0, n_prompts, CHUNK):
        log_rows, item_rows = [], []
        for i in range(start, min(n_prompts, start + CHUNK)):
            predicted = LABELS[i % 150]
            log_id = uuid.uuid4()
            log_rows.append(
                {
                    "id": log_id,
                    "prompt": f"bench prompt {i}: please help with {predicted} (ref {i * 7919})",
                    "predicted_intent": predicted,
                    "confidence": as_real(0.2 + 0.5 * (i % 1000) / 1000),
                    "secondary_intents": [
                        {"intent": LABELS[(i + k) % 150], "confidence": 0.1 / k} for k in (1, 2, 3)
                    ],
                    "model_version": "1",
                    "created_at": now - timedelta(seconds=i),
                    "updated_at": now - timedelta(seconds=i),
                }
            )
            double = i % 10 == 0
            item_rows.append(
                {
                    "id": uuid7(),
                    "round_id": round_id,
                    "log_id": log_id,
                    "position": i,
                    "state": "pending",
                    "group_id": None,
                    "group_size": 1,
                    "double_review": double,
                    "reviews_needed": 2 if double else 1,
                    "reviews_done": 0,
                }
            )
        with engine.begin() as conn:
            conn.execute(insert(logs), log_rows)
            conn.execute(insert(items), item_rows)
    if db.is_postgres(url):
        with engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
    logger.info("seeded %d prompts in %.1f s", n_prompts, time.perf_counter() - started)
    return round_id


def _reviewer(
    base: str,
    name: str,
    round_id: uuid.UUID,
    n: int,
    *,
    out: list[float],
    errors: list[str],
    think_ms: float = 0.0,
) -> None:
    client = httpx.Client(base_url=base, timeout=60)
    token = CSRF.search(client.get("/login").text)
    assert token is not None
    answer = client.post(
        "/login",
        data={"username": name, "password": PASSWORD, "csrf_token": token.group(1)},
    )
    if answer.status_code != 303:
        errors.append(f"{name}: login {answer.status_code}")
        return
    page_token = CSRF.search(client.get("/review").text)
    assert page_token is not None
    headers = {"X-CSRF-Token": page_token.group(1)}
    item = client.get(f"/api/next?round={round_id}").json()["item"]
    rng = random.Random(name)
    for k in range(n):
        if item is None:
            break
        if think_ms:
            time.sleep(think_ms * rng.uniform(0.5, 1.5) / 1000.0)
        body: dict[str, Any] = {"item_id": item["item_id"], "action": "confirm"}
        if k % 3 == 2 and item["alternatives"]:
            body = {
                "item_id": item["item_id"],
                "action": "correct",
                "intent": item["alternatives"][0]["intent"],
            }
        answer = client.post("/api/decide", json=body, headers=headers)
        if answer.status_code != 200:
            errors.append(f"{name}: {answer.status_code} {answer.text[:200]}")
            item = answer.json().get("item")
            continue
        found = TIMING.search(answer.headers.get("server-timing", ""))
        if found:
            out.append(float(found.group(1)))
        item = answer.json()["item"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(url: str, label: str, args: argparse.Namespace) -> dict[str, Any]:
    """Seed, serve in a subprocess, drive ``args.reviewers`` clients; the handler-time summary."""
    db.upgrade(url)
    round_id = seed(url, args.prompts, args.reviewers)
    home = Path(tempfile.mkdtemp(prefix="bench-review-ui-"))
    make_home(home, tuple(LABELS))  # the serving model's 151 labels: the workbench's catalogue
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.review_ui", "--serve", url, str(home), str(port)],
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(base + "/login", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the workbench server did not start") from None
                time.sleep(0.2)
        warm: list[float] = []
        _reviewer(base, "reviewer0", round_id, 20, out=warm, errors=[])
        times: list[float] = []
        errors: list[str] = []
        threads = [
            threading.Thread(
                target=_reviewer,
                args=(base, f"reviewer{i}", round_id, args.decisions),
                kwargs={"out": times, "errors": errors, "think_ms": args.think_ms},
            )
            for i in range(args.reviewers)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    summary = {
        "database": label,
        "prompts": args.prompts,
        "reviewers": args.reviewers,
        "think_ms": args.think_ms,
        "decisions": len(times),
        "errors": len(errors),
        "p50_ms": round(statistics.median(times), 2) if times else None,
        "p95_ms": round(_percentile(times, 0.95), 2) if times else None,
        "p99_ms": round(_percentile(times, 0.99), 2) if times else None,
        "max_ms": round(max(times), 2) if times else None,
        "decisions_per_s": round(len(times) / wall, 1) if wall else None,
    }
    if errors:
        logger.warning("%s: %d errors, first: %s", label, len(errors), errors[0])
    return summary


def _free_port() -> int:
    from review_ui.server import free_port

    return free_port()


def _serve(url: str, home: str, port: str) -> None:
    from review_ui.server import serve
    from review_ui.settings import WorkbenchSettings

    settings = WorkbenchSettings(home=Path(home), database_url=url, secret_key="b" * 48)
    serve(settings, host="127.0.0.1", port=int(port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--reviewers", type=int, default=10)
    parser.add_argument("--decisions", type=int, default=200, help="per reviewer")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("PROMPT_CAPTURE_BENCH_POSTGRES_URL", DEFAULT_SERVER),
    )
    parser.add_argument(
        "--think-ms",
        type=float,
        default=500.0,
        help="a reviewer's mean pause between decisions (uniform 0.5x-1.5x); 0 saturates",
    )
    parser.add_argument("--only", choices=("sqlite", "postgres"))
    parser.add_argument("--serve", nargs=3, metavar=("URL", "HOME", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.serve:
        _serve(*args.serve)
        return
    results = []
    if args.only in (None, "sqlite"):
        folder = Path(tempfile.mkdtemp(prefix="bench-review-ui-db-"))
        results.append(run(f"sqlite:///{folder / 'bench.db'}", "sqlite", args))
    if args.only in (None, "postgres"):
        server = args.postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)
        name = f"bench_review_ui_{os.getpid()}"
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = server.rpartition("/")
        url = f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
        try:
            results.append(run(url, "postgres", args))
        finally:
            db.clear_engine_cache()
            with psycopg.connect(server, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(
        f"review workbench: handler time per decision ({datetime.now(UTC):%Y-%m-%d}, "
        f"target p95 <= {TARGET_MS:g} ms)"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores)")
    print(
        f"{'database':10} {'prompts':>8} {'reviewers':>9} {'think ms':>8} {'decisions':>9} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'dec/s':>7} errors"
    )
    for r in results:
        print(
            f"{r['database']:10} {r['prompts']:>8} {r['reviewers']:>9} {r['think_ms']:>8g} "
            f"{r['decisions']:>9} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['p99_ms']:>8} "
            f"{r['max_ms']:>8} {r['decisions_per_s']:>7} {r['errors']}"
        )


if __name__ == "__main__":
    main()
