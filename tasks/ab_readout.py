"""The A/B readout of a candidate under test: what production says about champion and candidate.

:func:`ab_readout` reads ``nlu_prompt_logs`` (the answering model is ``model_version``) and
``nlu_shadow_predictions`` (migration 0008) since the candidate was set (``history.jsonl``) and
returns an :class:`ABReadout`:

- per arm (champion, candidate): prompts, users, prompts with a workflow outcome, the workflow
  success rate with its 95% Wilson interval (``scipy.stats.norm`` for the quantile), the
  correction rate;
- in shadow mode: how many prompts got a shadow prediction, the agreement rate with the champion,
  and on the disagreements later corrected, which model was right (corrected to the candidate's
  intent / to the champion's / to neither), plus the disagreements whose workflow failed
  without a correction (evidence the champion was wrong, but not that the candidate was right);
- per intent (the answered intent) with at least ``min_support`` outcomes in each arm;
- the decision of :mod:`tasks.ab_decision` for the mode.

:func:`ab_tests` reads every test from ``history.jsonl`` (from a ``candidate-set`` to the next
candidate action: promote, rollback, expired, reject, clear, or another ``candidate-set``), and
:func:`readout_of` reads one of them over its own window: the HTML report shows the tests that
overlap its window with the same numbers (:mod:`tasks.report_figures`).

Everything is aggregated in the database (GROUP BY), so the readout costs one scan of the
window whatever the traffic.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from capture import db
from capture.models import PromptLog
from capture.pointers import CandidatePointer, read_candidate
from capture.shadow import shadow_predictions
from tasks.ab_decision import (
    ABPlan,
    canary_decision,
    guardrail_tripped,
    shadow_decision,
)
from tasks.registry import current_version, history

logger = logging.getLogger(__name__)

CONFIDENCE = 0.95
MIN_SUPPORT = 30


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion (``(nan, nan)`` for ``n == 0``)."""
    if n <= 0:
        return (math.nan, math.nan)
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True, slots=True)
class ArmStats:
    """One arm's production evidence; rates are None without a denominator."""

    arm: str
    version: str | None
    prompts: int
    users: int
    outcomes: int
    successes: int
    corrections: int

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.outcomes if self.outcomes else None

    @property
    def success_ci(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.outcomes)

    @property
    def correction_rate(self) -> float | None:
        return self.corrections / self.prompts if self.prompts else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        low, high = self.success_ci
        out.update(
            success_rate=self.success_rate,
            success_ci=[None if math.isnan(low) else low, None if math.isnan(high) else high],
            correction_rate=self.correction_rate,
        )
        return out


@dataclass(frozen=True, slots=True)
class ShadowEvidence:
    """Shadow predictions joined with their logged prompts."""

    compared: int = 0
    agreements: int = 0
    disagreements_corrected: int = 0
    candidate_right: int = 0
    champion_right: int = 0
    neither_right: int = 0
    disagreements_failed_uncorrected: int = 0

    @property
    def agreement_rate(self) -> float | None:
        return self.agreements / self.compared if self.compared else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "agreement_rate": self.agreement_rate}


