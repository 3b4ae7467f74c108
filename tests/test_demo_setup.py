"""The demo's database and clock: it uses the configured database (PROMPT_CAPTURE_DATABASE_URL,
else the SQLite file of its home) and refuses one that holds data; its week of traffic is
stamped in the past, never in the future."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from capture import db
from capture.settings import Settings, get_settings
from tasks.demo import DemoDatabaseError, DemoSetup, check_demo_database
from tests import run_cli
from tests.cycle_helpers import Log, insert_logs


def fresh_sqlite(tmp_path: Path, name: str, *, migrate: bool = True) -> str:
    url = f"sqlite:///{tmp_path / name}"
    if migrate:
        db.upgrade(url)
    return url


def test_an_empty_or_missing_database_is_fine_one_with_data_is_refused(tmp_path: Path) -> None:
    check_demo_database(f"sqlite:///{tmp_path / 'not-there.db'}")
    assert not (tmp_path / "not-there.db").exists()  # checking creates nothing
    empty = fresh_sqlite(tmp_path, "empty.db")
    check_demo_database(empty)
    used = fresh_sqlite(tmp_path, "used.db")
    insert_logs(used, [Log("what's my balance", "banking", 0.9)])
    with pytest.raises(
        DemoDatabaseError, match=r"already holds data \(1 rows in nlu_prompt_logs\)"
    ):
        check_demo_database(used)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(DemoDatabaseError, match=r"invoices.*no Prompt Capture schema"):
        check_demo_database(f"sqlite:///{foreign}")


def test_the_demo_command_refuses_a_configured_database_with_data(tmp_path: Path) -> None:
    used = fresh_sqlite(tmp_path, "production.db")
    insert_logs(used, [Log("play jazz", "music", 0.8), Log("pay my bill", "banking", 0.9)])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPT_CAPTURE_", "PREFECT_"))}
    env |= {
        "PROMPT_CAPTURE_HOME": str(tmp_path / "home"),
        "PROMPT_CAPTURE_DATABASE_URL": used,
        "HF_HUB_OFFLINE": "1",
    }
    done = run_cli("demo", env=env, cwd=tmp_path, timeout=None)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("error: demo: the database sqlite:///")
    assert "already holds data (2 rows in nlu_prompt_logs)" in lines[0]
    assert "PROMPT_CAPTURE_DATABASE_URL" in lines[0]
    assert not (tmp_path / "home" / "models").exists()  # nothing was started
    with db.get_sync_engine(used).connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM nlu_prompt_logs")).scalar_one() == 2


def run_setup(home: Path, settings: Settings) -> DemoSetup:
    from prefect import flow

    from tasks.demo import prepare_demo

    @flow(name="demo-setup-test")
    def setup() -> DemoSetup:
        return prepare_demo(home, seed=0, settings=settings)

    return setup()


@pytest.mark.usefixtures("prefect_harness")
def test_the_demo_uses_the_configured_database_or_its_homes_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured = fresh_sqlite(tmp_path, "configured.db", migrate=False)
    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", configured)
    get_settings.cache_clear()
    try:
        setup = run_setup(tmp_path / "home", get_settings())
    finally:
        get_settings.cache_clear()
    assert setup.database_url == configured
    assert db.current_revision(configured) == db.head_revision()  # migrated by the demo
    assert not (setup.layout.home / "prompt_capture.db").exists()

    monkeypatch.delenv("PROMPT_CAPTURE_DATABASE_URL")
    default = run_setup(tmp_path / "other-home", Settings(home=tmp_path / "other-home"))
    assert default.database_url == default.layout.sqlite_url
    assert (tmp_path / "other-home" / "prompt_capture.db").is_file()


@pytest.mark.usefixtures("prefect_harness")
def test_the_demo_week_of_traffic_is_stamped_in_the_past(tmp_path: Path) -> None:
    from prefect import flow

    from capture.demo_data import KeywordClassifier, load_demo_dataset, split_demo_dataset
    from capture.traffic import LabelledPrompt, TrafficResult
    from tasks.demo import send_week_of_traffic

    url = fresh_sqlite(tmp_path, "demo.db")
    splits = split_demo_dataset(load_demo_dataset(), seed=0)
    prompts = tuple(LabelledPrompt.of(splits.traffic))
    classifier = KeywordClassifier.fit(splits.train)
    settings = Settings(home=tmp_path / "home").for_run(tmp_path / "home", url)

    @flow(name="demo-traffic-test")
    def traffic() -> TrafficResult:
        return send_week_of_traffic(classifier, prompts, settings=settings, seed=0)

    sent = traffic()
    now = datetime.now(UTC)
    assert sent.sent == len(prompts) and sent.outcomes > 0
    with db.get_sync_engine(url).connect() as conn:
        rows: list[Any] = conn.execute(
            text("SELECT created_at, updated_at FROM nlu_prompt_logs")
        ).all()
    assert len(rows) == len(prompts)

    def utc(value: Any) -> datetime:
        value = datetime.fromisoformat(value) if isinstance(value, str) else value
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    created = [utc(r[0]) for r in rows]
    updated = [utc(r[1]) for r in rows if r[1] is not None]
    assert max(created) <= now and max(updated) <= now
    assert min(created) >= now - timedelta(days=7)  # inside the review export's 7-day window
    assert all(u >= c for c, u in zip(created, [utc(r[1]) for r in rows], strict=True) if u)


async def test_simulated_traffic_refuses_times_in_the_future(sqlite_url: str) -> None:
    import random

    from capture.demo_data import KeywordClassifier
    from capture.service import create_nlu_service
    from capture.traffic import (
        LabelledPrompt,
        OutcomeRule,
        SteppedClock,
        make_users,
        send_traffic,
        single_message_sessions,
    )

    later = datetime.now(UTC) + timedelta(hours=1)
    prompts = [LabelledPrompt("play jazz", "music")]
    classifier = KeywordClassifier.fit([{"text": "play jazz", "label": "music"}])
    clock = SteppedClock(later)
    service = create_nlu_service(classifier, url=sqlite_url, settings=get_settings(), clock=clock)
    rng = random.Random(0)
    async with service:
        with pytest.raises(ValueError, match="after now"):
            await send_traffic(
                service,
                prompts,
                sessions=single_message_sessions(make_users(1, rng), rng),
                outcome=OutcomeRule(),
                clock=clock,
                times=[later],
            )
