"""The ab-check flow: rollback with an alert, promotion, approval in the Prefect UI (resumed with
input by the test), and a timeout that rejects (docs/AB_TESTING.md)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from capture.ab_routing import CandidateServing
from capture.service import create_nlu_service
from capture.types import Prediction
from tasks.ab_candidate import DEFAULT_CANARY_SHARE, set_candidate
from tasks.registry import current_version, history
from tests.capture_helpers import FixedClassifier, capture_settings, fake_registry
from tests.model_fixtures import exported_model_dir, small_model_dir  # noqa: F401  (fixtures)
from tests.test_flows import champion_dir, serving  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("prefect_harness")


async def canary_traffic(url: str, models: Path, home: Path, *, candidate_ok: float) -> None:
    """400 users, half on the canary; the champion succeeds 50%, the candidate ``candidate_ok``."""
    set_candidate(models, "2", mode="canary", share=0.5)
    candidate = FixedClassifier(prediction=Prediction("weather", 0.9), version="2")
    ab = CandidateServing(models, loader=lambda path: candidate, watch=False)
    service = create_nlu_service(
        FixedClassifier(prediction=Prediction("weather", 0.8), version="1"),
        url=url,
        settings=capture_settings(url, home / "svc"),
        candidate=ab,
    )
    for i in range(400):
        result = await service.process_message("rain?", user_id=uuid.uuid4())
        rate = 0.5 if result.model_version == "1" else candidate_ok
        await service.update_workflow_outcome(result.log_id, (i * 37 % 100) < rate * 100, "w")
    await service.aclose()


def run_flow(home: Path, url: str, **kwargs: Any) -> dict[str, Any]:
    from flows.ab_check import ab_check_flow

    return ab_check_flow(home=str(home), database_url=url, min_outcomes=100, **kwargs)


def test_worse_canary_is_rolled_back_with_an_alert(
    sqlite_url: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = fake_registry(home)
    asyncio.run(canary_traffic(sqlite_url, models, home, candidate_ok=0.05))
    sent: list[str] = []

    def fake_webhook(url: str, payload: dict[str, Any]) -> Any:
        from tasks.alert_delivery import Delivery

        sent.append(payload["text"])
        return Delivery(channel="webhook", attempts=1)

    monkeypatch.setattr("flows.ab_check.send_webhook", fake_webhook)
    result = run_flow(home, sqlite_url, webhook_url="http://alerts.invalid/hook")
    assert result["readout"]["decision"] == "rollback"
    assert result["action"]["applied"] and not (models / "candidate").exists()
    assert current_version(models) == "1"
    assert len(sent) == 1 and "candidate 2 cleared" in sent[0]
    assert history(models)[-1]["action"] == "candidate-rollback"


def test_better_canary_is_promoted(sqlite_url: str, home: Path) -> None:
    models = fake_registry(home)
    asyncio.run(canary_traffic(sqlite_url, models, home, candidate_ok=0.95))
    result = run_flow(home, sqlite_url)
    assert result["readout"]["decision"] == "promote"
    assert current_version(models) == "2" and not (models / "candidate").exists()


def _resume_when_paused(answer: dict[str, Any], done: threading.Event) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )
    from prefect.flow_runs import resume_flow_run

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not done.is_set():
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"]))
                )
            )
        if runs:
            resume_flow_run(runs[0].id, run_input=answer)
            return
        time.sleep(0.5)


def test_approval_is_asked_outside_the_lock_and_resumed_with_input(
    sqlite_url: str, home: Path
) -> None:
    models = fake_registry(home)
    asyncio.run(canary_traffic(sqlite_url, models, home, candidate_ok=0.95))
    done = threading.Event()
    resumer = threading.Thread(
        target=_resume_when_paused, args=({"approve": True, "reason": "looks good"}, done)
    )
    resumer.start()
    try:
        result = run_flow(home, sqlite_url, require_approval=True, approval_timeout_s=120)
    finally:
        done.set()
        resumer.join(10)
    assert result["approval"] == {"approved": True, "reason": "looks good"}
    assert current_version(models) == "2"


def test_approval_timeout_rejects_and_the_champion_stays(sqlite_url: str, home: Path) -> None:
    models = fake_registry(home)
    asyncio.run(canary_traffic(sqlite_url, models, home, candidate_ok=0.95))
    result = run_flow(home, sqlite_url, require_approval=True, approval_timeout_s=2)
    assert result["approval"]["approved"] is False
    assert "no approval within 2s" in result["approval"]["reason"]
    assert current_version(models) == "1" and not (models / "candidate").exists()
    assert history(models)[-1]["action"] == "candidate-reject"


def test_stage_candidate_puts_a_published_version_under_test(home: Path) -> None:
    """The weekly cycle's shadow/canary deploy step (an exported version: no export needed)."""
    from flows.ab_check import stage_candidate_flow

    models = fake_registry(home)
    pointer = stage_candidate_flow("2", mode="canary", share=0.25, home=str(home))
    assert pointer == {"version": "2", "mode": "canary", "share": 0.25}
    assert current_version(models) == "1"
    assert history(models)[-1]["reason"] == "weekly cycle"


