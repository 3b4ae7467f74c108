"""The review file, the corrections file and the training export: one schema each, written and
read back through the same module; errors name the file, the row and the field."""

from __future__ import annotations

import json
import stat
import uuid
from pathlib import Path

import pytest

from capture.errors import UserError
from tasks.review_file import (
    REVIEW_FIELDS,
    ReviewFileError,
    ReviewRow,
    read_corrections,
    read_review_file,
    write_review_file,
)
from tasks.training_file import (
    TRAINING_FIELDS,
    TrainingFileError,
    TrainingRow,
    read_training_file,
    write_training_file,
)

ROW = ReviewRow(
    id=str(uuid.UUID(int=1)),
    prompt="can you help me with my schedule",
    predicted_intent="scheduling",
    confidence=0.654321,
    created_at="2026-11-20T10:00:00+00:00",
)


def test_review_file_round_trip_is_private_and_exact(tmp_path: Path) -> None:
    path = tmp_path / "review.json"
    assert write_review_file(path, [ROW, ROW.reviewed("calendar_event", "an event")]) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text(encoding="utf-8")
    assert text.startswith('[\n  {\n    "id": ') and text.endswith("]\n")
    rows = json.loads(text)
    assert [tuple(r) for r in rows] == [REVIEW_FIELDS, REVIEW_FIELDS]
    assert rows[0]["confidence"] == 0.6543 and rows[0]["corrected_intent"] == ""
    back = read_review_file(path)
    assert back[1].corrected_intent == "calendar_event" and back[1].notes == "an event"
    assert back[0] == ReviewRow(**{**rows[0]})


def test_review_file_errors_name_row_and_field(tmp_path: Path) -> None:
    path = tmp_path / "review.json"
    rows = [ROW.as_json(), {**ROW.as_json(), "confidence": "high"}]
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(ReviewFileError, match=r"review\.json, row 2, field 'confidence'") as err:
        read_review_file(path)
    assert isinstance(err.value, UserError)


def test_corrections_file_with_a_bom_reads_like_without(tmp_path: Path) -> None:
    path = tmp_path / "reviewed.json"
    rows = [ROW.reviewed("calendar_event").as_json(), ROW.as_json()]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode("utf-8"))
    corrections, not_reviewed, problems = read_corrections(path)
    assert problems == [] and not_reviewed == 1
    assert [(c.row, c.corrected_intent) for c in corrections] == [(1, "calendar_event")]
    (tmp_path / "empty.json").write_text("", encoding="utf-8")
    _, _, whole = read_corrections(tmp_path / "empty.json")
    assert [(p.row, p.field) for p in whole] == [(0, "-")] and "empty" in whole[0].message


def test_training_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "retraining.jsonl"
    rows = [
        TrainingRow("add event to calendar", "calendar_event", 0.671234, "production", True),
        TrainingRow("hello there", "greet", None, "base", False),
    ]
    sha = write_training_file(path, rows)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [tuple(json.loads(line)) for line in lines] == [TRAINING_FIELDS, TRAINING_FIELDS]
    assert json.loads(lines[0])["confidence"] == 0.6712
    assert len(sha) == 64
    back = read_training_file(path)
    assert [(r.text, r.label, r.source, r.corrected) for r in back] == [
        (r.text, r.label, r.source, r.corrected) for r in rows
    ]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ({"text": "x", "label": "a", "confidence": 1.5}, "field 'confidence': expected a number"),
        ({"text": "x", "label": "a", "corrected": "yes"}, "field 'corrected': expected true or"),
        ({"text": "x", "label": "a", "source": ""}, "field 'source'"),
        ({"text": "", "label": "a"}, "field 'text': expected non-empty text"),
    ],
)
def test_training_file_errors_name_line_and_field(
    tmp_path: Path, line: dict[str, object], needle: str
) -> None:
    path = tmp_path / "t.jsonl"
    good = {"text": "ok", "label": "a", "confidence": None, "source": "base", "corrected": False}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n", encoding="utf-8")
    with pytest.raises(TrainingFileError if "text" not in needle else UserError) as err:
        read_training_file(path)
    assert f"{path}:2:" in str(err.value) and needle in str(err.value)
