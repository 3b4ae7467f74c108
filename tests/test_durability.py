"""Durability of the capture logger: connection kills, outages, a full queue, SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from capture import db
from capture.service import NLUService
from tests.capture_helpers import count_rows, fetch_rows, fixed_service

REPO = Path(__file__).resolve().parents[1]


def _empty(url: str) -> None:
    with db.get_sync_engine(url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))


def _spool_files(home: Path) -> list[Path]:
    return sorted((home / "spool").glob("*.jsonl")) if (home / "spool").is_dir() else []


class RecordingSleep:
    """Backoff sleeps, shortened and recorded."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(min(delay, 0.02))


def _terminate(server_url: str, application_name: str, wait_s: float = 0.0) -> int:
    """Kill the backends of ``application_name`` (waiting up to ``wait_s`` for one to exist)."""
    deadline = time.monotonic() + wait_s
    with psycopg.connect(server_url, autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                [application_name],
            ).fetchall()
            if rows or time.monotonic() > deadline:
                return sum(1 for (ok,) in rows if ok)
            time.sleep(0.01)


@pytest.fixture
def outage(postgres_server_url: str, postgres_url: str) -> Iterator[list[str]]:
    """``outage.append(app)`` blocks new connections to the test database and kills ``app``'s;
    the database is opened again at the end whatever happens."""
    name = postgres_url.rpartition("/")[2]
    blocked: list[str] = []

    def set_allowed(allowed: bool) -> None:
        with psycopg.connect(postgres_server_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}')

    class Outage(list[str]):
        def append(self, app: str) -> None:
            set_allowed(False)
            super().append(app)
            _terminate(postgres_server_url, app)

        def end(self) -> None:
            set_allowed(True)

    control = Outage()
    yield control
    control.end()
    del blocked


@pytest.mark.postgres
async def test_terminated_writer_connection_mid_stream_loses_nothing(
    postgres_server_url: str, postgres_url: str, tmp_path: Path
) -> None:
    """50,000 prompts with outcomes; the writer's backend is killed three times mid-stream."""
    _empty(postgres_url)
    app = f"pc-test-writer-{uuid.uuid4().hex[:8]}"
    sleep = RecordingSleep()
    service = fixed_service(
        postgres_url, tmp_path / "home", batch_size=2_000, application_name=app, sleep=sleep
    )
    total = 50_000
    kills: list[int] = []
    ids: list[uuid.UUID] = []
    lag = 700
    for i in range(total):
        if i in (10_000, 25_000, 40_000):
            kills.append(await asyncio.to_thread(_terminate, postgres_server_url, app, 30.0))
        result = await service.process_message(f"prompt number {i}", message_index=i % 1000)
        ids.append(result.log_id)
        if i >= lag:
            j = i - lag
            await service.update_workflow_outcome(ids[j], j % 3 == 0, f"wf-{j % 7}")
        if i % 200 == 0:
            await asyncio.sleep(0)  # a real server yields between requests
    for j in range(total - lag, total):
        await service.update_workflow_outcome(ids[j], j % 3 == 0, f"wf-{j % 7}")
    await service.flush(timeout=120)

    assert kills == [1, 1, 1]
    assert count_rows(postgres_url) == (total, total)
    rows = fetch_rows(postgres_url)
    assert set(rows) == set(ids)
    for j, log_id in enumerate(ids):
        row = rows[log_id]
        assert (row["was_successful"], row["workflow_type"]) == (j % 3 == 0, f"wf-{j % 7}")
        assert row["prompt"] == f"prompt number {j}"
    stats = service.stats()
    assert stats.connection_errors >= 3
    assert stats.rejected == 0
    assert stats.pending == 0
    await service.aclose()
    assert _spool_files(tmp_path / "home") == []


