"""The promotion gate: challenger vs champion on the same data, and the model card.

Rules (all configurable, see :class:`GateRules`):

- overall: the challenger's accuracy on the evaluation data must be at least the champion's minus
  ``max_overall_drop`` (0: at least as good);
- per intent: for every intent with at least ``min_support`` evaluation examples, the challenger's
  recall (accuracy on that intent's examples) must not drop by more than ``max_intent_drop``.

The evaluation data is the base test set plus the held-out corrected production prompts; both
models are scored on exactly the same rows. The decision, its reasons and the per-intent deltas go
into a markdown model card (a Prefect artifact and ``card.md`` in the version directory).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from capture.errors import UserError
from tasks.evaluate import EvalReport

logger = logging.getLogger(__name__)


class GateRulesError(UserError, ValueError):
    """A gate rule out of range; the message names the rule, the range and the value."""


@dataclass(frozen=True, slots=True)
class GateRules:
    """When a challenger may replace the champion; out-of-range values raise
    :class:`GateRulesError` (a ``UserError``: they are flow parameters and CLI options)."""

    max_overall_drop: float = 0.0
    max_intent_drop: float = 0.05
    min_support: int = 10

    def __post_init__(self) -> None:
        for name in ("max_overall_drop", "max_intent_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise GateRulesError(f"{name}: expected a fraction in [0, 1], found {value!r}")
        if self.min_support < 1:
            raise GateRulesError(f"min_support: expected >= 1, found {self.min_support!r}")


@dataclass(frozen=True, slots=True)
class IntentDelta:
    intent: str
    support: int
    champion_recall: float
    challenger_recall: float
    delta: float
    gated: bool  # support >= min_support: this intent can block the promotion
    blocking: bool


@dataclass(frozen=True, slots=True)
class GateDecision:
    promote: bool
    reasons: list[str]
    champion_accuracy: float
    challenger_accuracy: float
    overall_delta: float
    per_intent: list[IntentDelta] = field(default_factory=list)
    rules: GateRules = field(default_factory=GateRules)
    n: int = 0

    @property
    def verdict(self) -> str:
        return "PROMOTE" if self.promote else "REJECT"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = self.verdict
        return out


def decide(champion: EvalReport, challenger: EvalReport, rules: GateRules) -> GateDecision:
    """Apply the rules to two reports computed on the same rows."""
    if champion.n != challenger.n:
        raise ValueError(
            f"the champion was scored on {champion.n} rows and the challenger on "
            f"{challenger.n}: the gate compares models on the same data only"
        )
    reasons: list[str] = []
    overall = challenger.accuracy - champion.accuracy
    overall_ok = overall >= -rules.max_overall_drop - 1e-12
    if overall_ok:
        reasons.append(
            f"overall accuracy {challenger.accuracy:.2%} vs champion {champion.accuracy:.2%} "
            f"({overall:+.2%}; allowed drop {rules.max_overall_drop:.2%})"
        )
    else:
        reasons.append(
            f"overall accuracy dropped {overall:+.2%}: {challenger.accuracy:.2%} vs champion "
            f"{champion.accuracy:.2%} (allowed drop {rules.max_overall_drop:.2%})"
        )
    deltas: list[IntentDelta] = []
    intents = sorted(set(champion.per_intent) | set(challenger.per_intent))
    for intent in intents:
        old = champion.per_intent.get(intent)
        new = challenger.per_intent.get(intent)
        known = old if old is not None else new
        support = known.support if known is not None else 0
        if support == 0:
            continue  # predicted but never the true label: no recall to compare
        old_recall = old.recall if old else 0.0
        new_recall = new.recall if new else 0.0
        delta = new_recall - old_recall
        gated = support >= rules.min_support
        blocking = gated and delta < -rules.max_intent_drop - 1e-12
        deltas.append(IntentDelta(intent, support, old_recall, new_recall, delta, gated, blocking))
    blockers = [d for d in deltas if d.blocking]
    for d in blockers:
        reasons.append(
            f"intent {d.intent!r} recall dropped {d.delta:+.1%} "
            f"({d.champion_recall:.1%} -> {d.challenger_recall:.1%}, {d.support} examples; "
            f"allowed drop {rules.max_intent_drop:.1%})"
        )
    if not blockers:
        checked = sum(1 for d in deltas if d.gated)
        reasons.append(
            f"no intent with >= {rules.min_support} examples dropped more than "
            f"{rules.max_intent_drop:.1%} ({checked} intents checked)"
        )
    promote = overall_ok and not blockers
    deltas.sort(key=lambda d: (d.delta, d.intent))
    decision = GateDecision(
        promote=promote,
        reasons=reasons,
        champion_accuracy=champion.accuracy,
        challenger_accuracy=challenger.accuracy,
        overall_delta=overall,
        per_intent=deltas,
        rules=rules,
        n=champion.n,
    )
    logger.info("gate: %s; %s", decision.verdict, "; ".join(reasons))
    return decision


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None:
        return "–"
    return f"{value:.2%}" if pct else f"{value:.4f}"


def render_model_card(
    *,
    version: str,
    parent_version: str | None,
    decision: GateDecision,
    reports: Mapping[str, tuple[EvalReport, EvalReport]],
    training: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    files: Sequence[str] = (),
) -> str:
    """The markdown model card: decision and reasons, metrics per evaluation set, per-intent
    recall deltas, and what the challenger was trained on.

    ``reports`` maps an evaluation set's name to (champion report, challenger report).
    """
    lines = [
        f"# Model card: version {version}",
        "",
        f"**Decision: {decision.verdict}** — challenger {version} vs champion "
        f"{parent_version or 'none'}.",
        "",
        "## Reasons",
        "",
        *[f"- {reason}" for reason in decision.reasons],
        "",
        "## Metrics (same rows for both models)",
        "",
        "| data | rows | champion acc | challenger acc | Δ acc | champion macro-F1 "
        "| challenger macro-F1 | champion ECE | challenger ECE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (old, new) in reports.items():
        lines.append(
            f"| {name} | {old.n} | {_fmt(old.accuracy)} | {_fmt(new.accuracy)} | "
            f"{new.accuracy - old.accuracy:+.2%} | {_fmt(old.macro_f1, False)} | "
            f"{_fmt(new.macro_f1, False)} | {_fmt(old.ece, False)} | {_fmt(new.ece, False)} |"
        )
    rules = decision.rules
    lines += [
        "",
        f"## Per-intent recall (gated: >= {rules.min_support} examples; "
        f"allowed drop {rules.max_intent_drop:.1%})",
        "",
        "| intent | examples | champion | challenger | Δ | gated | blocks |",
        "|---|---:|---:|---:|---:|:-:|:-:|",
    ]
    for d in decision.per_intent:
        lines.append(
            f"| {d.intent} | {d.support} | {d.champion_recall:.1%} | {d.challenger_recall:.1%} "
            f"| {d.delta:+.1%} | {'yes' if d.gated else 'no'} | {'**yes**' if d.blocking else ''} |"
        )
    counts = training.get("counts", {})
    lines += [
        "",
        "## Training data",
        "",
        f"- file: `{training.get('training_data', '?')}`",
        f"- sha256: `{training.get('training_data_sha256', '?')}`",
        f"- rows: {training.get('n_train', '?')} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'no counts'})",
        f"- corrected production prompts used: {len(training.get('corrected_ids', []))}; "
        f"held out for evaluation: {training.get('n_holdout', 0)}",
        "",
        "## Hyperparameters",
        "",
        *[f"- {key}: {value}" for key, value in sorted(hyperparameters.items())],
    ]
    if files:
        lines += ["", "## Files", "", *[f"- `{f}`" for f in files]]
    return "\n".join(lines) + "\n"


decide_task = task(cache_policy=NO_CACHE, name="gate-decision")(decide)
