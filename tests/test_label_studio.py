"""Label Studio interchange (issue 14) and the one review audit of every correction writer.

The import fixture follows Label Studio's documented export format (labelstud.io/guide/
task_format: a JSON list of tasks, each with ``data``, ``annotations`` — ``result`` regions with
``from_name`` / ``to_name`` / ``type`` / ``value``, ``was_cancelled``, ``ground_truth``,
``created_at`` / ``updated_at``, ``completed_by`` — and ``predictions`` with ``model_version``
and ``score``), not only what our own export writes.
"""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from capture import db
from capture import repository as repo
from capture.review_audit import REVIEW_DECISIONS
from tasks.corrections import import_corrections
from tasks.label_studio import (
    config_path_for,
    labeling_config,
    write_label_studio_tasks,
)
from tasks.review_file import ReviewRow, parse_corrections, read_corrections_file
from tests.cycle_helpers import Log, corrections_in_db, insert_logs

CATALOG = {"scheduling", "calendar_event", "weather", "alarm"}


def choice(intent: str, name: str = "intent") -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": name,
        "to_name": "text",
        "type": "choices",
        "value": {"choices": [intent]},
    }


def notes(text: str) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": "notes",
        "to_name": "text",
        "type": "textarea",
        "value": {"text": [text]},
    }


def annotation(
    result: list[dict[str, Any]],
    *,
    at: str,
    by: int = 10,
    cancelled: bool = False,
    ground_truth: bool = False,
) -> dict[str, Any]:
    return {
        "id": int(uuid.uuid4().int % 100_000),
        "result": result,
        "was_cancelled": cancelled,
        "ground_truth": ground_truth,
        "created_at": at,
        "updated_at": at,
        "lead_time": 4.2,
        "result_count": 0,
        "task": 1,
        "completed_by": by,
    }


def task(n: int, log_id: object, annotations: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": n,
        "created_at": "2026-11-20T09:00:00.000000Z",
        "updated_at": "2026-11-20T10:00:00.000000Z",
        "project": 83,
        "data": {"text": "some prompt", "log_id": str(log_id)},
        "annotations": annotations,
        "predictions": [
            {
                "model_version": "v3",
                "score": 0.41,
                "created_ago": "3 hours",
                "result": [choice("scheduling")],
            }
        ],
    }


@pytest.fixture
def five_logs(db_url: str) -> list[uuid.UUID]:
    return insert_logs(
        db_url,
        [
            Log("wake me at seven", "scheduling", 0.41),
            Log("is it raining tomorrow", "calendar_event", 0.45),
            Log("put lunch with sam on my calendar", "scheduling", 0.5),
            Log("hmm", "weather", 0.3),
            Log("something else", "weather", 0.35),
        ],
    )


def documented_export(logs: list[uuid.UUID]) -> list[dict[str, Any]]:
    a, b, c, d, e = logs
    return [
        # the same annotator twice: the latest (updated_at) wins; its notes travel
        task(
            1,
            a,
            [
                annotation([choice("weather")], at="2026-11-21T10:00:00.000000Z"),
                annotation(
                    [choice("alarm"), notes("wants an alarm")], at="2026-11-21T11:30:00.000000Z"
                ),
            ],
        ),
        # a cancelled (skipped) annotation is ignored; the other one counts
        task(
            2,
            b,
            [
                annotation([], at="2026-11-21T12:00:00Z", by=11, cancelled=True),
                annotation([choice("weather")], at="2026-11-21T10:00:00Z", by=12),
            ],
        ),
        # two annotators disagree, one annotation is ground truth: it settles the task
        task(
            3,
            c,
            [
                annotation([choice("scheduling")], at="2026-11-21T13:00:00Z", by=11),
                annotation(
                    [choice("calendar_event")], at="2026-11-21T09:00:00Z", by=12, ground_truth=True
                ),
            ],
        ),
        # a skipped task: every annotation cancelled
        task(4, d, [annotation([], at="2026-11-21T10:00:00Z", cancelled=True)]),
        # a task nobody annotated
        task(5, e, []),
    ]