@dataclass(frozen=True, slots=True)
class ABReadout:
    """The readout of one candidate; ``decision``/``reason`` from :mod:`tasks.ab_decision`."""

    candidate: str | None
    champion: str | None
    mode: str | None
    share: float | None
    since: str | None
    days: float
    champion_arm: ArmStats | None
    candidate_arm: ArmStats | None
    shadow: ShadowEvidence
    per_intent: list[dict[str, Any]] = field(default_factory=list)
    decision: str = "none"
    reason: str = "no candidate under test"
    guardrail: bool = False
    test: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    until: str | None = None  # None: still under test (the readout runs to now)
    ended: bool = False  # True: ``decision`` is how the test ended (history), not a reading

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "champion": self.champion,
            "mode": self.mode,
            "share": self.share,
            "since": self.since,
            "until": self.until,
            "ended": self.ended,
            "days": round(self.days, 3),
            "arms": [a.to_dict() for a in (self.champion_arm, self.candidate_arm) if a],
            "shadow": self.shadow.to_dict(),
            "per_intent": self.per_intent,
            "decision": self.decision,
            "reason": self.reason,
            "guardrail": self.guardrail,
            "test": self.test,
            "plan": self.plan,
        }

    def to_markdown(self) -> str:
        """A markdown summary with the arms table (the Prefect artifact and the CLI)."""
        if self.candidate is None:
            return "## A/B readout\n\nNo candidate under test."
        lines = [
            f"## A/B readout: candidate {self.candidate} vs champion {self.champion}",
            "",
            f"Mode **{self.mode}**"
            + (f", share {self.share:.1%}" if self.mode == "canary" else "")
            + f", since {self.since}"
            + (f" until {self.until}" if self.until else "")
            + f" ({self.days:.1f} days).",
            "",
            f"**{'Ended' if self.ended else 'Decision'}: {self.decision}**: {self.reason}",
            "",
            "| arm | version | prompts | users | outcomes | success rate (95% CI) | "
            "correction rate |",
            "|---|---|---:|---:|---:|---|---:|",
        ]
        for arm in (self.champion_arm, self.candidate_arm):
            if arm is None:
                continue
            rate = arm.success_rate
            low, high = arm.success_ci
            shown = "n/a" if rate is None else f"{rate:.2%} [{low:.2%}, {high:.2%}]"
            corr = "n/a" if arm.correction_rate is None else f"{arm.correction_rate:.2%}"
            lines.append(
                f"| {arm.arm} | {arm.version} | {arm.prompts} | {arm.users} | {arm.outcomes} | "
                f"{shown} | {corr} |"
            )
        s = self.shadow
        if s.compared:
            lines += [
                "",
                f"Shadow: {s.compared} prompts compared, agreement "
                f"{(s.agreement_rate or 0):.2%}; on {s.disagreements_corrected} corrected "
                f"disagreements the candidate was right {s.candidate_right}, the champion "
                f"{s.champion_right}, neither {s.neither_right}; "
                f"{s.disagreements_failed_uncorrected} disagreements failed uncorrected.",
            ]
        if self.per_intent:
            lines += ["", "| intent | arm | outcomes | success rate |", "|---|---|---:|---:|"]
            for row in self.per_intent:
                lines.append(
                    f"| {row['intent']} | {row['arm']} | {row['outcomes']} | "
                    f"{row['success_rate']:.2%} |"
                )
        return "\n".join(lines)


#: History actions that end a test; the decision shown for an ended test is the action's name.
END_ACTIONS = {
    "candidate-promote": "promote",
    "candidate-rollback": "rollback",
    "candidate-expired": "expired",
    "candidate-reject": "reject",
    "candidate-clear": "cleared",
}


@dataclass(frozen=True, slots=True)
class ABTest:
    """One candidate's time under test, read from ``history.jsonl``: from its ``candidate-set``
    (``since``) to the action that ended it (``until``, ``ended_by``; None: still under test)."""

    candidate: str
    champion: str | None
    mode: str
    share: float
    since: datetime | None
    until: datetime | None = None
    ended_by: str | None = None
    end_reason: str | None = None

    def overlaps(self, start: datetime, end: datetime) -> bool:
        """True when the test ran at some moment of ``[start, end]``."""
        began = self.since is None or self.since <= end
        return began and (self.until is None or self.until >= start)


def _history_time(row: dict[str, Any]) -> datetime | None:
    try:
        at = datetime.fromisoformat(str(row["at"]))
    except (KeyError, ValueError):
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def ab_tests(models_dir: Path) -> list[ABTest]:
    """Every test in the registry's history, oldest first (the last one may still run).

    A ``candidate-set`` starts a test and ends the one before it (a shadow candidate moving on to
    a canary starts a new test: a canary's evidence counts from then; a ``candidate-share``, the
    canary's new share, keeps it); ``candidate-promote``,
    ``-rollback``, ``-expired``, ``-reject`` and ``-clear`` end it."""
    tests: list[ABTest] = []
    open_: ABTest | None = None
    for row in history(models_dir):
        action = str(row.get("action", ""))
        at = _history_time(row)
        if action == "candidate-set":
            if open_ is not None:
                moved = "go-canary" if row.get("version") == open_.candidate else "replaced"
                tests.append(_ended(open_, at, moved, row.get("reason")))
            open_ = ABTest(
                candidate=str(row.get("version")),
                champion=None if row.get("champion") is None else str(row.get("champion")),
                mode=str(row.get("mode", "shadow")),
                share=float(row.get("share") or 0.0),
                since=at,
            )
        elif action == "candidate-share" and open_ is not None:
            # a canary's new share keeps its test and start (tasks.ab_candidate.set_candidate)
            open_ = dataclasses.replace(open_, share=float(row.get("share") or 0.0))
        elif action in END_ACTIONS and open_ is not None:
            tests.append(_ended(open_, at, END_ACTIONS[action], row.get("reason")))
            open_ = None
    if open_ is not None:
        tests.append(open_)
    return tests


def _ended(test: ABTest, at: datetime | None, how: str, reason: Any) -> ABTest:
    return ABTest(
        test.candidate,
        test.champion,
        test.mode,
        test.share,
        test.since,
        until=at,
        ended_by=how,
        end_reason=None if reason is None else str(reason),
    )


