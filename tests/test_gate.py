"""The promotion gate and the model card."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluate import EvalReport, compute_report
from tasks.gate import GateRules, decide, render_model_card

LABELS = ["a", "b", "c"]


def report(truth: list[str], predicted: list[str]) -> EvalReport:
    probs = np.full((len(truth), len(LABELS)), 0.05)
    for i, label in enumerate(predicted):
        probs[i, LABELS.index(label)] = 0.9
    return compute_report(LABELS, probs, truth, oos_label="oos")


TRUTH = ["a"] * 20 + ["b"] * 20 + ["c"] * 4


def test_a_better_challenger_is_promoted() -> None:
    champion = report(TRUTH, ["a"] * 18 + ["b"] * 2 + ["b"] * 18 + ["a"] * 2 + ["c"] * 4)
    challenger = report(TRUTH, ["a"] * 20 + ["b"] * 19 + ["a"] + ["c"] * 4)
    decision = decide(champion, challenger, GateRules())
    assert decision.promote and decision.verdict == "PROMOTE"
    assert decision.overall_delta == pytest.approx((43 - 40) / 44)
    deltas = {d.intent: d for d in decision.per_intent}
    assert deltas["a"].delta == pytest.approx(0.1) and not deltas["a"].blocking


def test_an_overall_drop_is_rejected_unless_within_the_margin() -> None:
    champion = report(TRUTH, ["a"] * 20 + ["b"] * 20 + ["c"] * 4)
    challenger = report(TRUTH, ["a"] * 20 + ["b"] * 19 + ["a"] + ["c"] * 4)
    rejected = decide(champion, challenger, GateRules(max_intent_drop=0.5))
    assert not rejected.promote
    assert "overall accuracy dropped" in rejected.reasons[0]
    allowed = decide(champion, challenger, GateRules(max_overall_drop=0.05, max_intent_drop=0.5))
    assert allowed.promote


def test_one_intent_collapsing_blocks_even_when_overall_improves() -> None:
    champion = report(TRUTH, ["a"] * 15 + ["b"] * 5 + ["b"] * 10 + ["a"] * 10 + ["c"] * 4)
    # a: 75% -> 100%, b: 50% -> 40% (-10 points with 20 examples), overall 29/44 -> 32/44.
    challenger = report(TRUTH, ["a"] * 20 + ["b"] * 8 + ["a"] * 12 + ["c"] * 4)
    decision = decide(champion, challenger, GateRules(max_intent_drop=0.05, min_support=10))
    assert decision.overall_delta > 0
    assert not decision.promote
    assert any("intent 'b' recall dropped" in r for r in decision.reasons)
    # An intent with fewer examples than min_support cannot block.
    few = report(TRUTH, ["a"] * 20 + ["b"] * 20 + ["a"] * 4)
    base = report(TRUTH, ["a"] * 20 + ["b"] * 20 + ["c"] * 4)
    small = decide(base, few, GateRules(max_overall_drop=0.2, min_support=10))
    assert small.promote
    assert {d.intent: d.gated for d in small.per_intent}["c"] is False


def test_reports_on_different_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="same data"):
        decide(report(TRUTH, TRUTH), report(TRUTH[:10], TRUTH[:10]), GateRules())


def test_rules_are_validated() -> None:
    with pytest.raises(ValueError, match="max_intent_drop"):
        GateRules(max_intent_drop=5)
    with pytest.raises(ValueError, match="min_support"):
        GateRules(min_support=0)


def test_model_card_holds_decision_reasons_deltas_and_training_data() -> None:
    champion = report(TRUTH, ["a"] * 20 + ["b"] * 20 + ["c"] * 4)
    challenger = report(TRUTH, ["a"] * 10 + ["b"] * 10 + ["b"] * 20 + ["c"] * 4)
    decision = decide(champion, challenger, GateRules())
    card = render_model_card(
        version="7",
        parent_version="6",
        decision=decision,
        reports={"base test": (champion, challenger)},
        training={
            "training_data": "/x/retraining.jsonl",
            "training_data_sha256": "f" * 64,
            "n_train": 120,
            "counts": {"base": 100, "corrected": 20},
            "corrected_ids": ["id1", "id2"],
            "n_holdout": 4,
        },
        hyperparameters={"max_steps": 3},
    )
    assert card.startswith("# Model card: version 7")
    assert "**Decision: REJECT**" in card and "champion 6" in card
    assert "intent 'a' recall dropped -50.0%" in card
    assert "| a | 20 | 100.0% | 50.0% | -50.0% | yes | **yes** |" in card
    assert "| base test | 44 | 100.00% | 77.27% | -22.73% |" in card
    assert "f" * 64 in card and "base 100, corrected 20" in card
    assert "corrected production prompts used: 2; held out for evaluation: 4" in card
    assert "- max_steps: 3" in card
