"""Training data export: sources, scrubbing, dedup priority, no user ids, stable hold-out."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import insert

from capture import db
from capture.models import TrainingExample
from tasks.training_data import (
    TrainingRow,
    export_training_data_task,
    holdout_path_for,
    is_held_out,
    merge_rows,
)
from tests.cycle_helpers import Log, insert_logs

FIELDS = ["text", "label", "confidence", "source", "corrected"]


def read(path: Path) -> list[dict[str, object]]:
    # JSON Lines split only at "\n": str.splitlines() would also split at U+2028/U+2029/U+0085.
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n") if line]


def test_sources_scrubbing_dedup_and_no_user_ids(db_url: str, tmp_path: Path) -> None:
    user = uuid.uuid4()
    insert_logs(
        db_url,
        [
            Log("email bob@example.com about the trip", "email_send", 0.95, user_id=user),
            Log("confident but failed", "weather", 0.99, was_successful=False),
            Log("confident and worked", "weather", 0.93, was_successful=True),
            Log("not confident enough", "weather", 0.6),
            Log("Add milk to my list", "todo_list", 0.5, corrected="todo_add"),
            Log("add milk to my list", "todo_list", 0.97),  # same text: the correction wins
            Log("play jazz", "music_play", 0.95),  # also in the base set: base wins
            Log("old one", "news", 0.99, age_days=40),
        ],
    )
    with db.get_sync_engine(db_url).begin() as conn:
        conn.execute(
            insert(TrainingExample),
            [
                {
                    "id": uuid.uuid4(),
                    "source_key": "k1",
                    "prompt": "call <PHONE> tomorrow",
                    "label": "phone_call",
                    "source": "production",
                    "corrected": True,
                    "confidence": 0.4,
                    "week": date.today(),
                }
            ],
        )
    base = tmp_path / "base.jsonl"
    base.write_text(
        '{"text": "play jazz", "label": "music"}\n{"text": "hello there", "label": "greet"}\n',
        encoding="utf-8",
    )
    out = tmp_path / "retraining.jsonl"
    export = export_training_data_task.fn(
        out, url=db_url, days=30, base_data=base, holdout_fraction=0.0
    )
    rows = read(out)
    assert all(list(r) == FIELDS for r in rows)
    by_text = {r["text"]: r for r in rows}
    assert set(by_text) == {
        "email <EMAIL> about the trip",
        "confident and worked",
        "Add milk to my list",
        "play jazz",
        "hello there",
        "call <PHONE> tomorrow",
    }
    assert by_text["Add milk to my list"] == {
        "text": "Add milk to my list",
        "label": "todo_add",
        "confidence": 0.5,
        "source": "production",
        "corrected": True,
    }
    assert by_text["play jazz"]["label"] == "music" and by_text["play jazz"]["source"] == "base"
    assert by_text["hello there"]["confidence"] is None
    assert by_text["call <PHONE> tomorrow"]["corrected"] is True
    text = out.read_text(encoding="utf-8")
    assert str(user) not in text and "bob@example.com" not in text
    assert export.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert export.counts == {"base": 2, "corrected": 2, "predicted": 2, "holdout": 0}
    assert len(export.corrected_ids) == 1 and export.n_train == 6
    assert export.dropped_duplicates == 2
    assert read(holdout_path_for(out)) == []


def test_the_holdout_is_fixed_by_the_text_and_never_trained_on(db_url: str, tmp_path: Path) -> None:
    texts = [f"reviewed prompt number {i}" for i in range(60)]
    insert_logs(db_url, [Log(t, "a", 0.5, corrected="b") for t in texts])
    base = tmp_path / "base.jsonl"
    held = [t for t in texts if is_held_out(t, 0.25)]
    assert 5 < len(held) < 30
    # The base set has one of the held-out texts: it must not leak into training either.
    base.write_text(
        json.dumps({"text": held[0], "label": "b"}) + '\n{"text": "x", "label": "c"}\n',
        encoding="utf-8",
    )
    first = export_training_data_task.fn(
        tmp_path / "w1.jsonl", url=db_url, base_data=base, holdout_fraction=0.25
    )
    second = export_training_data_task.fn(
        tmp_path / "w2.jsonl", url=db_url, base_data=base, holdout_fraction=0.25
    )
    train_texts = {r["text"] for r in read(first.path)}
    holdout_texts = {r["text"] for r in read(first.holdout_path)}
    assert holdout_texts == set(held)
    assert not train_texts & holdout_texts
    assert {r["text"] for r in read(second.holdout_path)} == holdout_texts
    assert first.sha256 == second.sha256
    assert first.n_holdout == len(held) and len(first.holdout_ids) == len(held)


def test_empty_data_is_an_error_naming_the_fix(db_url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no training data") as info:
        export_training_data_task.fn(tmp_path / "x.jsonl", url=db_url)
    assert not (tmp_path / "x.jsonl").exists()
    # the CLI user's fix (the base file in the home) and the flow's (its parameter base_data)
    assert "put the base training set at PROMPT_CAPTURE_HOME/data/base_train.jsonl" in str(
        info.value
    )
    assert "the flow parameter base_data" in str(info.value) and "widen --days" in str(info.value)
    base = tmp_path / "home" / "data" / "base_train.jsonl"
    with pytest.raises(ValueError, match=f"put the base training set at {base} "):
        export_training_data_task.fn(tmp_path / "x.jsonl", url=db_url, base_default=base)


def test_merge_prefers_corrections_then_base_then_predictions() -> None:
    rows = [
        TrainingRow("Hi", "greet", 0.99, "production", False),
        TrainingRow("hi", "hello", None, "base", False),
        TrainingRow("HI ", "smalltalk", 0.3, "production", True),
        TrainingRow("hi", "wave", 0.95, "production", False),
    ]
    train, holdout, dropped = merge_rows(rows, holdout_fraction=0.0)
    assert [(r.text, r.label, r.corrected) for r in train] == [("HI", "smalltalk", True)]
    assert holdout == [] and dropped == 3


@pytest.mark.parametrize("separator", ["\u2028", "\u2029"])
def test_a_prompt_with_a_unicode_line_break_exports_and_reads_back(
    db_url: str, tmp_path: Path, separator: str
) -> None:
    """Issue 13: str.splitlines() split a JSON Lines file inside a JSON string, so a prompt
    holding U+2028 made its own training export unloadable."""
    from tasks.records import load_records
    from tasks.training_file import read_training_file
    from tasks.training_pairs import read_training_rows

    prompts = [f"first line{separator}second line", f"play{separator}jazz", "plain one"]
    insert_logs(db_url, [Log(p, "music_play", 0.95) for p in prompts])
    insert_logs(db_url, [Log("will it rain", "weather", 0.4, corrected="weather")])
    out = tmp_path / "retraining.jsonl"
    export = export_training_data_task.fn(out, url=db_url, days=30, holdout_fraction=0.0)
    raw = out.read_text(encoding="utf-8")
    assert separator in raw and raw.count("\n") == export.n_train == 4  # written raw, 4 lines
    back = read_training_file(out)
    assert sorted(r.text for r in back) == sorted([*prompts, "will it rain"])
    assert {r.text for r in load_records(out)} == {r.text for r in back}
    assert len(read_training_rows.fn(out, False)) == 4  # what the pairs stage reads


def test_legacy_labels_are_exported_in_their_canonical_form(db_url: str, tmp_path: Path) -> None:
    """Labels stored before intent names were checked (``Music_Play``, ``weather`` + ZWSP) join
    their canonical intent instead of becoming separate labels; unusable ones are left out."""
    insert_logs(
        db_url,
        [
            Log("play queen", "music_play", 0.95),
            Log("play abba", "music_play", 0.5, corrected="Music_Play"),
            Log("is it sunny", "weather", 0.95),
            Log("is it windy", "weather", 0.5, corrected="weather\u200b"),
            Log("<b>hi</b>", "music_play", 0.5, corrected="<img src=x onerror=alert(1)>"),
        ],
    )
    out = tmp_path / "retraining.jsonl"
    export = export_training_data_task.fn(out, url=db_url, days=30, holdout_fraction=0.0)
    labels = {r["text"]: r["label"] for r in read(out)}
    assert labels == {
        "play queen": "music_play",
        "play abba": "music_play",
        "is it sunny": "weather",
        "is it windy": "weather",
    }
    assert export.labels == ["music_play", "weather"]