def audit_rows(url: str, log_ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
    with db.get_sync_engine(url).connect() as conn:
        rows = conn.execute(
            select(REVIEW_DECISIONS).where(REVIEW_DECISIONS.c.log_id.in_(log_ids))
        ).all()
    return {uuid.UUID(str(r.log_id)): r for r in rows}


# --------------------------------------------------------------------------- export


def test_export_writes_tasks_with_predictions_and_the_matching_config(tmp_path: Path) -> None:
    rows = [
        ReviewRow(str(uuid.uuid4()), "wake me at 7", "alarm", 0.412345, None),
        ReviewRow(str(uuid.uuid4()), "weather & <rain>", "weather", 0.6, "2026-11-20T10:00:00"),
    ]
    path = tmp_path / "review.json"
    config_path = write_label_studio_tasks(
        path, rows, intents={"alarm", "greet"}, model_version="v3"
    )
    assert config_path == config_path_for(path) == tmp_path / "review.label-config.xml"
    tasks = json.loads(path.read_text(encoding="utf-8"))
    assert tasks[0]["data"] == {
        "text": "wake me at 7",
        "log_id": rows[0].id,
        "predicted_intent": "alarm",
        "confidence": 0.4123,
        "created_at": None,
    }
    prediction = tasks[1]["predictions"][0]
    assert prediction["model_version"] == "v3" and prediction["score"] == 0.6
    assert prediction["result"] == [
        {
            "from_name": "intent",
            "to_name": "text",
            "type": "choices",
            "value": {"choices": ["weather"]},
        }
    ]
    view = ET.fromstring(config_path.read_text(encoding="utf-8"))
    text = view.find("Text")
    choices = view.find("Choices")
    assert text is not None and choices is not None
    assert (text.get("name"), text.get("value")) == ("text", "$text")
    assert (choices.get("name"), choices.get("toName"), choices.get("choice")) == (
        "intent",
        "text",
        "single",
    )
    # every predicted intent and the catalogue are choices (the pre-annotation is valid)
    assert [c.get("value") for c in choices] == ["alarm", "greet", "weather"]
    assert (path.stat().st_mode & 0o777) == 0o600  # raw prompts: private


def test_labeling_config_escapes_choice_values() -> None:
    view = ET.fromstring(labeling_config(['say "hi"', "a&b"]))
    assert sorted(c.get("value") or "" for c in view.iter("Choice")) == ["a&b", 'say "hi"']


# --------------------------------------------------------------------------- import


def test_a_documented_label_studio_export_is_recognised_and_applied(
    db_url: str, five_logs: list[uuid.UUID], tmp_path: Path
) -> None:
    a, b, c, d, e = five_logs
    path = tmp_path / "project-1-at-2026-11-21.json"
    path.write_text(json.dumps(documented_export(five_logs)), encoding="utf-8")

    parsed = read_corrections_file(path)
    assert parsed.source == "label_studio" and parsed.problems == []
    assert parsed.not_reviewed == 2  # the skipped tasks

    result = import_corrections(path, url=db_url, catalog=CATALOG, reviewer="alice")
    assert result.ok, result.reasons()
    assert (result.applied, result.unchanged, result.not_reviewed) == (3, 0, 2)
    stored = corrections_in_db(db_url)
    assert stored[a] == ("alarm", "wants an alarm")
    assert stored[b] == ("weather", None)
    assert stored[c] == ("calendar_event", None)
    assert stored.get(d, (None, None)) == (None, None)
    assert stored.get(e, (None, None)) == (None, None)

    audit = audit_rows(db_url, five_logs)
    assert set(audit) == {a, b, c}
    assert {(r.source, r.reviewer, r.applied) for r in audit.values()} == {
        ("label_studio", "alice", True)
    }
    assert (audit[a].before_intent, audit[a].after_intent, audit[a].action) == (
        "scheduling",
        "alarm",
        "correct",
    )
    assert (audit[c].action, audit[c].before_intent, audit[c].after_intent) == (
        "correct",
        "scheduling",
        "calendar_event",
    )

    again = import_corrections(path, url=db_url, catalog=CATALOG, reviewer="alice")
    assert (again.applied, again.unchanged) == (0, 3)
    assert len(audit_rows(db_url, five_logs)) == 3  # nothing changed, nothing audited


def test_annotators_who_disagree_reject_the_file_naming_the_row(
    db_url: str, five_logs: list[uuid.UUID], tmp_path: Path
) -> None:
    a, b, *_ = five_logs
    tasks = [
        task(1, a, [annotation([choice("alarm")], at="2026-11-21T10:00:00Z")]),
        task(
            2,
            b,
            [
                annotation([choice("weather")], at="2026-11-21T10:00:00Z", by=11),
                annotation([choice("alarm")], at="2026-11-21T11:00:00Z", by=12),
            ],
        ),
    ]
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(tasks), encoding="utf-8")
    result = import_corrections(path, url=db_url, catalog=CATALOG, reviewer="alice")
    assert not result.ok and result.applied == 0
    assert [(p.row, p.field) for p in result.rejected] == [(2, "annotations")]
    assert "different intents (alarm, weather)" in result.rejected[0].message
    assert corrections_in_db(db_url).get(a, (None, None)) == (None, None)  # all or nothing
    assert audit_rows(db_url, five_logs) == {}