@pytest.mark.postgres
async def test_outage_spools_and_replays_exactly_once(
    postgres_url: str, tmp_path: Path, outage: list[str]
) -> None:
    _empty(postgres_url)
    app = f"pc-test-outage-{uuid.uuid4().hex[:8]}"
    sleep = RecordingSleep()
    home = tmp_path / "home"
    service = fixed_service(postgres_url, home, batch_size=500, application_name=app, sleep=sleep)
    before = [await service.process_message(f"before {i}") for i in range(1_000)]
    await service.flush()

    outage.append(app)  # database refuses connections; the writer's is killed
    during = []
    for i in range(2_000):
        during.append(await service.process_message(f"during {i}"))
        if i % 100 == 0:
            await asyncio.sleep(0.005)
    for result in before + during:
        await service.update_workflow_outcome(result.log_id, True, "outage")
    await asyncio.sleep(0.2)
    stats = service.stats()
    assert stats.spooled > 0 and stats.connection_errors >= 1
    assert _spool_files(home), "the spool holds the operations while the database is away"
    assert count_rows(postgres_url)[0] == 1_000
    # Exponential backoff while the database stays away.
    assert sleep.delays[:3] == [0.05, 0.1, 0.2]

    outage.end()  # type: ignore[attr-defined]
    await service.flush(timeout=60)
    assert count_rows(postgres_url) == (3_000, 3_000)
    rows = fetch_rows(postgres_url)
    assert all(
        r["was_successful"] is True and r["workflow_type"] == "outage" for r in rows.values()
    )
    stats = service.stats()
    assert stats.replayed > 0 and stats.rejected == 0 and stats.pending == 0
    await service.aclose()
    assert _spool_files(home) == []


