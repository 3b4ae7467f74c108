"""Progress and agreement of a review round.

- :func:`round_progress`: done / left / waiting for an admin, and decisions per reviewer.
- :func:`round_agreement`: over the double-reviewed items, Cohen's kappa per reviewer pair and
  raw agreement per intent. Kappa is computed here from the counts (no scikit-learn on the
  online side): ``κ = (p_o − p_e) / (1 − p_e)`` with ``p_o`` the share of items both reviewers
  labelled alike and ``p_e = Σ_k (n_a(k) / n) · (n_b(k) / n)`` the agreement expected from each
  reviewer's label frequencies; undefined (None) when ``p_e = 1`` (both used one same label
  throughout). Raw agreement of an intent: of the double-reviewed items where at least one
  reviewer chose it, the share where both did.
- :func:`disagreements`: the disputed items an admin settles.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, case, func, select

from capture.models import PROMPT_LOGS
from tasks.anonymise import scrub_pii
from tasks.review_decide import live
from tasks.review_tables import LABEL_ACTIONS, decisions, items

logger = logging.getLogger(__name__)

_LOGS = PROMPT_LOGS


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' labels of the same items (``a[i]``, ``b[i]``: item i).

    ``(n·agree − S) / (n² − S)`` with ``S = Σ_k n_a(k)·n_b(k)`` — the usual
    ``(p_o − p_e) / (1 − p_e)`` multiplied through by ``n²``, so it is exact up to one division.
    None when there are no items or ``p_e = 1``. ``ValueError`` when the lengths differ.
    """
    if len(a) != len(b):
        raise ValueError(
            f"cohen_kappa: expected two equally long label lists, found {len(a)} and {len(b)}"
        )
    n = len(a)
    if n == 0:
        return None
    agree = sum(1 for x, y in zip(a, b, strict=True) if x == y)
    count_a, count_b = Counter(a), Counter(b)
    chance = sum(count_a[k] * count_b.get(k, 0) for k in count_a)
    if chance == n * n:
        return None
    return (n * agree - chance) / (n * n - chance)


@dataclass(frozen=True, slots=True)
class PairAgreement:
    """Two reviewers over the items both labelled: ``observed`` share alike, ``kappa``."""

    reviewer_a: str
    reviewer_b: str
    items: int
    agreed: int
    kappa: float | None

    @property
    def observed(self) -> float:
        return self.agreed / self.items if self.items else 0.0


@dataclass(frozen=True, slots=True)
class IntentAgreement:
    """Of the ``items`` where at least one reviewer chose ``intent``, ``agreed`` had both."""

    intent: str
    items: int
    agreed: int

    @property
    def rate(self) -> float:
        return self.agreed / self.items if self.items else 0.0


@dataclass(frozen=True, slots=True)
class Agreement:
    """Agreement over the double-reviewed items of a round (``items``: with both reviews)."""

    items: int
    pairs: list[PairAgreement] = field(default_factory=list)
    intents: list[IntentAgreement] = field(default_factory=list)


def agreement_from_pairs(labelled: Sequence[tuple[str, str, str, str]]) -> Agreement:
    """Agreement from ``(reviewer_a, label_a, reviewer_b, label_b)`` per double-reviewed item.

    Pairs are keyed by the two names in sorted order; pairs by kappa-relevant size, then name;
    intents by name.
    """
    by_pair: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    seen: Counter[str] = Counter()
    both: Counter[str] = Counter()
    for row in labelled:
        ra, la, rb, lb = row if row[0] <= row[2] else (row[2], row[3], row[0], row[1])
        first, second = by_pair.setdefault((ra, rb), ([], []))
        first.append(la)
        second.append(lb)
        for intent in {la, lb}:
            seen[intent] += 1
        if la == lb:
            both[la] += 1
    pairs = [
        PairAgreement(
            reviewer_a=ra,
            reviewer_b=rb,
            items=len(la_list),
            agreed=sum(1 for x, y in zip(la_list, lb_list, strict=True) if x == y),
            kappa=cohen_kappa(la_list, lb_list),
        )
        for (ra, rb), (la_list, lb_list) in sorted(by_pair.items())
    ]
    intents = [IntentAgreement(k, seen[k], both[k]) for k in sorted(seen)]
    return Agreement(items=len(labelled), pairs=pairs, intents=intents)


def double_review_pairs(conn: Connection, round_id: uuid.UUID) -> list[tuple[str, str, str, str]]:
    """``(reviewer_a, label_a, reviewer_b, label_b)`` for each double-reviewed item of the round
    with two current (not undone) decisions by different reviewers, in item order."""
    stmt = (
        select(decisions.c.item_id, decisions.c.reviewer, decisions.c.after_intent)
        .select_from(decisions.join(items, items.c.id == decisions.c.item_id))
        .where(
            items.c.round_id == round_id,
            items.c.double_review.is_(True),
            decisions.c.action.in_(LABEL_ACTIONS),
            decisions.c.batch_id.is_(None),
            live(),
        )
        .order_by(decisions.c.item_id, decisions.c.id)
    )
    per_item: dict[uuid.UUID, list[tuple[str, str]]] = {}
    for row in conn.execute(stmt):
        labels = per_item.setdefault(row.item_id, [])
        if len(labels) < 2 and all(name != row.reviewer for name, _ in labels):
            labels.append((row.reviewer, str(row.after_intent)))
    return [(a[0], a[1], b[0], b[1]) for a, b in (v for v in per_item.values() if len(v) == 2)]


