"""Every "last N days" window ends at now (issue 13, case 15): a row dated in the future (a
client with a wrong clock, a simulated week) is counted by no report, review export or training
export. The monitor's hours are tested in tests/test_monitor_hours.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from capture.offline_statements import ParameterError
from tasks.report_figures import collect_report_data
from tasks.review_export import ReviewSelection, export_review_task
from tasks.training_data import export_training_data_task
from tests.cycle_helpers import Log, insert_logs

TOMORROW = -1.0  # age_days of a row dated one day after now


def _now() -> datetime:
    return datetime.now(UTC)


def test_the_report_does_not_count_a_row_dated_tomorrow(db_url: str, tmp_path: Path) -> None:
    insert_logs(
        db_url,
        [
            Log("yesterday", "weather", 0.9, was_successful=True, corrected="weather"),
            Log("tomorrow", "music_play", 0.3, was_successful=False, corrected="weather",
                age_days=TOMORROW),
        ],
    )  # fmt: skip
    data = collect_report_data(db_url, days=7, models_dir=tmp_path / "models", now=_now())
    assert data.total == 1
    assert [i.predicted_intent for i in data.intents] == ["weather"]
    assert [s.predicted_intent for s in data.success] == ["weather"]
    assert sum(b.count for b in data.confidence) == 1
    assert data.overall.corrections == 1 and data.overall.failures == 0
    assert all(d.day <= data.generated_at.date() for d in data.daily)


def test_the_review_export_leaves_out_a_row_dated_tomorrow(db_url: str, tmp_path: Path) -> None:
    insert_logs(
        db_url,
        [
            Log("unsure today", "a", 0.4, age_days=0.1),
            Log("unsure tomorrow", "a", 0.4, age_days=-1),
        ],
    )
    export = export_review_task.fn(
        tmp_path / "r.json", ReviewSelection(days=7, limit=10), url=db_url, now=_now()
    )
    assert [c.prompt for c in export.selected] == ["unsure today"]
    assert export.n_candidates == 1


def test_the_training_export_leaves_out_a_row_dated_tomorrow(db_url: str, tmp_path: Path) -> None:
    insert_logs(
        db_url,
        [
            Log("confident today", "a", 0.95, age_days=0.1),
            Log("confident tomorrow", "a", 0.95, age_days=TOMORROW),
            Log("corrected tomorrow", "a", 0.3, corrected="b", age_days=TOMORROW),
        ],
    )
    out = tmp_path / "t.jsonl"
    for days in (30, None):  # a window, and all time: both end now
        export = export_training_data_task.fn(
            out, url=db_url, days=days, holdout_fraction=0.0, now=_now()
        )
        texts = [json.loads(line)["text"] for line in out.read_text().split("\n") if line]
        assert texts == ["confident today"] and export.n_train == 1


@pytest.mark.parametrize("days", [0, -5, float("nan"), 40_000, True])
def test_a_bad_days_value_is_a_user_error_before_any_io(days: float, tmp_path: Path) -> None:
    unreachable = "postgresql://nobody@127.0.0.1:1/none"  # never connected to
    with pytest.raises(ParameterError, match="days: expected a number of days"):
        collect_report_data(unreachable, days=days, models_dir=tmp_path, now=_now())
    with pytest.raises(ParameterError, match="days: expected a number of days"):
        export_training_data_task.fn(tmp_path / "t.jsonl", url=unreachable, days=days)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="days: expected a number of days"):
        ReviewSelection(days=days)  # type: ignore[arg-type]
    assert not (tmp_path / "t.jsonl").exists()