@pytest.mark.postgres
async def test_close_during_outage_leaves_the_spool_for_the_next_start(
    postgres_url: str, tmp_path: Path, outage: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    _empty(postgres_url)
    app = f"pc-test-close-{uuid.uuid4().hex[:8]}"
    home = tmp_path / "home"
    service = fixed_service(
        postgres_url, home, batch_size=200, application_name=app, sleep=RecordingSleep()
    )
    await service.process_message("warm up")
    await service.flush()
    outage.append(app)
    results = [await service.process_message(f"late {i}") for i in range(500)]
    with caplog.at_level(logging.WARNING, logger="capture.logger"):
        await service.aclose(timeout=0.5)
    assert "left in" in caplog.text and "the next start replays them" in caplog.text
    assert _spool_files(home)
    outage.end()  # type: ignore[attr-defined]

    restarted = fixed_service(postgres_url, home, batch_size=200)
    await restarted.flush(timeout=60)
    assert count_rows(postgres_url) == (501, 501)
    assert {r.log_id for r in results} <= set(fetch_rows(postgres_url))
    assert restarted.stats().replayed == 500
    await restarted.aclose()
    assert _spool_files(home) == []


async def test_full_queue_spills_to_the_spool_in_order(db_url: str, tmp_path: Path) -> None:
    service = fixed_service(db_url, tmp_path / "home", buffer_size=100, batch_size=50)
    results = []
    for i in range(1_000):  # no await that yields: the writer cannot drain meanwhile
        result = await service.process_message(f"burst {i}")
        await service.update_workflow_outcome(result.log_id, i % 2 == 0, "burst")
        await service.update_workflow_outcome(result.log_id, i % 2 == 1, f"final-{i}")
        results.append(result)
    assert service.stats().spooled > 0
    await service.flush(timeout=60)
    rows = fetch_rows(db_url)
    assert count_rows(db_url) == (1_000, 1_000)
    for i, result in enumerate(results):
        row = rows[result.log_id]
        assert (row["was_successful"], row["workflow_type"]) == (i % 2 == 1, f"final-{i}")
    stats = service.stats()
    assert stats.rejected == 0 and stats.pending == 0
    await service.aclose()
    assert _spool_files(tmp_path / "home") == []


@pytest.mark.parametrize("durability", ["spool", "fsync"])
async def test_journal_modes_write_and_clean_up(
    db_url: str, tmp_path: Path, durability: str
) -> None:
    home = tmp_path / "home"
    service = fixed_service(db_url, home, durability=durability)
    results = [await service.process_message(f"journal {i}") for i in range(300)]
    for result in results[::3]:
        await service.update_workflow_outcome(result.log_id, False, "j", "failed")
    stats = service.stats()
    assert stats.journaled == stats.queued == 400
    assert _spool_files(home), "every operation is on disk before process_message returns"
    await service.aclose()
    assert _spool_files(home) == []
    rows = fetch_rows(db_url)
    assert len(rows) == 300
    assert sum(1 for r in rows.values() if r["execution_error"] == "failed") == 100


@pytest.mark.postgres
def test_sigkill_in_spool_mode_loses_nothing(postgres_url: str, tmp_path: Path) -> None:
    _empty(postgres_url)
    home, out, count = tmp_path / "home", tmp_path / "ids.txt", 2_000
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.capture_child",
            postgres_url,
            str(home),
            str(count),
            str(out),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        deadline = time.monotonic() + 120
        while not out.exists():
            assert child.poll() is None, f"child exited with {child.returncode}"
            assert time.monotonic() < deadline, "child did not report in time"
            time.sleep(0.05)
        ids = [uuid.UUID(line) for line in out.read_text().split()]
        assert len(ids) == count
        # Only the flushed first half is in the database; the rest is in the child's spool.
        assert count_rows(postgres_url)[0] == count // 2
        assert _spool_files(home)

        # A live process's segment is never replayed by another process.
        async def start_and_flush() -> NLUService:
            service = fixed_service(postgres_url, home)
            await service.flush(timeout=60)
            return service

        bystander = asyncio.run(_started_then_closed(start_and_flush))
        assert bystander.replayed == 0
        assert count_rows(postgres_url)[0] == count // 2
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    restarted = asyncio.run(_started_then_closed(start_and_flush))
    assert restarted.replayed >= count + count // 2  # every journaled op, applied idempotently
    assert count_rows(postgres_url) == (count, count)
    rows = fetch_rows(postgres_url)
    assert set(rows) == set(ids)
    for i, log_id in enumerate(ids):
        row = rows[log_id]
        assert row["prompt"] == f"child prompt {i}"
        expected = (True, f"child-{i}") if i % 2 == 0 else (None, None)
        assert (row["was_successful"], row["workflow_type"]) == expected
    assert _spool_files(home) == []


async def _started_then_closed(start: object) -> object:
    service = await start()  # type: ignore[operator]
    stats = service.stats()
    await service.aclose()
    return stats


async def test_a_damaged_segment_left_by_a_crash_is_replayed_as_far_as_it_can_be(
    db_url: str, tmp_path: Path
) -> None:
    """Good lines are applied, an unreadable line is rejected (and recorded), a last line cut
    short by the crash is skipped; the segment is removed afterwards."""
    from datetime import UTC, datetime

    from capture.db_identity import identity_from_url
    from capture.ids import uuid7
    from capture.spool import INSERT, encode_header, encode_op, make_op

    home = tmp_path / "home"
    spool = home / "spool"
    spool.mkdir(parents=True)
    now = datetime.now(UTC)
    good = [uuid7(), None, "left behind", "weather", 0.5, (), None, None, None]
    good += [None, None, None, None, 2, "v0", now, now]
    torn = encode_op(make_op(INSERT, 3, [uuid7(), *good[1:]]))[:-10]
    bad_line = b'{"v": 1, "op": "insert", "seq": 2, "row": [1,\n'
    (spool / f"{uuid7().hex}-999999-{1:012d}.jsonl").write_bytes(
        encode_header(identity_from_url(db_url))  # written for this database
        + encode_op(make_op(INSERT, 1, good))
        + bad_line
        + torn
    )
    service = fixed_service(db_url, home)
    await service.flush(timeout=30)
    stats = service.stats()
    await service.aclose()
    rows = fetch_rows(db_url)
    assert list(rows) == [good[0]]
    assert rows[good[0]]["prompt"] == "left behind"
    assert (stats.replayed, stats.rejected) == (1, 1)
    assert "unreadable spool line" in (home / "rejected.jsonl").read_text()
    assert _spool_files(home) == []