@pytest.mark.parametrize(
    ("mode", "expected_share"), [("shadow", 0.0), ("canary", DEFAULT_CANARY_SHARE)]
)
def test_stage_candidate_with_the_default_share_stages_either_mode(
    home: Path, mode: str, expected_share: float
) -> None:
    """The weekly cycle stages with the flow's defaults: a shadow candidate takes no share (a
    share with --mode shadow is a user error elsewhere), a canary the default one."""
    from flows.ab_check import stage_candidate_flow

    models = fake_registry(home)
    pointer = stage_candidate_flow("2", mode=mode, home=str(home))
    assert pointer == {"version": "2", "mode": mode, "share": expected_share}
    assert current_version(models) == "1"


# The weekly cycle's shadow/canary deploy step, with a real (tiny) training run.


@pytest.mark.slow
def test_weekly_cycle_stages_the_challenger_as_candidate_then_publishes_only(
    db_url: str,
    home: Path,
    serving: Path,  # noqa: F811  (the fixture)
) -> None:
    """deploy_mode defaults to shadow: a promoted challenger becomes the shadow candidate (the
    champion keeps serving); the next cycle, finding it still under test, publishes its
    challenger in the registry only and says so."""
    from capture.pointers import read_candidate
    from flows.weekly import weekly_cycle
    from tests.test_flows import LABELS, TINY, jsonl
    from tests.tiny_data import INTENTS

    jsonl(
        home / "data" / "base_train.jsonl", [(t, lab) for lab in LABELS for t in INTENTS[lab][:8]]
    )
    params: dict[str, Any] = {
        "days": 30,
        "hyperparameters": TINY,
        "min_support": 3,
        "max_overall_drop": 1.0,  # the gate promotes: this test is about the deploy step
        "max_intent_drop": 1.0,
        "quantize": False,
        "database_url": db_url,
    }
    first = weekly_cycle(**params)
    assert first.retrain.promote and first.retrain.version == "2"
    assert first.deployed is None  # not deployed: staged
    assert current_version(serving) == "1"
    pointer = read_candidate(serving)
    assert pointer is not None and (pointer.version, pointer.mode) == ("2", "shadow")
    assert (serving / "2" / "model.onnx").exists()  # exported for serving by the stage step
    assert "put under test as the shadow candidate beside version 1" in first.message
    staged = [row for row in history(serving) if row["action"] == "candidate-set"]
    assert [(r["version"], r["mode"], r["reason"]) for r in staged] == [
        ("2", "shadow", "weekly cycle")
    ]

    second = weekly_cycle(**params)
    assert second.retrain.promote and second.retrain.version == "3"
    assert second.deployed is None
    assert (
        "challenger 3 promoted by the gate and published in the registry only: candidate 2 is "
        "still under test (shadow)"
    ) in second.message
    assert (serving / "3" / "metadata.json").exists()  # published
    assert current_version(serving) == "1"
    pointer = read_candidate(serving)
    assert pointer is not None and pointer.version == "2"  # the test goes on untouched
    assert [r["action"] for r in history(serving)].count("candidate-set") == 1
