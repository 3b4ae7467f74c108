"""What an A/B test of a candidate decides: an always-valid sequential test (mSPRT).

Canary (docs/AB_TESTING.md). The parameter is the difference of workflow success rates
``theta = p_candidate - p_champion``. With the normal approximation of the two-proportion
difference, ``theta_hat ~ N(theta, V)`` where ``V = p_a(1-p_a)/n_a + p_b(1-p_b)/n_b``, the mixture
sequential probability ratio test of Johari, Koomen, Pekelis and Walsh, "Peeking at A/B tests:
why it matters, and what to do about it" (KDD 2017; also "Always valid inference", Operations
Research 2022) with a normal mixing distribution ``N(theta0, tau^2)`` has the likelihood ratio

    Lambda(theta0) = sqrt(V / (V + tau^2)) * exp(tau^2 (theta_hat - theta0)^2 / (2 V (V + tau^2)))

and ``P(exists n: Lambda_n(theta0) >= 1/alpha) <= alpha`` under ``theta = theta0``: the test may
be read after every batch of prompts, as often as wanted, without inflating the error rate. The
set of ``theta0`` not rejected is an always-valid confidence sequence

    theta_hat +- sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)))

and the decision reads it:

- ``promote`` when its lower end is above ``-margin`` (non-inferior: not worse by more than the
  margin, default 1 point of success rate);
- ``rollback`` when its upper end is below 0 (significantly worse);
- ``keep-testing`` otherwise, until ``max_days``, after which ``expired`` (the champion stays).

The guardrail is the same test on the failure rate of the prompts with an outcome, read at
``guardrail_alpha`` with ``margin`` 0: significantly more failures stops the canary at once.

Shadow mode has no outcomes of its own, so it decides only whether the candidate may go on to a
canary (:func:`shadow_decision`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

logger = logging.getLogger(__name__)

PROMOTE = "promote"
ROLLBACK = "rollback"
KEEP = "keep-testing"
EXPIRED = "expired"
GO_CANARY = "go-canary"
REJECT = "reject"


@dataclass(frozen=True, slots=True)
class ABPlan:
    """The pre-registered parameters of a canary test.

    ``alpha``: error rate of each one-sided conclusion (always valid); ``margin``: the
    non-inferiority margin (absolute success rate, 0.01 = 1 point); ``tau``: the standard
    deviation of the normal mixing distribution (the size of differences the test is tuned to
    find fastest); ``min_outcomes``: per arm, before any decision; ``max_days``: the maximum
    duration; shadow: ``min_shadow``, ``min_agreement``.
    """

    alpha: float = 0.05
    margin: float = 0.01
    tau: float = 0.02
    min_outcomes: int = 200
    max_days: float = 28.0
    guardrail_alpha: float = 0.01
    min_shadow: int = 500
    min_agreement: float = 0.8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class SequentialResult:
    """One reading of the test: the difference, its always-valid interval, the decision."""

    decision: str
    difference: float
    lower: float
    upper: float
    variance: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: a non-finite number (no estimate yet) becomes None."""
        return {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in asdict(self).items()
        }


def msprt_halfwidth(variance: float, tau: float, alpha: float) -> float:
    """Half-width of the mSPRT confidence sequence for a normal mean with ``variance``."""
    if variance <= 0:
        return 0.0
    t2 = tau * tau
    return math.sqrt(
        variance
        * (variance + t2)
        / t2
        * (2 * math.log(1 / alpha) + math.log((variance + t2) / variance))
    )


def msprt_lambda(difference: float, theta0: float, variance: float, tau: float) -> float:
    """The mixture likelihood ratio ``Lambda(theta0)`` (reject ``theta = theta0`` at >= 1/alpha)."""
    t2 = tau * tau
    exponent = t2 * (difference - theta0) ** 2 / (2 * variance * (variance + t2))
    return math.sqrt(variance / (variance + t2)) * math.exp(min(exponent, 700.0))


