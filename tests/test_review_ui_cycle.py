"""The weekly cycle picks up workbench corrections exactly as it picks up imported files
(issue 14): the review-export flow opens a round from its selection, reviewers decide in the
workbench logic, the training-data flow exports the decided rows as ``corrected``, beside a
row corrected by a file import. SQLite and PostgreSQL, under a Prefect test server."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from capture import db
from tasks.corrections import import_corrections
from tasks.review_decide import decide
from tasks.review_queue import Catalog, claim_next
from tasks.review_tables import items, rounds
from tests.cycle_helpers import Log, insert_logs
from tests.test_review_ui_support import clean_workbench_tables, make_users

pytestmark = pytest.mark.usefixtures("prefect_harness")

CATALOG = Catalog(frozenset(("banking", "calendar", "music", "weather")), "oos", "1")


def test_the_weekly_cycle_trains_on_workbench_corrections_as_on_imported_files(
    db_url: str, home: Path, tmp_path: Path
) -> None:
    from flows.review import review_export_flow
    from flows.training_data import training_data_flow

    clean_workbench_tables(db_url)
    ids = insert_logs(
        db_url,
        [
            Log("how much is in my account", "music", 0.41),
            Log("play a song by queen", "weather", 0.45),
            Log("will it snow tonight", "weather", 0.5),
            Log("move my meeting to friday", "banking", 0.52),
            Log("play some jazz", "music", 0.97, was_successful=True),
        ],
    )
    wanted = {ids[0]: "banking", ids[1]: "music", ids[2]: "weather"}  # the workbench's answers

    # A file import corrects one prompt (it then is no review candidate any more).
    reviewed = tmp_path / "reviewed.json"
    reviewed.write_text(
        json.dumps([{"id": str(ids[3]), "corrected_intent": "calendar"}]), encoding="utf-8"
    )
    assert import_corrections(reviewed, url=db_url, catalog=set(CATALOG.intents)).ok

    # The weekly review-export flow opens a workbench round from its selection.
    review = review_export_flow(days=7, limit=10, database_url=db_url, use_embeddings=False)
    assert review.n_selected == 3
    engine = db.get_sync_engine(db_url)
    with engine.connect() as conn:
        (round_id,) = conn.execute(select(rounds.c.id).where(rounds.c.status == "open")).scalars()
        queued = set(conn.execute(select(items.c.log_id).where(items.c.round_id == round_id)))
    assert {row[0] for row in queued} == set(wanted)

    # Two reviewers work the queue until nothing is left (double-review items get both).
    reviewers = make_users(db_url, ["rita", "sam"])
    now = datetime.now(UTC)
    while True:
        decided = False
        for user in reviewers:
            with engine.begin() as conn:
                item_id = claim_next(conn, round_id, user, now=now)
                if item_id is None:
                    continue
                log_id = conn.execute(
                    select(items.c.log_id).where(items.c.id == item_id)
                ).scalar_one()
                decide(
                    conn,
                    item_id,
                    user,
                    action="correct",
                    intent=wanted[log_id],
                    catalog=CATALOG,
                    now=now,
                )
                decided = True
        if not decided:
            break
    with engine.connect() as conn:
        states = set(conn.execute(select(items.c.state).where(items.c.round_id == round_id)))
    assert states == {("done",)}

    # The training-data flow reads workbench and file corrections alike.
    data = training_data_flow(days=7, holdout_fraction=0.0, database_url=db_url)
    rows = [json.loads(line) for line in data.path.read_text(encoding="utf-8").splitlines()]
    corrected = {r["text"]: r["label"] for r in rows if r["corrected"]}
    assert corrected == {
        "how much is in my account": "banking",
        "play a song by queen": "music",
        "will it snow tonight": "weather",
        "move my meeting to friday": "calendar",
    }
    assert data.counts["corrected"] == 4


def test_cli_label_studio_round_trip(
    db_url: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`export --mode review --format label-studio` writes tasks and the labeling config; the
    tasks, annotated as Label Studio exports them, come back through `import-corrections` with
    the reviewer and source in the audit."""
    from typer.testing import CliRunner

    from capture.review_audit import REVIEW_DECISIONS
    from capture.settings import get_settings
    from deployments.cli import app

    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", db_url)
    get_settings.cache_clear()
    clean_workbench_tables(db_url)
    ids = insert_logs(
        db_url,
        [
            Log("what's my balance", "music", 0.3),
            Log("play jazz please", "music", 0.45),
            Log("pay my card bill", "banking", 0.98, was_successful=True),  # not for review
        ],
    )[:2]
    runner = CliRunner()
    path = home / "ls-tasks.json"
    exported = runner.invoke(
        app,
        ["export", "--mode", "review", "--format", "label-studio", "--output", str(path)],
    )
    assert exported.exit_code == 0, exported.output
    assert (home / "ls-tasks.label-config.xml").is_file()
    tasks = json.loads(path.read_text(encoding="utf-8"))
    assert {t["data"]["log_id"] for t in tasks} == {str(i) for i in ids}
    with db.get_sync_engine(db_url).connect() as conn:  # the export opened a workbench round
        assert conn.execute(select(rounds.c.id).where(rounds.c.status == "open")).first()
    for n, t in enumerate(tasks, start=1):  # what Label Studio adds when annotators submit
        intent = "banking" if t["data"]["log_id"] == str(ids[0]) else "music"
        t["id"] = n
        t["annotations"] = [
            {
                "id": n,
                "completed_by": 1,
                "was_cancelled": False,
                "ground_truth": False,
                "created_at": "2026-11-21T10:00:00.000000Z",
                "updated_at": "2026-11-21T10:00:00.000000Z",
                "result": [
                    {**t["predictions"][0]["result"][0], "value": {"choices": [intent]}},
                ],
            }
        ]
    path.write_text(json.dumps(tasks), encoding="utf-8")
    wrong = runner.invoke(app, ["export", "--mode", "retraining", "--format", "label-studio"])
    assert wrong.exit_code == 2 and "--format" in wrong.output
    applied = runner.invoke(app, ["import-corrections", str(path), "--reviewer", "lena"])
    assert applied.exit_code == 0, applied.output
    assert "applied 2, unchanged 0" in applied.output
    with db.get_sync_engine(db_url).connect() as conn:
        audit = conn.execute(
            select(REVIEW_DECISIONS.c.source, REVIEW_DECISIONS.c.reviewer).where(
                REVIEW_DECISIONS.c.log_id.in_(ids)
            )
        ).all()
    assert sorted(tuple(a) for a in audit) == [("label_studio", "lena")] * 2
    get_settings.cache_clear()