def test_label_studio_rows_meet_the_corrections_rules(
    db_url: str, five_logs: list[uuid.UUID], tmp_path: Path
) -> None:
    a, *_ = five_logs
    tasks = [
        task(1, a, [annotation([choice("no_such_intent")], at="2026-11-21T10:00:00Z")]),
        task(2, "not-a-uuid", [annotation([choice("alarm")], at="2026-11-21T10:00:00Z")]),
        task(3, a, [annotation([choice("alarm"), choice("weather")], at="2026-11-21T10:00:00Z")]),
    ]
    path = tmp_path / "ls.json"
    path.write_text(json.dumps(tasks), encoding="utf-8")
    result = import_corrections(path, url=db_url, catalog=CATALOG, reviewer="alice")
    assert [(p.row, p.field) for p in result.rejected] == [
        (1, "corrected_intent"),
        (2, "id"),
        (3, "annotations"),
    ]
    assert result.applied == 0


def test_parse_corrections_recognises_label_studio_text_too() -> None:
    log_id = uuid.uuid4()
    text = json.dumps([task(1, log_id, [annotation([choice("alarm")], at="2026-11-21T10:00Z")])])
    corrections, not_reviewed, problems = parse_corrections(text)
    assert problems == [] and not_reviewed == 0
    assert [(c.log_id, c.corrected_intent) for c in corrections] == [(log_id, "alarm")]


# --------------------------------------------------------------------------- one audit


def test_file_import_and_add_prompt_correction_write_the_workbench_audit(
    db_url: str, five_logs: list[uuid.UUID], tmp_path: Path
) -> None:
    a, b, *_ = five_logs
    path = tmp_path / "reviewed.json"
    path.write_text(
        json.dumps([{"id": str(a), "corrected_intent": "alarm", "notes": "n"}]), encoding="utf-8"
    )
    assert import_corrections(path, url=db_url, catalog=CATALOG, reviewer="bob").ok

    import asyncio

    async def api() -> None:
        repository = repo.create_nlu_repository(db_url)
        await repository.add_prompt_correction(b, "weather", "via api", reviewer="svc")

    asyncio.run(api())
    audit = audit_rows(db_url, [a, b])
    file_row, api_row = audit[a], audit[b]
    assert (file_row.source, file_row.reviewer, file_row.notes) == ("file", "bob", "n")
    assert (file_row.before_intent, file_row.after_intent) == ("scheduling", "alarm")
    assert (api_row.source, api_row.reviewer, api_row.action) == ("api", "svc", "correct")
    assert (api_row.before_intent, api_row.after_intent, api_row.notes) == (
        "calendar_event",
        "weather",
        "via api",
    )
    assert api_row.applied and api_row.prior_corrected_intent is None


def test_the_application_role_writes_the_api_audit_under_row_level_security(
    postgres_url: str,
) -> None:
    """On PostgreSQL the NLU service (application role, RLS-scoped to its user) corrects its
    user's prompt and appends the audit row (migration 0009 grants INSERT, nothing more)."""
    import asyncio

    import psycopg
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    with db.get_sync_engine(postgres_url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
    alice = uuid.uuid4()
    (log_id,) = insert_logs(postgres_url, [Log("wake me at six", "weather", 0.4, user_id=alice)])
    role = f"pc_audit_{uuid.uuid4().hex[:8]}_app"
    server = db.libpq_url(postgres_url)
    with psycopg.connect(server, autocommit=True) as pg:
        pg.execute(f"CREATE ROLE {role} LOGIN IN ROLE prompt_capture_app")
    try:
        app_url = make_url(postgres_url).set(username=role, password=None)

        async def correct() -> None:
            engine = create_async_engine(
                app_url.render_as_string(hide_password=False), poolclass=NullPool
            )
            try:
                app = repo.NLURepository(engine)
                await app.add_prompt_correction(log_id, "alarm", user_id=alice)
            finally:
                await engine.dispose()

        asyncio.run(correct())
    finally:
        with psycopg.connect(server, autocommit=True) as pg:
            pg.execute(f"DROP ROLE IF EXISTS {role}")
    row = audit_rows(postgres_url, [log_id])[log_id]
    assert (row.source, row.reviewer, row.before_intent, row.after_intent) == (
        "api",
        str(alice),
        "weather",
        "alarm",
    )


def test_a_broken_task_is_reported_by_row_not_as_a_corrections_file(tmp_path: Path) -> None:
    log_id = uuid.uuid4()
    path = tmp_path / "ls.json"
    good = task(1, log_id, [annotation([choice("alarm")], at="2026-11-21T10:00:00Z")])
    path.write_text(json.dumps([good, {"data": {"text": "x"}}, "junk"]), encoding="utf-8")
    parsed = read_corrections_file(path)
    assert parsed.source == "label_studio"
    assert [(p.row, p.field) for p in parsed.problems] == [(2, "annotations"), (3, "data")]
