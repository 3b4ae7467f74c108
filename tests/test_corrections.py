"""Corrections import: validation of every row, all or nothing, idempotent re-import, inbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.corrections import (
    file_away_task,
    import_corrections,
    import_corrections_task,
    inbox_files,
    parse_corrections,
)
from tests.cycle_helpers import CATALOG, Importer, Log, corrections_in_db, insert_logs
from tests.cycle_helpers import correction_row as row
from tests.cycle_helpers import write_list as review_file


def test_a_good_file_is_applied_and_reimport_changes_nothing(
    db_url: str, three_logs: list[Any], tmp_path: Path
) -> None:
    a, b, c = three_logs
    path = review_file(
        tmp_path / "reviewed.json",
        [
            row(a, "scheduling"),
            row(b, "calendar_event", "wanted an event"),
            row(c, "weather"),
        ],
    )
    result = import_corrections_task.fn(path, url=db_url, catalog=CATALOG)
    assert result.ok, result.reasons()
    assert (result.applied, result.unchanged, result.not_reviewed) == (3, 0, 0)
    stored = corrections_in_db(db_url)
    assert stored[a] == ("scheduling", None)
    assert stored[b] == ("calendar_event", "wanted an event")
    assert stored[c] == ("weather", None)

    again = import_corrections(path, url=db_url, catalog=CATALOG)
    assert (again.applied, again.unchanged, again.rejected) == (0, 3, [])
    assert corrections_in_db(db_url) == stored


def test_one_bad_row_changes_nothing(
    db_url: str, three_logs: list[Any], import_rows: Importer
) -> None:
    a, b, _ = three_logs
    before = corrections_in_db(db_url)
    result = import_rows(
        [
            row(a, "scheduling"),
            row(b, "calendar_event"),
            row("0190a4c2-0000-7000-8000-000000000000", "weather"),  # no such log
        ]
    )
    assert not result.ok
    assert result.applied == 0
    assert [(p.row, p.field) for p in result.rejected] == [(3, "id")]
    assert "no logged prompt has this id" in str(result.rejected[0])
    assert corrections_in_db(db_url) == before


def test_every_kind_of_bad_row_is_named(
    db_url: str, three_logs: list[Any], import_rows: Importer
) -> None:
    a, b, c = three_logs
    result = import_rows(
        [
            row(a, "schedulng"),  # typo: not in the catalog
            row("not-a-uuid", "weather"),
            row(b, ""),  # not reviewed: skipped, not an error
            {"id": str(c), "corrected_intent": 3},
            "just a string",
            {"id": str(c)},
        ]
    )
    assert result.applied == 0 and result.not_reviewed == 1
    found = [(p.row, p.field) for p in result.rejected]
    assert found == [
        (1, "corrected_intent"),
        (2, "id"),
        (4, "corrected_intent"),
        (5, "-"),
        (6, "corrected_intent"),
    ]
    assert "'schedulng' is not a known intent" in str(result.rejected[0])
    assert "--allow-new-intent" in str(result.rejected[0])
    assert all(v == (None, None) for v in corrections_in_db(db_url).values())


def test_new_intents_need_the_flag(
    db_url: str, three_logs: list[Any], import_rows: Importer
) -> None:
    a = three_logs[0]
    assert not import_rows([row(a, "homework_help")]).ok
    result = import_rows([row(a, "homework_help")], allow_new_intent=True)
    assert result.ok and result.applied == 1
    assert corrections_in_db(db_url)[a] == ("homework_help", None)


def test_the_catalog_defaults_to_the_intents_the_database_knows(
    db_url: str, three_logs: list[Any], tmp_path: Path
) -> None:
    a, b, _ = three_logs
    path = review_file(tmp_path / "x.json", [row(a, "calendar_event"), row(b, "weather")])
    result = import_corrections(path, url=db_url, models_dir=tmp_path / "no-models")
    assert [p.field for p in result.rejected] == ["corrected_intent"]  # weather is unknown
    assert "weather" in str(result.rejected[0])


def test_the_same_prompt_corrected_two_ways_is_rejected(db_url: str, import_rows: Importer) -> None:
    a, b = insert_logs(
        db_url,
        [
            Log("Book time for my essay", "scheduling", 0.5),
            Log("book time  for my essay", "x", 0.5),
        ],
    )
    result = import_rows([row(a, "scheduling"), row(b, "calendar_event")])
    assert [p.row for p in result.rejected] == [1, 2]
    assert "corrected to different intents" in str(result.rejected[0])
    assert all(v == (None, None) for v in corrections_in_db(db_url).values())


def test_malformed_json_is_rejected_whole(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "x", "corrected_intent": "a"},', encoding="utf-8")
    result = import_corrections(path, url=db_url, catalog=CATALOG)
    assert [(p.row, p.field) for p in result.rejected] == [(0, "-")]
    assert "malformed JSON at line 1" in str(result.rejected[0])


def test_parse_accepts_json_lines_too() -> None:
    text = (
        '{"id": "0190a4c2-0000-7000-8000-000000000001", "corrected_intent": "a"}\n'
        '{"id": "0190a4c2-0000-7000-8000-000000000002", "corrected_intent": ""}\n'
        "{broken\n"
    )
    corrections, not_reviewed, problems = parse_corrections(text)
    assert [c.corrected_intent for c in corrections] == ["a"]
    assert not_reviewed == 1
    assert [(p.row, p.field) for p in problems] == [(3, "-")]


def test_inbox_files_are_filed_away_with_a_reason(tmp_path: Path) -> None:
    from tasks.corrections import ImportResult, RowProblem

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("b.json", "a.jsonl", "notes.txt"):
        (inbox / name).write_text("[]", encoding="utf-8")
    assert [p.name for p in inbox_files(inbox)] == ["a.jsonl", "b.json"]
    ok = ImportResult(file="a.jsonl", applied=1)
    bad = ImportResult(file="b.json", rejected=[RowProblem(2, "id", "no logged prompt")])
    assert file_away_task.fn(inbox / "a.jsonl", ok, inbox) == inbox / "processed" / "a.jsonl"
    moved = file_away_task.fn(inbox / "b.json", bad, inbox)
    assert moved == inbox / "rejected" / "b.json"
    reason = (inbox / "rejected" / "b.json.reason.txt").read_text()
    assert "REJECTED" in reason and "row 2" in reason and "no logged prompt" in reason
    assert [p.name for p in inbox_files(inbox)] == []
