"""The retry rule: an ``io_task`` retries I/O failures and never a user's mistake (issue 13, case
6: ``--days 0`` was retried twice and then printed as a traceback), and every task of the
project that retries uses it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prefect import flow

from capture.errors import UserError
from capture.offline_statements import ParameterError
from tasks.retry import io_task

REPO = Path(__file__).resolve().parents[1]


def test_a_user_error_fails_at_once_and_an_io_error_is_retried(prefect_harness: None) -> None:
    calls: list[str] = []

    @io_task(name="flaky", retry_delay_seconds=0)
    def flaky(kind: str) -> str:
        calls.append(kind)
        if kind == "user":
            raise ParameterError("days: expected a number of days in (0, 36500], found 0")
        if len(calls) < 3:
            raise ConnectionError("database restarting")
        return "done"

    @flow
    def run(kind: str) -> str:
        return flaky(kind)

    with pytest.raises(UserError, match="days: expected"):
        run("user")
    assert calls == ["user"]  # not retried
    calls.clear()
    assert run("io") == "done"
    assert calls == ["io", "io", "io"]  # two retries


def test_io_task_keeps_the_function_and_refuses_bad_settings() -> None:
    def add(a: int, b: int = 1) -> int:
        return a + b

    task_ = io_task(add, name="add", retries=0)
    assert task_.fn(2) == 3 and task_.name == "add" and task_.retries == 0
    with pytest.raises(ValueError, match="retries must be an integer >= 0"):
        io_task(add, name="add", retries=-1)


def test_every_retried_task_retries_only_io_failures() -> None:
    """No ``task(... retries=...)`` in tasks/ or flows/ outside tasks/retry.py: a retried task is
    an ``io_task`` (whose retry condition is ``retry_on_io``)."""
    offenders = []
    for path in [*REPO.glob("tasks/**/*.py"), *REPO.glob("flows/**/*.py")]:
        if path.name == "retry.py":
            continue
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"\btask\((?P<args>[^()]*(?:\([^()]*\)[^()]*)*)\)", text):
            if "retries" in match["args"]:
                offenders.append(f"{path.relative_to(REPO)}: {match.group(0)[:60]}")
    assert offenders == []