def round_agreement(conn: Connection, round_id: uuid.UUID) -> Agreement:
    """Kappa per reviewer pair and raw agreement per intent over the round's double reviews."""
    return agreement_from_pairs(double_review_pairs(conn, round_id))


@dataclass(frozen=True, slots=True)
class ReviewerProgress:
    """One reviewer's current (not undone) decisions in a round, by kind."""

    reviewer: str
    decisions: int
    confirms: int
    corrections: int
    out_of_scope: int
    proposals: int
    skips: int


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a round stands. ``left``: items still to review (``pending``; ``leased`` of them
    are on a reviewer's screen now); ``disputed`` and ``proposals`` wait for an admin;
    ``done`` items (and ``members_done`` near-duplicates) have their correction written."""

    total: int
    done: int
    left: int
    leased: int
    disputed: int
    proposals: int
    members: int
    members_done: int
    reviewers: list[ReviewerProgress] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def round_progress(conn: Connection, round_id: uuid.UUID, *, now: datetime) -> Progress:
    """Counts of the round's items by state, and per reviewer (two aggregate queries)."""
    leased = case((items.c.lease_expires_at >= now, 1), else_=0)
    decided = case((items.c.final_intent.is_not(None), 1), else_=0)
    counts: dict[str, tuple[int, int, int]] = {}
    for state, n, n_leased, n_decided in conn.execute(
        select(items.c.state, func.count(), func.sum(leased), func.sum(decided))
        .where(items.c.round_id == round_id)
        .group_by(items.c.state)
    ):
        counts[state] = (int(n), int(n_leased or 0), int(n_decided or 0))
    per: dict[str, Counter[str]] = {}
    for reviewer, action, n in conn.execute(
        select(decisions.c.reviewer, decisions.c.action, func.count())
        .where(
            decisions.c.round_id == round_id,
            decisions.c.batch_id.is_(None),
            decisions.c.action.in_((*LABEL_ACTIONS, "skip")),
            live(),
        )
        .group_by(decisions.c.reviewer, decisions.c.action)
    ):
        per.setdefault(reviewer, Counter())[action] += int(n)
    reviewers = [
        ReviewerProgress(
            reviewer=name,
            decisions=sum(c[a] for a in LABEL_ACTIONS),
            confirms=c["confirm"],
            corrections=c["correct"],
            out_of_scope=c["out_of_scope"],
            proposals=c["propose"],
            skips=c["skip"],
        )
        for name, c in sorted(per.items())
    ]
    member = counts.get("member", (0, 0, 0))
    return Progress(
        total=sum(v[0] for k, v in counts.items() if k != "member"),
        done=counts.get("done", (0, 0, 0))[0],
        left=counts.get("pending", (0, 0, 0))[0],
        leased=counts.get("pending", (0, 0, 0))[1],
        disputed=counts.get("disputed", (0, 0, 0))[0],
        proposals=counts.get("proposal", (0, 0, 0))[0],
        members=member[0],
        members_done=member[2],
        reviewers=reviewers,
    )


@dataclass(frozen=True, slots=True)
class Disagreement:
    """A disputed item: the prompt and each reviewer's ``(reviewer, intent, notes)``."""

    item_id: uuid.UUID
    log_id: uuid.UUID
    text: str
    predicted_intent: str
    decisions: list[tuple[str, str, str | None]]


def disagreements(
    conn: Connection, round_id: uuid.UUID, *, raw: bool = False, limit: int = 200
) -> list[Disagreement]:
    """The round's disputed items (first ``limit`` by position) with both reviews; prompt text
    PII-scrubbed unless ``raw``."""
    rows = list(
        conn.execute(
            select(items.c.id, items.c.log_id, _LOGS.c.prompt, _LOGS.c.predicted_intent)
            .select_from(items.join(_LOGS, _LOGS.c.id == items.c.log_id))
            .where(items.c.round_id == round_id, items.c.state == "disputed")
            .order_by(items.c.position, items.c.id)
            .limit(limit)
        )
    )
    by_item: dict[uuid.UUID, list[tuple[str, str, str | None]]] = {r.id: [] for r in rows}
    if rows:
        for d in conn.execute(
            select(
                decisions.c.item_id,
                decisions.c.reviewer,
                decisions.c.after_intent,
                decisions.c.notes,
            )
            .where(
                decisions.c.item_id.in_(list(by_item)),
                decisions.c.action.in_(LABEL_ACTIONS),
                decisions.c.batch_id.is_(None),
                live(),
            )
            .order_by(decisions.c.id)
        ):
            by_item[d.item_id].append((d.reviewer, str(d.after_intent), d.notes))
    return [
        Disagreement(
            item_id=r.id,
            log_id=r.log_id,
            text=r.prompt if raw else scrub_pii(r.prompt),
            predicted_intent=r.predicted_intent,
            decisions=by_item[r.id],
        )
        for r in rows
    ]