def _since(models_dir: Path, pointer: CandidatePointer) -> datetime | None:
    """When the candidate was set (the last ``candidate-set`` of its version)."""
    for row in reversed(history(models_dir)):
        if row.get("action") == "candidate-set" and row.get("version") == pointer.version:
            return _history_time(row)
    return None


def _window(
    column: sa.ColumnElement[Any], since: datetime | None, until: datetime | None
) -> list[sa.ColumnElement[bool]]:
    out = []
    if since is not None:
        out.append(column >= since)
    if until is not None:
        out.append(column < until)
    return out


def _arm_rows(
    url: str, versions: list[str], since: datetime | None, until: datetime | None
) -> list[sa.Row[Any]]:
    log = PromptLog.__table__
    success = sa.case((log.c.was_successful.is_(True), 1), else_=0)
    outcome = sa.case((log.c.was_successful.is_not(None), 1), else_=0)
    corrected = sa.case((log.c.corrected_intent.is_not(None), 1), else_=0)
    stmt = (
        sa.select(
            log.c.model_version,
            log.c.predicted_intent,
            sa.func.count().label("prompts"),
            sa.func.sum(outcome).label("outcomes"),
            sa.func.sum(success).label("successes"),
            sa.func.sum(corrected).label("corrections"),
        )
        .where(log.c.model_version.in_(versions), *_window(log.c.created_at, since, until))
        .group_by(log.c.model_version, log.c.predicted_intent)
    )
    with db.get_sync_engine(url).connect() as conn:
        return list(conn.execute(stmt))


def _users(
    url: str, versions: list[str], since: datetime | None, until: datetime | None
) -> dict[str, int]:
    """Distinct users per answering version (one scan for both arms)."""
    log = PromptLog.__table__
    stmt = (
        sa.select(log.c.model_version, sa.func.count(sa.distinct(log.c.user_id)))
        .where(log.c.model_version.in_(versions), *_window(log.c.created_at, since, until))
        .group_by(log.c.model_version)
    )
    with db.get_sync_engine(url).connect() as conn:
        return {str(version): int(n or 0) for version, n in conn.execute(stmt)}


def _shadow(
    url: str, candidate: str, since: datetime | None, until: datetime | None
) -> ShadowEvidence:
    log, shadow = PromptLog.__table__, shadow_predictions
    stmt = (
        sa.select(
            log.c.predicted_intent,
            shadow.c.predicted_intent.label("shadow_intent"),
            log.c.corrected_intent,
            log.c.was_successful,
            sa.func.count().label("n"),
        )
        .select_from(shadow.join(log, log.c.id == shadow.c.log_id))
        .where(
            shadow.c.candidate_version == candidate,
            *_window(shadow.c.log_created_at, since, until),
        )
        .group_by(
            log.c.predicted_intent,
            shadow.c.predicted_intent,
            log.c.corrected_intent,
            log.c.was_successful,
        )
    )
    counts = dict.fromkeys(ShadowEvidence.__dataclass_fields__, 0)
    with db.get_sync_engine(url).connect() as conn:
        for champion, cand, corrected, ok, n in conn.execute(stmt):
            counts["compared"] += n
            if champion == cand:
                counts["agreements"] += n
            elif corrected is not None:
                counts["disagreements_corrected"] += n
                key = (
                    "candidate_right"
                    if corrected == cand
                    else "champion_right"
                    if corrected == champion
                    else "neither_right"
                )
                counts[key] += n
            elif ok is False:
                counts["disagreements_failed_uncorrected"] += n
    return ShadowEvidence(**counts)


def select_shadow_disagreements(
    *, since: datetime | None, until: datetime | None
) -> sa.Select[Any]:
    """Uncorrected prompts created in ``(since, until]`` that a shadow candidate predicted as
    another intent than the answered one, oldest first: the review candidates' columns
    (``tasks.review_select.ReviewCandidate.from_row``) plus ``shadow_intent``. A prompt
    shadowed by several candidates comes once per disagreeing candidate."""
    log, shadow = PromptLog.__table__, shadow_predictions
    stmt = (
        sa.select(
            log.c.id,
            log.c.prompt,
            log.c.predicted_intent,
            log.c.confidence,
            log.c.secondary_intents,
            log.c.was_successful,
            log.c.created_at,
            shadow.c.predicted_intent.label("shadow_intent"),
        )
        .select_from(shadow.join(log, log.c.id == shadow.c.log_id))
        .where(
            log.c.corrected_intent.is_(None),
            shadow.c.predicted_intent != log.c.predicted_intent,
        )
        .order_by(log.c.created_at, log.c.id)
    )
    for column in (log.c.created_at, shadow.c.log_created_at):  # the shadow side prunes early
        if since is not None:
            stmt = stmt.where(column > since)
        if until is not None:
            stmt = stmt.where(column <= until)
    return stmt


