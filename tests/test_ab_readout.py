"""The A/B readout from production rows, and the sequential decision (docs/AB_TESTING.md)."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from capture import db
from capture.ab_routing import CandidateServing
from capture.pointers import write_candidate
from capture.service import create_nlu_service
from capture.shadow import SHADOW_TABLE
from capture.types import Prediction
from tasks.ab_candidate import apply_decision, set_candidate
from tasks.ab_decision import (
    EXPIRED,
    KEEP,
    PROMOTE,
    ROLLBACK,
    ABPlan,
    canary_decision,
    guardrail_tripped,
    msprt_halfwidth,
    msprt_lambda,
    shadow_decision,
)
from tasks.ab_readout import ab_readout, wilson_interval
from tasks.registry import current_version, history
from tests.capture_helpers import FixedClassifier, capture_settings, fake_registry


def loader(candidate: FixedClassifier) -> object:
    return lambda path: candidate


# The statistics.


def test_wilson_interval_matches_the_textbook() -> None:
    low, high = wilson_interval(80, 100)
    assert low == pytest.approx(0.7112, abs=1e-4) and high == pytest.approx(0.8667, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_msprt_interval_is_the_set_lambda_does_not_reject() -> None:
    variance, tau, alpha = 4e-5, 0.02, 0.05
    half = msprt_halfwidth(variance, tau, alpha)
    # At the boundary the likelihood ratio equals 1/alpha.
    assert msprt_lambda(half, 0.0, variance, tau) == pytest.approx(1 / alpha, rel=1e-6)
    assert msprt_lambda(half * 0.9, 0.0, variance, tau) < 1 / alpha


def test_canary_decisions() -> None:
    plan = ABPlan(min_outcomes=100)
    assert canary_decision((80, 99), (80, 99), plan=plan).decision == KEEP  # too few
    assert canary_decision((80, 99), (80, 99), plan=plan, days=30).decision == EXPIRED
    assert canary_decision((80_000, 100_000), (8_000, 10_000), plan=plan).decision == KEEP
    assert canary_decision((80_000, 100_000), (7_400, 10_000), plan=plan).decision == ROLLBACK
    assert canary_decision((80_000, 100_000), (32_200, 40_000), plan=plan).decision == PROMOTE
    assert canary_decision((80_000, 100_000), (8_100, 10_000), plan=plan, days=40).decision in {
        PROMOTE,
        EXPIRED,
    }
    assert json.dumps(canary_decision((1, 2), (1, 2)).to_dict())  # JSON-safe without NaN
    assert guardrail_tripped((900, 1000), (300, 500))
    assert not guardrail_tripped((900, 1000), (440, 500))


def test_peeking_every_batch_keeps_the_error_rate() -> None:
    """Equal arms read after every batch of 50: 'significantly worse' in <= 5% of runs."""
    rng = np.random.default_rng(7)
    plan = ABPlan(min_outcomes=50)
    rollbacks = 0
    for _ in range(200):
        sa = na = sb = nb = 0
        for _ in range(100):
            na += 50
            nb += 50
            sa += int(rng.binomial(50, 0.8))
            sb += int(rng.binomial(50, 0.8))
            if canary_decision((sa, na), (sb, nb), plan=plan).decision == ROLLBACK:
                rollbacks += 1
                break
    assert rollbacks / 200 <= 0.05


def test_shadow_decisions() -> None:
    assert shadow_decision(10, 1.0, 0, 0)[0] == KEEP
    assert shadow_decision(1000, 0.95, 0, 0)[0] == "go-canary"
    assert shadow_decision(1000, 0.5, 30, 10)[0] == "go-canary"
    assert shadow_decision(1000, 0.5, 5, 30)[0] == "reject"


# The readout from the database.


async def test_canary_readout_per_arm(db_url: str, tmp_path: Path) -> None:
    models = fake_registry(tmp_path)
    set_candidate(models, "2", mode="canary", share=0.5)
    candidate = FixedClassifier(prediction=Prediction("weather", 0.9), version="2")
    ab = CandidateServing(models, loader=loader(candidate), watch=False)  # type: ignore[arg-type]
    champion = FixedClassifier(prediction=Prediction("weather", 0.8), version="1")
    service = create_nlu_service(
        champion, url=db_url, settings=capture_settings(db_url, tmp_path / "h"), candidate=ab
    )
    per_arm = {"1": 0, "2": 0}
    for i in range(400):
        result = await service.process_message("rain?", user_id=uuid.uuid4())
        version = str(result.model_version)
        per_arm[version] += 1
        ok = (i % 10) != 0 if version == "1" else (i % 4) != 0
        await service.update_workflow_outcome(result.log_id, ok, "weather")
        if i % 20 == 0:
            await service.add_correction(result.log_id, "news")
    await service.aclose()
    readout = ab_readout(db_url, models, plan=ABPlan(min_outcomes=50), min_support=10)
    assert readout.mode == "canary" and readout.candidate == "2" and readout.champion == "1"
    assert readout.champion_arm is not None and readout.candidate_arm is not None
    assert readout.champion_arm.prompts == per_arm["1"]
    assert readout.candidate_arm.prompts == per_arm["2"]
    assert readout.champion_arm.users == per_arm["1"]
    assert readout.champion_arm.outcomes == per_arm["1"]
    assert readout.candidate_arm.success_rate is not None
    assert readout.candidate_arm.success_rate < readout.champion_arm.success_rate  # type: ignore[operator]
    assert readout.champion_arm.corrections + readout.candidate_arm.corrections == 20
    assert {row["intent"] for row in readout.per_intent} == {"weather"}
    data = json.loads(json.dumps(readout.to_dict()))
    assert data["decision"] in {"keep-testing", "rollback"}
    assert "| champion | 1 |" in readout.to_markdown()


async def test_shadow_readout_says_which_model_was_right(db_url: str, tmp_path: Path) -> None:
    with db.get_sync_engine(db_url).begin() as conn:
        conn.execute(text(f"DELETE FROM {SHADOW_TABLE}"))
    models = fake_registry(tmp_path)
    set_candidate(models, "2", mode="shadow")

    class ByText(FixedClassifier):
        def predict(self, text: str) -> Prediction:
            return Prediction(text.split(maxsplit=1)[0], 0.9)

    ab = CandidateServing(models, loader=loader(ByText(version="2")), watch=False)  # type: ignore[arg-type]
    champion = FixedClassifier(prediction=Prediction("weather", 0.8), version="1")
    service = create_nlu_service(
        champion, url=db_url, settings=capture_settings(db_url, tmp_path / "h"), candidate=ab
    )
    # 6 agreements; 4 disagreements: 2 corrected to the candidate's intent, 1 to the
    # champion's, 1 failed uncorrected.
    ids = []
    for word in ["weather"] * 6 + ["news"] * 4:
        ids.append((await service.process_message(f"{word} please")).log_id)
    await service.add_correction(ids[6], "news")
    await service.add_correction(ids[7], "news")
    await service.add_correction(ids[8], "weather")
    await service.update_workflow_outcome(ids[9], False, "weather")
    assert service.shadow is not None and service.shadow.flush(30)
    await service.aclose()
    readout = ab_readout(db_url, models)
    s = readout.shadow
    assert (s.compared, s.agreements, s.disagreements_corrected) == (10, 6, 3)
    assert (s.candidate_right, s.champion_right, s.neither_right) == (2, 1, 0)
    assert s.disagreements_failed_uncorrected == 1
    assert readout.decision == KEEP  # fewer than min_shadow compared
    assert "agreement 60.00%" in readout.to_markdown()


def test_apply_decision_acts_only_on_the_candidate_it_read(tmp_path: Path) -> None:
    models = fake_registry(tmp_path)
    (models / "3").mkdir()
    for name in ("metadata.json", "model.onnx", "tokenizer.json"):
        (models / "3" / name).write_text("{}")
    set_candidate(models, "2", mode="shadow")
    out = apply_decision(models, decided_on="2", decision="go-canary", reason="agrees")
    assert out["applied"]
    write_candidate(models, "3", "canary", 0.1)  # changed since the evidence was read
    out = apply_decision(models, decided_on="2", decision="promote", reason="non-inferior")
    assert not out["applied"] and current_version(models) == "1"
    out = apply_decision(models, decided_on="3", decision="rollback", reason="worse")
    assert out["applied"] and not (models / "candidate").exists()
    assert history(models)[-1]["action"] == "candidate-rollback"
