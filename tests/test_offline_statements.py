"""A person's mistake in a task parameter is a UserError raised before any database I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from capture.errors import UserError
from capture.offline_statements import (
    ParameterError,
    WindowCounts,
    check_count,
    check_days,
    window_start,
)
from tasks.report import write_report
from tasks.retention import run_retention
from tasks.review_export import ReviewSelection, export_review
from tasks.training_data import export_training_data

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture
def no_database(tmp_path: Path) -> str:
    """A URL no connection can open: a task that touched it would fail with another error."""
    return f"sqlite:///{tmp_path / 'missing-folder' / 'none.db'}"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"days": 0}, "days"),
        ({"days": -3}, "days"),
        ({"limit": -5}, "limit"),
        ({"strategy": "bogus"}, "strategy"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
    ],
)
def test_review_selection_refuses_a_mistake(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ParameterError, match=f"^{field}: expected") as err:
        ReviewSelection(**kwargs)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_tasks_refuse_before_touching_the_database(no_database: str, tmp_path: Path) -> None:
    with pytest.raises(ParameterError, match="days"):
        export_training_data(tmp_path / "t.jsonl", url=no_database, days=0, now=NOW)
    with pytest.raises(ParameterError, match="min_confidence"):
        export_training_data(tmp_path / "t.jsonl", url=no_database, min_confidence=2.0)
    with pytest.raises(ParameterError, match="days"):
        write_report(tmp_path / "r.html", no_database, days=0, now=NOW)
    with pytest.raises(ParameterError, match="retention_days"):
        run_retention(no_database, retention_days=0, now=NOW)
    with pytest.raises(ParameterError, match="strategy"):
        export_review(tmp_path / "r.json", ReviewSelection(strategy="smart"), url=no_database)
    assert not (tmp_path / "missing-folder").exists()


def test_checks() -> None:
    assert check_days(None) is None and check_days(7) == 7
    assert window_start(NOW, None) is None
    assert window_start(NOW, 1) == datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    with pytest.raises(ParameterError, match=r"days: expected a number of days in \(0, 36500\]"):
        check_days(float("nan"))
    assert check_count(0, "limit", minimum=0) == 0
    with pytest.raises(ParameterError, match="batch_size: expected a positive integer"):
        check_count(True, "batch_size")


def test_window_counts_add_up() -> None:
    a = WindowCounts(total=10, low_confidence=2, corrections=1, outcomes=8, failures=2)
    b = WindowCounts(total=0, low_confidence=0, corrections=0, outcomes=0, failures=0)
    total = WindowCounts.sum([a, b])
    assert total == a
    assert total.successes == 6 and total.success_rate == 0.75
    assert b.success_rate is None and b.correction_rate == 0.0
