"""Review export: the spec's review format, selection beyond a threshold, the review budget."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np

from tasks.review_export import REVIEW_FIELDS, ReviewSelection, export_review_task
from tests.cycle_helpers import Log, insert_logs


def test_the_review_file_holds_exactly_the_spec_fields(db_url: str, tmp_path: Path) -> None:
    ids = insert_logs(
        db_url,
        [
            Log("can you help me with my schedule", "scheduling", 0.65),
            Log("book the dentist", "calendar_event", 0.95, was_successful=True),
        ],
    )
    out = tmp_path / "review.json"
    export = export_review_task.fn(out, ReviewSelection(days=7, limit=10), url=db_url)
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert isinstance(rows, list) and len(rows) == 1 == export.n_selected
    (first,) = rows
    assert tuple(first) == REVIEW_FIELDS
    assert first["id"] == str(ids[0])
    assert first["prompt"] == "can you help me with my schedule"
    assert first["predicted_intent"] == "scheduling"
    assert first["confidence"] == 0.65
    assert first["corrected_intent"] == "" and first["notes"] == ""
    assert datetime.fromisoformat(first["created_at"]).utcoffset() is not None


def test_selection_goes_beyond_the_threshold(db_url: str, tmp_path: Path) -> None:
    logs = [
        Log("low confidence one", "a", 0.5, secondary=(("b", 0.3),)),
        Log("confident but the workflow failed", "a", 0.97, was_successful=False),
        Log("a near tie", "a", 0.52, secondary=(("b", 0.48),)),
        Log("confident and fine", "a", 0.96, secondary=(("b", 0.02),), was_successful=True),
        Log("small margin above the threshold", "a", 0.55, secondary=(("b", 0.45),)),
        Log("already corrected", "a", 0.3, corrected="b"),
        Log("too old", "a", 0.2, age_days=30),
        Log("clear winner above the threshold", "a", 0.8, secondary=(("b", 0.1),)),
    ]
    insert_logs(db_url, logs)
    export = export_review_task.fn(
        tmp_path / "r.json", ReviewSelection(days=7, confidence_threshold=0.7, limit=10), url=db_url
    )
    prompts = {c.prompt for c in export.selected}
    assert prompts == {
        "low confidence one",
        "confident but the workflow failed",
        "a near tie",
        "small margin above the threshold",
    }
    assert export.reasons == {"failed": 1, "low-confidence": 3, "small-margin": 2}
    # The budget takes the most uncertain first: margin = smallest top-1/top-2 gap first,
    # threshold = lowest confidence first.
    top = export_review_task.fn(
        tmp_path / "top.json", ReviewSelection(days=7, limit=2, strategy="margin"), url=db_url
    )
    assert [c.prompt for c in top.selected] == ["a near tie", "small margin above the threshold"]
    lowest = export_review_task.fn(
        tmp_path / "low.json", ReviewSelection(days=7, limit=2, strategy="threshold"), url=db_url
    )
    assert [c.prompt for c in lowest.selected] == ["low confidence one", "a near tie"]
    failed_first = export_review_task.fn(
        tmp_path / "ff.json", ReviewSelection(days=7, limit=1, strategy="failed-first"), url=db_url
    )
    assert [c.prompt for c in failed_first.selected] == ["confident but the workflow failed"]
    everything = export_review_task.fn(
        tmp_path / "all.json", ReviewSelection(days=None, limit=10), url=db_url
    )
    assert "too old" in {c.prompt for c in everything.selected}


def test_near_duplicates_are_collapsed(db_url: str, tmp_path: Path) -> None:
    insert_logs(
        db_url,
        [
            Log("Set a reminder!", "reminders", 0.4),
            Log("set a reminder", "reminders", 0.41),
            Log("remind me to call mom", "reminders", 0.42),
            Log("what's the weather", "weather", 0.45),
        ],
    )
    plain = export_review_task.fn(
        tmp_path / "a.json", ReviewSelection(days=7, limit=10), url=db_url
    )
    assert len(plain.selected) == 3  # the exact (normalised) duplicate is collapsed

    def embed(texts: Sequence[str]) -> np.ndarray:
        # "reminder" prompts share one direction: near-duplicates by cosine similarity.
        return np.array([[1.0, 0.0] if "remind" in t.lower() else [0.0, 1.0] for t in texts])

    collapsed = export_review_task.fn(
        tmp_path / "b.json", ReviewSelection(days=7, limit=10), url=db_url, embed=embed
    )
    assert len(collapsed.selected) == 2
    assert {c.predicted_intent for c in collapsed.selected} == {"reminders", "weather"}
