"""What an operator sees in the Prefect UI (the test harness's API): the project's own log lines
in the run's logs, a rejected challenger's run in a state named ``Rejected``, and a flow on an
unmigrated database failing once with the fix (no task retried)."""

from __future__ import annotations

import sqlite3
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from uuid import UUID

import pytest

from tests.model_fixtures import small_model_dir  # noqa: F401  (the fixture)

pytestmark = pytest.mark.usefixtures("prefect_harness")


def run_logs(flow_run_id: UUID, *, wanted: str, timeout: float = 30.0) -> list[Any]:
    """The flow run's logs as the UI reads them, once one whose logger name starts with
    ``wanted`` arrived (logs are shipped in the background)."""
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            if any(log.name.startswith(wanted) for log in logs) or time.monotonic() > deadline:
                return logs
            time.sleep(0.2)


def task_runs(flow_run_id: UUID) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def test_the_tasks_log_lines_are_in_the_run_logs(sqlite_url: str, tmp_path: Path) -> None:
    from flows.review import review_export_flow

    state = review_export_flow(
        days=7,
        use_embeddings=False,
        output=str(tmp_path / "review.json"),
        home=str(tmp_path / "home"),
        database_url=sqlite_url,
        return_state=True,
    )
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    logs = run_logs(flow_run_id, wanted="tasks.")
    names = {log.name for log in logs}
    # The flow's own line and the task module's line (tasks.review_export), in one run.
    assert "prefect.flow_runs" in names
    exported = [log for log in logs if log.name == "tasks.review_export"]
    assert exported and "review export:" in exported[0].message
    assert all(log.flow_run_id == flow_run_id for log in exported)


def test_a_tasks_log_line_outside_any_run_is_not_sent_and_does_not_warn(
    tmp_path: Path,
) -> None:
    import logging

    from prefect.logging.handlers import APILogHandler

    from tasks.run_logging import send_logs_to_run

    send_logs_to_run()
    send_logs_to_run()  # idempotent: one handler that sends to the API
    handlers = [h for h in logging.getLogger("tasks").handlers if isinstance(h, APILogHandler)]
    assert len(handlers) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logging.getLogger("tasks.some_module").info("outside any run")


def gate_result(promote: bool) -> Any:
    return SimpleNamespace(
        promote=promote, version="7", champion_version="6", card=Path("/models/7/card.md")
    )


def test_a_rejected_challenger_ends_in_a_state_named_rejected() -> None:
    from prefect import flow

    from tasks.retrain import REJECTED_STATE_NAME, RetrainResult, final_state

    @flow(name="gate-outcome")
    def gated(promote: bool) -> str:
        return final_state("the result", cast(RetrainResult, gate_result(promote)))

    @flow(name="gate-outcome-parent")
    def parent() -> str:
        return gated(False)  # as the weekly cycle calls the retrain flow

    rejected = gated(False, return_state=True)
    assert rejected.is_completed() and rejected.name == REJECTED_STATE_NAME == "Rejected"
    assert rejected.message is not None
    assert "challenger 7 rejected by the gate; version 6 keeps serving" in rejected.message
    assert rejected.result() == "the result"
    promoted = gated(True, return_state=True)
    assert promoted.is_completed() and promoted.name == "Completed"
    # Whoever calls the flow gets the result, not the state.
    assert gated(False) == "the result"
    assert parent() == "the result"


@pytest.mark.parametrize("flow_name", ["review", "weekly"])
def test_a_flow_on_an_unmigrated_database_fails_once_with_the_fix(
    flow_name: str, tmp_path: Path
) -> None:
    from flows.review import review_export_flow
    from flows.weekly import weekly_cycle

    path = tmp_path / "unmigrated.db"
    sqlite3.connect(path).close()
    url = f"sqlite:///{path}"
    run: Any = review_export_flow if flow_name == "review" else weekly_cycle
    (tmp_path / "home" / "models").mkdir(parents=True)  # a set-up home (tasks.layout)
    state = run(home=str(tmp_path / "home"), database_url=url, return_state=True)
    assert state.is_failed()
    assert "prompt-capture db upgrade" in (state.message or "")
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    # Checked at the flow's entry: no task ran, so none was retried.
    assert task_runs(flow_run_id) == []


def test_a_deploy_exports_then_builds_the_fast_path_as_two_task_runs(
    home: Path,
    small_model_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast path on: deploying a version without model.onnx shows the export's two steps as
    the deploy's task runs, ``export-onnx`` then ``build-fast-path`` (this version has no
    training data: it serves without a fast path, and says so)."""
    from capture.settings import get_settings
    from flows.deploy import deploy_flow
    from tasks.layout import HomeLayout
    from tasks.registry import publish

    monkeypatch.setenv("PROMPT_CAPTURE_FAST_PATH", "true")
    get_settings.cache_clear()
    publish(small_model_dir, HomeLayout(home).create_registry(), version="1")
    state = deploy_flow("1", quantize=False, home=str(home), return_state=True)
    assert state.is_completed(), state.message
    export = state.result().export
    assert export is not None and export.published == "fp32"
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    runs = sorted(task_runs(flow_run_id), key=lambda run: run.start_time)
    steps = [run.name.rsplit("-", 1)[0] for run in runs]
    assert steps == ["choose-version", "export-onnx", "build-fast-path", "deploy-model"], steps
    logs = run_logs(flow_run_id, wanted="tasks.fast_path")
    assert any("serves without a fast path" in log.message for log in logs)
