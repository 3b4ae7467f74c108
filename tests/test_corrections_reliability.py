"""Corrections import on what reviewers' tools really save (issue 13, cases 1-5): text hygiene
of notes and intents on both databases, new intents that only look new, conflicting rows, files
the reader cannot use, and an inbox where one bad file never blocks the others."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from capture.db import get_sync_engine
from capture.text import clean_notes
from tasks.corrections import ImportResult, RowProblem, import_corrections, import_summary_markdown
from tests.cycle_helpers import CATALOG, Importer, Log, corrections_in_db, insert_logs, write_list
from tests.cycle_helpers import correction_row as row

# --------------------------------------------------------------------------- case 1: files


def test_case_1_a_bom_file_applies_like_the_same_file_without_it(
    db_url: str, three_logs: list[Any], tmp_path: Path
) -> None:
    a, b, _ = three_logs
    rows = [row(a, "music_play"), row(b, "weather", "it was about rain")]
    with_bom = import_corrections(
        write_list(tmp_path / "bom.json", rows, bom=True, crlf=True), url=db_url, catalog=CATALOG
    )
    assert with_bom.ok, with_bom.reasons()
    assert (with_bom.applied, len(with_bom.rejected)) == (2, 0)
    without = import_corrections(
        write_list(tmp_path / "plain.json", rows), url=db_url, catalog=CATALOG
    )
    assert (without.applied, without.unchanged, without.rejected) == (0, 2, [])


@pytest.mark.parametrize(
    ("data", "found"),
    [
        ("utf16", "UTF-16 LE text"),
        (b"id,corrected_intent,notes\nabc,weather,\n", "CSV (comma-separated values)"),
        (b"<html><head><title>Sign in</title></head><body></body></html>", "an HTML page"),
        (b"", "an empty file (0 bytes)"),
        (b"\xef\xbb\xbf", "only a byte-order mark"),
    ],
)
def test_an_unreadable_file_is_one_file_level_message(
    db_url: str, three_logs: list[Any], tmp_path: Path, data: bytes | str, found: str
) -> None:
    path = tmp_path / "reviewed.json"
    if data == "utf16":
        path.write_bytes(json.dumps([row(three_logs[0], "weather")]).encode("utf-16"))
    else:
        assert isinstance(data, bytes)
        path.write_bytes(data)
    result = import_corrections(path, url=db_url, catalog=CATALOG)
    assert [(p.row, p.field) for p in result.rejected] == [(0, "-")]
    assert found in result.rejected[0].message
    assert result.applied == 0
    assert all(v == (None, None) for v in corrections_in_db(db_url).values())


# --------------------------------------------------------------------------- cases 2-3: text


NOTES = [
    # case, as the reviewer's tool wrote it, as stored (the same on SQLite and PostgreSQL)
    ("NUL (case 2)", "before\u0000after", "beforeafter"),
    ("lone surrogate (case 3)", "half an emoji \ud83d here", "half an emoji \ufffd here"),
    ("surrogate pair", "\ud83d\ude00 ok", "\U0001f600 ok"),
    ("BOM and ZWSP at the ends", "\ufeff\u200bchecked\u200b ", "checked"),
    ("ESC sequence", "red\u001b[31m text", "red[31m text"),
    ("RTL marks kept", "\u202bשלום\u202c", "\u202bשלום\u202c"),
    ("NFD becomes NFC", "cafe\u0301", "caf\u00e9"),
    ("only invisible", "\u200b \u0000", None),
]


@pytest.mark.parametrize(("notes", "stored"), [c[1:] for c in NOTES], ids=[c[0] for c in NOTES])
def test_cases_2_3_notes_are_stored_clean_on_both_databases(
    db_url: str, three_logs: list[Any], import_rows: Importer, notes: str, stored: str | None
) -> None:
    a = three_logs[0]
    rows = [row(a, "music_play", notes)]
    result = import_rows(rows)
    assert result.ok and result.applied == 1, result.reasons()
    assert corrections_in_db(db_url)[a] == ("music_play", stored)
    assert clean_notes(notes) == stored
    # Importing the same file again changes nothing: the stored value is the cleaned one.
    again = import_rows(rows)
    assert (again.applied, again.unchanged) == (0, 1)


def test_a_lone_surrogate_in_an_intent_or_id_is_a_row_problem_with_a_printable_reason(
    three_logs: list[Any], import_rows: Importer
) -> None:
    a, b, _ = three_logs
    result = import_rows(
        [row(a, "weather\ud83d"), {**row(b, "weather"), "id": "\ud83d-not-an-id"}],
        allow_new_intent=True,
    )
    assert [(p.row, p.field) for p in result.rejected] == [(1, "corrected_intent"), (2, "id")]
    reasons = result.summary() + "\n" + result.reasons()
    reasons.encode("utf-8")  # printable and writable: the surrogate is shown as an escape
    assert "\\ud83d" in reasons


# --------------------------------------------------------------------------- case 4: intents


def refused_new_intent(import_rows: Importer, log_id: Any, intent: str) -> str:
    """Import one row correcting ``log_id`` to ``intent`` with new intents allowed: the row's
    ``corrected_intent`` must be refused; returns the message."""
    result = import_rows([row(log_id, intent)], allow_new_intent=True)
    assert [(p.row, p.field) for p in result.rejected] == [(1, "corrected_intent")]
    return result.rejected[0].message


@pytest.mark.parametrize(
    ("intent", "existing"),
    [
        ("Music_Play", "music_play"),
        ("music play", "music_play"),
        ("MUSIC-PLAY", "music_play"),
        ("weather\u200b", "weather"),
        ("wea\u200dther", "weather"),
        ("\u0057eather", "weather"),
        ("ｗｅａｔｈｅｒ", "weather"),  # fullwidth letters
        ("OOS", "oos"),
    ],
)
def test_case_4_allow_new_intent_refuses_a_name_that_only_looks_new(
    db_url: str, three_logs: list[Any], import_rows: Importer, intent: str, existing: str
) -> None:
    message = refused_new_intent(import_rows, three_logs[0], intent)
    assert f"differs from the existing intent {existing!r} only by case" in message
    assert corrections_in_db(db_url)[three_logs[0]] == (None, None)


@pytest.mark.parametrize(
    ("intent", "needle"),
    [
        ("<img src=x onerror=alert(1)>", "outside a-z, 0-9 and _"),
        ("music.stop", "outside a-z, 0-9 and _"),
        ("météo", "outside a-z, 0-9 and _"),
        ("x" * 65, "more than 64"),
        ("out_of_scope", "which means out of scope; write 'oos'"),
        ("_music", "an underscore at the start or end"),
    ],
)
def test_case_4_a_new_intent_must_have_the_documented_form(
    three_logs: list[Any], import_rows: Importer, intent: str, needle: str
) -> None:
    assert needle in refused_new_intent(import_rows, three_logs[0], intent)


def test_case_4_a_genuinely_new_intent_and_known_ones_with_spaces_are_accepted(
    db_url: str, three_logs: list[Any], import_rows: Importer
) -> None:
    a, b, _ = three_logs
    rows = [row(a, " homework_help\t"), row(b, "weather \n")]
    without_flag = import_rows(rows)
    assert [p.row for p in without_flag.rejected] == [1]
    assert "--allow-new-intent" in without_flag.rejected[0].message
    result = import_rows(rows, allow_new_intent=True)
    assert result.ok and result.applied == 2
    stored = corrections_in_db(db_url)
    assert stored[a] == ("homework_help", None) and stored[b] == ("weather", None)


# --------------------------------------------------------------------------- case 5: conflicts


def test_case_5_same_id_with_different_notes_is_reported_on_both_rows(
    db_url: str, three_logs: list[Any], import_rows: Importer
) -> None:
    a, b, _ = three_logs
    result = import_rows(
        [row(a, "music_play", "first reviewer"), row(b, "weather"), row(a, "music_play", "second")]
    )
    assert [(p.row, p.field) for p in result.rejected] == [(1, "notes"), (3, "notes")]
    assert "this id is in rows 1, 3 with different notes" in result.rejected[0].message
    assert result.applied == 0
    assert all(v == (None, None) for v in corrections_in_db(db_url).values())


def test_case_5_same_id_with_different_intents_is_reported_on_both_rows(
    three_logs: list[Any], import_rows: Importer
) -> None:
    a = three_logs[0]
    result = import_rows([row(a, "music_play"), row(a, "weather")])
    assert [(p.row, p.field) for p in result.rejected] == [
        (1, "corrected_intent"),
        (2, "corrected_intent"),
    ]
    message = result.rejected[0].message
    assert "the same prompt (this id) is corrected to different intents" in message
    assert "('music_play', 'weather') in rows 1, 2" in message


def test_case_5_the_same_answer_twice_is_applied_once(
    db_url: str, three_logs: list[Any], import_rows: Importer
) -> None:
    a = three_logs[0]
    # The same answer, once with surrounding whitespace: equal once cleaned.
    result = import_rows([row(a, "music_play", "same"), row(a, " music_play", "same ")])
    assert (result.applied, result.unchanged, result.rejected) == (1, 1, [])
    assert corrections_in_db(db_url)[a] == ("music_play", "same")


# --------------------------------------------------------------------------- the inbox


def test_inbox_a_bad_file_is_rejected_with_its_reason_and_the_others_are_applied(
    prefect_harness: None, db_url: str, three_logs: list[Any], tmp_path: Path
) -> None:
    from flows.corrections import corrections_flow

    a, b, c = three_logs
    home = tmp_path / "home"
    inbox = home / "inbox"
    inbox.mkdir(parents=True)
    write_list(inbox / "1-good.json", [row(a, "music_play", "nul\u0000inside")])
    (inbox / "2-utf16.json").write_bytes(json.dumps([row(b, "weather")]).encode("utf-16"))
    write_list(inbox / "3-surrogate.json", [row(b, "weather", "\ud83d")], bom=True)
    write_list(inbox / "4-lookalike.json", [row(c, "Music_Play")])
    (inbox / "5-good.jsonl").write_text(json.dumps(row(c, "scheduling")) + "\n")

    # The catalog is what the database knows (no model deployed); weather is new to it.
    results = corrections_flow(home=str(home), database_url=db_url, allow_new_intent=True)

    status = {Path(r.file).name: r.ok for r in results}
    assert status == {
        "1-good.json": True,
        "2-utf16.json": False,
        "3-surrogate.json": True,
        "4-lookalike.json": False,
        "5-good.jsonl": True,
    }
    assert corrections_in_db(db_url) == {
        a: ("music_play", "nulinside"),
        b: ("weather", "\ufffd"),
        c: ("scheduling", None),
    }
    assert sorted(p.name for p in (inbox / "processed").iterdir()) == [
        "1-good.json",
        "3-surrogate.json",
        "5-good.jsonl",
    ]
    rejected = inbox / "rejected"
    assert sorted(p.name for p in rejected.iterdir()) == [
        "2-utf16.json",
        "2-utf16.json.reason.txt",
        "4-lookalike.json",
        "4-lookalike.json.reason.txt",
    ]
    assert "UTF-16" in (rejected / "2-utf16.json.reason.txt").read_text(encoding="utf-8")
    assert "'music_play'" in (rejected / "4-lookalike.json.reason.txt").read_text(encoding="utf-8")
    assert not any(p.is_file() for p in inbox.iterdir())

    summary = import_summary_markdown(results)
    assert "5 file(s), 3 correction(s) applied, 2 file(s) rejected" in summary
    assert "REJECTED `2-utf16.json`" in summary and "REJECTED `4-lookalike.json`" in summary


def test_the_weekly_summary_names_each_rejected_file() -> None:
    from tasks.training_data import TrainingDataExport
    from tasks.training_pairs import PairsResult
    from tasks.weekly import summary_markdown

    results = [
        ImportResult(file="/home/inbox/a.json", applied=2),
        ImportResult(file="/home/inbox/b.json", rejected=[RowProblem(0, "-", "found CSV")]),
    ]
    data = TrainingDataExport(Path("t.jsonl"), Path("t.holdout.jsonl"), "0" * 64, 10, 2)
    pairs = PairsResult(Path("t.jsonl"), Path("t.pairs.jsonl"), pairs=5, rows=10)
    markdown = summary_markdown("challenger 2 promoted", data, pairs, results)
    assert "2 file(s), 2 correction(s) applied, 1 file(s) rejected" in markdown
    assert "REJECTED `b.json`" in markdown and "found CSV" in markdown
    assert import_summary_markdown(None) == ""


def test_a_value_the_database_still_refuses_rejects_the_file_instead_of_crashing(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net behind capture/text.py: a value the database refuses while a file is
    applied (here a statement made to fail with a DataError) rejects the file with the
    database's message; nothing is applied, nothing is retried."""
    import tasks.corrections

    with get_sync_engine(postgres_url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
    a, b = insert_logs(postgres_url, [Log("play queen", "music_play", 0.5), Log("x", "y", 0.5)])
    real = tasks.corrections.statements.update_correction
    calls: list[uuid.UUID] = []

    def refused(log_id: uuid.UUID, **kwargs: Any) -> Any:
        calls.append(log_id)
        if len(calls) == 1:
            return real(log_id, **kwargs)  # the first row is written, then rolled back
        return text("SELECT CAST(:v AS integer)").bindparams(v="not a number")

    monkeypatch.setattr(tasks.corrections.statements, "update_correction", refused)
    path = write_list(tmp_path / "two.json", [row(a, "music_play"), row(b, "weather")])
    result = import_corrections(path, url=postgres_url, catalog=CATALOG)
    assert [(p.row, p.field) for p in result.rejected] == [(0, "-")]
    assert "the database refused a value of this file" in result.rejected[0].message
    assert "invalid input syntax for type integer" in result.rejected[0].message
    assert result.applied == 0 and result.applied_ids == []
    assert corrections_in_db(postgres_url) == {a: (None, None), b: (None, None)}