def ab_readout(
    url: str | None,
    models_dir: Path,
    *,
    plan: ABPlan | None = None,
    min_support: int = MIN_SUPPORT,
) -> ABReadout:
    """The readout of the candidate named by ``models_dir/candidate`` against the champion
    ``models_dir/current``, from the database ``url`` (default: the settings'), with the
    decision for its mode. No candidate: a readout with ``decision`` ``none``."""
    pointer = read_candidate(models_dir)
    champion = current_version(models_dir)
    if pointer is None:
        return ABReadout(None, champion, None, None, None, 0.0, None, None, ShadowEvidence())
    test = ABTest(
        pointer.version, champion, pointer.mode, pointer.share, _since(models_dir, pointer)
    )
    return readout_of(url, test, plan=plan, min_support=min_support)


def readout_of(
    url: str | None,
    test: ABTest,
    *,
    plan: ABPlan | None = None,
    min_support: int = MIN_SUPPORT,
    now: datetime | None = None,
) -> ABReadout:
    """The readout of one test over its window (``test.since`` to ``test.until``, or to now).

    A test still running gets the decision the ab-check would take now; an ended one shows how
    it ended (``test.ended_by``: promote, rollback, expired, reject, cleared, go-canary,
    replaced) with the reason recorded in the history."""
    plan = plan or ABPlan()
    url = db.database_url(url)
    since, until, champion = test.since, test.until, test.champion
    now = now or datetime.now(UTC)
    days = ((until or now) - since).total_seconds() / 86400 if since else 0.0
    versions = [v for v in (champion, test.candidate) if v is not None]
    rows = _arm_rows(url, versions, since, until)
    arms: dict[str, dict[str, int]] = {
        v: {"prompts": 0, "outcomes": 0, "successes": 0, "corrections": 0} for v in versions
    }
    per_intent: list[dict[str, Any]] = []
    by_intent: dict[str, dict[str, tuple[int, int]]] = {}
    for row in rows:
        totals = arms[row.model_version]
        for key in totals:
            totals[key] += int(getattr(row, key) or 0)
        by_intent.setdefault(row.predicted_intent, {})[row.model_version] = (
            int(row.successes or 0),
            int(row.outcomes or 0),
        )
    users = _users(url, versions, since, until)

    def arm(name: str, version: str | None) -> ArmStats | None:
        if version is None:
            return None
        return ArmStats(name, version, users=users.get(version, 0), **arms[version])

    champion_arm, candidate_arm = arm("champion", champion), arm("candidate", test.candidate)
    for intent, per_version in sorted(by_intent.items()):
        if all(per_version.get(v, (0, 0))[1] >= min_support for v in versions):
            for name, version in (("champion", champion), ("candidate", test.candidate)):
                if version is None:  # a test recorded without its champion
                    continue
                s, n = per_version[version]
                per_intent.append(
                    {"intent": intent, "arm": name, "outcomes": n, "success_rate": s / n}
                )
    shadow = _shadow(url, test.candidate, since, until)
    guardrail = False
    result: dict[str, Any] = {}
    if test.mode == "canary" and champion_arm and candidate_arm:
        a = (champion_arm.successes, champion_arm.outcomes)
        b = (candidate_arm.successes, candidate_arm.outcomes)
        reading = canary_decision(a, b, plan=plan, days=days)
        decision, reason, result = reading.decision, reading.reason, reading.to_dict()
        guardrail = guardrail_tripped(a, b, plan)
        if guardrail and decision != "rollback":
            decision, reason = "rollback", "guardrail: failure rate significantly higher"
    else:
        decision, reason = shadow_decision(
            shadow.compared,
            shadow.agreement_rate or 0.0,
            shadow.candidate_right,
            shadow.champion_right,
            plan,
        )
    if test.ended_by is not None:  # what happened, not what the evidence would say today
        decision, reason = test.ended_by, test.end_reason or "no reason recorded"
    return ABReadout(
        candidate=test.candidate,
        champion=champion,
        mode=test.mode,
        share=test.share,
        since=since.isoformat() if since else None,
        days=days,
        champion_arm=champion_arm,
        candidate_arm=candidate_arm,
        shadow=shadow,
        per_intent=per_intent,
        decision=decision,
        reason=reason,
        guardrail=guardrail,
        test=result,
        plan=plan.to_dict(),
        until=until.isoformat() if until else None,
        ended=test.ended_by is not None,
    )