def _variance(successes: int, n: int) -> float:
    # Rates of exactly 0 or 1 would give a zero variance: shrink by half a success (Agresti).
    p = (successes + 0.5) / (n + 1.0)
    return p * (1 - p) / n


def canary_decision(
    champion: tuple[int, int],
    candidate: tuple[int, int],
    *,
    plan: ABPlan | None = None,
    days: float = 0.0,
) -> SequentialResult:
    """Read the canary test on ``(successes, outcomes)`` per arm after ``days`` of testing.

    Returns ``promote``, ``rollback``, ``keep-testing`` or ``expired`` with the difference
    ``p_candidate - p_champion`` and its always-valid ``(1 - 2 alpha)`` interval.
    """
    plan = plan or ABPlan()
    (s_a, n_a), (s_b, n_b) = champion, candidate
    if min(n_a, n_b) < max(plan.min_outcomes, 1):
        expired = days >= plan.max_days
        return SequentialResult(
            EXPIRED if expired else KEEP,
            float("nan"),
            float("-inf"),
            float("inf"),
            float("nan"),
            f"fewer than {plan.min_outcomes} outcomes per arm (champion {n_a}, candidate {n_b})",
        )
    difference = s_b / n_b - s_a / n_a
    variance = _variance(s_a, n_a) + _variance(s_b, n_b)
    half = msprt_halfwidth(variance, plan.tau, plan.alpha)
    lower, upper = difference - half, difference + half
    if upper < 0:
        decision, reason = ROLLBACK, f"significantly worse: upper bound {upper:+.4f} < 0"
    elif lower > -plan.margin:
        decision, reason = (
            PROMOTE,
            f"non-inferior: lower bound {lower:+.4f} > -{plan.margin:.4f} (margin)",
        )
    elif days >= plan.max_days:
        decision, reason = EXPIRED, f"no decision after {days:.1f} days: the champion stays"
    else:
        decision, reason = KEEP, f"interval [{lower:+.4f}, {upper:+.4f}] straddles the bounds"
    return SequentialResult(decision, difference, lower, upper, variance, reason)


def guardrail_tripped(
    champion: tuple[int, int], candidate: tuple[int, int], plan: ABPlan | None = None
) -> bool:
    """True when the candidate's failure rate is significantly higher (always valid at
    ``guardrail_alpha``) on ``(successes, outcomes)`` per arm, after ``min_outcomes // 4``."""
    plan = plan or ABPlan()
    (s_a, n_a), (s_b, n_b) = champion, candidate
    if min(n_a, n_b) < max(plan.min_outcomes // 4, 1):
        return False
    difference = (n_b - s_b) / n_b - (n_a - s_a) / n_a
    variance = _variance(s_a, n_a) + _variance(s_b, n_b)
    return difference - msprt_halfwidth(variance, plan.tau, plan.guardrail_alpha) > 0


def shadow_decision(
    compared: int,
    agreement: float,
    candidate_right: int,
    champion_right: int,
    plan: ABPlan | None = None,
) -> tuple[str, str]:
    """Whether a shadow candidate may go on to a canary: ``(decision, reason)``.

    ``keep-testing`` under ``min_shadow`` compared prompts; ``go-canary`` when it agrees with
    the champion on at least ``min_agreement`` of prompts, or is right at least as often as the
    champion on the disagreements later corrected; else ``reject``.
    """
    plan = plan or ABPlan()
    if compared < plan.min_shadow:
        return KEEP, f"{compared} shadow predictions of {plan.min_shadow} needed"
    if agreement >= plan.min_agreement:
        return GO_CANARY, f"agrees with the champion on {agreement:.1%} of prompts"
    if candidate_right >= champion_right and candidate_right > 0:
        return GO_CANARY, (
            f"right on {candidate_right} corrected disagreements, champion on {champion_right}"
        )
    return REJECT, (
        f"agreement {agreement:.1%} < {plan.min_agreement:.0%} and right on {candidate_right} "
        f"corrected disagreements vs the champion's {champion_right}"
    )
