"""Review selection: exact selections on small handmade candidate lists."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from tasks.review_select import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    ReviewCandidate,
    normalise_prompt,
    parse_secondary_intents,
    select_for_review,
    spherical_kmeans,
)


def cand(
    cid: str,
    conf: float,
    second: float | None = None,
    *,
    prompt: str | None = None,
    ok: bool | None = None,
) -> ReviewCandidate:
    secondary = (("other", second),) if second is not None else ()
    return ReviewCandidate(
        id=cid,
        prompt=prompt if prompt is not None else f"prompt {cid}",
        predicted_intent="top",
        confidence=conf,
        secondary_intents=secondary,
        was_successful=ok,
    )


def ids(selected: Sequence[ReviewCandidate]) -> list[str]:
    return [str(c.id) for c in selected]


# Confidence order: b(.3) a(.5) d(.6) c(.9); margin order: a(.05) d(.1) b(.2) c(.85).
MIXED = [cand("a", 0.5, 0.45), cand("b", 0.3, 0.1), cand("c", 0.9, 0.05), cand("d", 0.6, 0.5)]


def test_margin_is_top1_minus_top2() -> None:
    assert cand("x", 0.6, 0.25).margin == pytest.approx(0.35)
    assert cand("x", 0.6).margin == pytest.approx(0.6)
    ranked = ReviewCandidate(
        id="y",
        prompt="p",
        predicted_intent="top",
        confidence=0.5,
        # An entry repeating the predicted intent is not a runner-up.
        secondary_intents=(("top", 0.5), ("b", 0.3), ("c", 0.1)),
    )
    assert ranked.margin == pytest.approx(0.2)


def test_threshold_takes_lowest_confidence_first() -> None:
    assert ids(select_for_review(MIXED, strategy="threshold", limit=2)) == ["b", "a"]
    assert ids(select_for_review(MIXED, strategy="threshold", limit=10)) == ["b", "a", "d", "c"]


def test_margin_takes_smallest_gap_first() -> None:
    assert ids(select_for_review(MIXED, strategy="margin", limit=2)) == ["a", "d"]
    assert ids(select_for_review(MIXED, strategy="margin", limit=3)) == ["a", "d", "b"]


def test_failed_first_then_margin() -> None:
    items = [
        cand("ok-small", 0.5, 0.49, ok=True),
        cand("failed-wide", 0.95, 0.01, ok=False),
        cand("unknown-mid", 0.5, 0.3),
        cand("failed-narrow", 0.6, 0.5, ok=False),
    ]
    assert ids(select_for_review(items, strategy="failed-first", limit=3)) == [
        "failed-narrow",
        "failed-wide",
        "ok-small",
    ]


def test_exact_duplicates_collapse_after_normalisation() -> None:
    items = [
        cand("first", 0.2, prompt="Set an alarm for 7!"),
        cand("dupe", 0.1, prompt="  set AN alarm   for 7 "),
        cand("other", 0.3, prompt="what's the weather"),
    ]
    # "dupe" has the lowest confidence so it is kept; "first" is its duplicate.
    assert ids(select_for_review(items, strategy="threshold", limit=2)) == ["dupe", "other"]
    assert normalise_prompt("Set an alarm for 7!") == "set an alarm for 7"


def test_cosine_near_duplicates_collapse_with_embeddings() -> None:
    items = [cand("a", 0.1), cand("a-near", 0.2), cand("b", 0.3), cand("c", 0.4)]
    vectors = np.array([[1.0, 0.0], [0.99, 0.05], [0.0, 1.0], [0.6, 0.8]])
    selected = select_for_review(items, strategy="threshold", limit=3, embeddings=vectors)
    assert ids(selected) == ["a", "b", "c"]
    # A stricter threshold keeps the near-duplicate.
    strict = select_for_review(
        items, strategy="threshold", limit=3, embeddings=vectors, dedupe_threshold=0.9999
    )
    assert ids(strict) == ["a", "a-near", "b"]


def test_cosine_dedupe_with_lazy_embed_function() -> None:
    table = {"p0": [1.0, 0.0], "p1": [1.0, 0.01], "p2": [0.0, 1.0], "p3": [-1.0, 0.0]}
    calls: list[list[str]] = []

    def embed(texts: Sequence[str]) -> np.ndarray:
        calls.append(list(texts))
        return np.array([table[t] for t in texts])

    items = [cand(f"c{i}", 0.1 * (i + 1), prompt=f"p{i}") for i in range(4)]
    selected = select_for_review(items, strategy="margin", limit=3, embed=embed)
    assert ids(selected) == ["c0", "c2", "c3"]
    assert sum(len(c) for c in calls) == 4  # each prompt embedded once


def test_random_is_seeded_and_does_not_reorder_by_score() -> None:
    items = [cand(f"r{i}", 0.01 * i) for i in range(50)]
    first = ids(select_for_review(items, strategy="random", limit=10, seed=1))
    again = ids(select_for_review(items, strategy="random", limit=10, seed=1))
    other = ids(select_for_review(items, strategy="random", limit=10, seed=2))
    assert first == again
    assert first != other
    assert len(set(first)) == 10
    assert first != [f"r{i}" for i in range(10)]
    expected = [f"r{i}" for i in np.random.default_rng(1).permutation(50)[:10]]
    assert first == expected


def test_diverse_spreads_the_budget_over_clusters() -> None:
    # Cluster X (the 4 most uncertain prompts), cluster Y, cluster Z.
    items = [
        cand("x1", 0.40, 0.39),
        cand("x2", 0.40, 0.38),
        cand("x3", 0.40, 0.37),
        cand("x4", 0.40, 0.36),
        cand("y1", 0.50, 0.30),
        cand("y2", 0.50, 0.20),
        cand("z1", 0.60, 0.20),
        cand("z2", 0.60, 0.10),
    ]
    vectors = np.array(
        [
            [1.0, 0.4, 0.0],
            [1.0, 0.0, 0.4],
            [1.0, -0.4, 0.0],
            [1.0, 0.0, -0.4],
            [0.3, 1.0, 0.0],
            [0.0, 1.0, 0.3],
            [0.0, 0.3, 1.0],
            [0.3, 0.0, 1.0],
        ]
    )
    assert ids(select_for_review(items, strategy="margin", limit=3, embeddings=vectors)) == [
        "x1",
        "x2",
        "x3",
    ]
    for seed in range(20):
        diverse = select_for_review(
            items, strategy="diverse", limit=3, embeddings=vectors, seed=seed
        )
        assert ids(diverse) == ["x1", "y1", "z1"]


def test_diverse_embeds_only_the_uncertain_pool() -> None:
    seen: list[str] = []

    def embed(texts: Sequence[str]) -> np.ndarray:
        seen.extend(texts)
        rng = np.random.default_rng(len(seen))
        return rng.normal(size=(len(texts), 8))

    items = [cand(f"c{i:03d}", 0.9 - 0.005 * i, 0.05) for i in range(100)]
    selected = select_for_review(items, strategy="diverse", limit=4, embed=embed, pool_factor=5)
    assert len(selected) == 4
    # The pool is the 20 smallest margins: c099 down to c080.
    assert sorted(seen) == sorted(f"prompt c{i:03d}" for i in range(80, 100))
    assert all(int(str(c.id)[1:]) >= 80 for c in selected)


def test_diverse_fills_the_budget_when_clusters_run_short() -> None:
    items = [cand("a", 0.3, 0.2), cand("b", 0.4, 0.2), cand("c", 0.5, 0.2)]
    vectors = np.eye(3)
    assert ids(select_for_review(items, strategy="diverse", limit=5, embeddings=vectors)) == [
        "a",
        "b",
        "c",
    ]


def test_spherical_kmeans_separates_obvious_groups() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:3]
    points = np.concatenate([c + 0.05 * rng.normal(size=(10, 4)) for c in centres])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    labels = spherical_kmeans(points, 3, seed=0)
    groups = [set(labels[i * 10 : (i + 1) * 10].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups)
    assert len(set.union(*groups)) == 3


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"random, threshold, margin, failed-first, diverse"):
        select_for_review(MIXED, strategy="smart", limit=2)
    with pytest.raises(ValueError, match=r"diverse.*embed"):
        select_for_review(MIXED, strategy="diverse", limit=2)
    with pytest.raises(ValueError, match=r"embeddings: expected shape \(4, dim\)"):
        select_for_review(MIXED, strategy="margin", limit=2, embeddings=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="limit"):
        select_for_review(MIXED, strategy="margin", limit=-1)
    assert select_for_review(MIXED, strategy="margin", limit=0) == []
    assert select_for_review([], strategy="threshold", limit=3) == []


def test_from_row_accepts_both_stored_formats() -> None:
    log_id = uuid.uuid4()
    row = {
        "id": log_id,
        "prompt": "book a flight",
        "predicted_intent": "book_flight",
        "confidence": 0.6,
        "secondary_intents": [{"intent": "book_hotel", "confidence": 0.3}, ["travel", 0.05]],
        "was_successful": False,
        "created_at": None,
    }
    candidate = ReviewCandidate.from_row(row)
    assert candidate.id == log_id
    assert candidate.secondary_intents == (("book_hotel", 0.3), ("travel", 0.05))
    assert candidate.margin == pytest.approx(0.3)
    assert candidate.was_successful is False
    with pytest.raises(ValueError, match=r"secondary_intents\[0\]"):
        parse_secondary_intents(["oops"], where="row 1")


def test_default_strategy_is_a_strategy() -> None:
    assert DEFAULT_STRATEGY in STRATEGIES
    assert set(STRATEGIES) == {"random", "threshold", "margin", "failed-first", "diverse"}


# Shadow disagreements (production A/B, docs/AB_TESTING.md).


def shadowed(cid: str, conf: float, shadow: str | None) -> ReviewCandidate:
    return ReviewCandidate(
        id=cid,
        prompt=f"prompt {cid}",
        predicted_intent="top",
        confidence=conf,
        shadow_intent=shadow,
    )


# Uncertain prompts u1 (.1) .. u6 (.6); confident ones the shadow candidate disagreed on (d85,
# d90, d95); one it agreed with (agree, .05: first by confidence, but no disagreement).
SHADOWED = [
    *(shadowed(f"u{i}", i / 10, None) for i in range(1, 7)),
    shadowed("d95", 0.95, "other"),
    shadowed("d85", 0.85, "other"),
    shadowed("d90", 0.9, "other"),
    shadowed("agree", 0.05, "top"),
]


def test_shadow_disagreements_come_first_within_their_share() -> None:
    # Budget 4, default share 0.5: two disagreements first (in threshold order), then the rest.
    assert ids(select_for_review(SHADOWED, strategy="threshold", limit=4)) == [
        "d85",
        "d90",
        "agree",
        "u1",
    ]
    # The whole budget may go to them; all three come first, then the strategy.
    all_in = select_for_review(SHADOWED, strategy="threshold", limit=5, shadow_share=1.0)
    assert ids(all_in) == ["d85", "d90", "d95", "agree", "u1"]
    # Off: the plain threshold order.
    off = select_for_review(SHADOWED, strategy="threshold", limit=4, shadow_share=0.0)
    assert ids(off) == ["agree", "u1", "u2", "u3"]
    # An odd budget rounds the share up; margin and failed-first keep the rule.
    assert ids(select_for_review(SHADOWED, strategy="margin", limit=3))[:2] == ["d85", "d90"]
    assert ids(select_for_review(SHADOWED, strategy="failed-first", limit=1)) == ["d85"]
    with pytest.raises(ValueError, match=r"shadow_share: expected a share of the budget"):
        select_for_review(SHADOWED, strategy="threshold", limit=2, shadow_share=1.5)


def test_random_and_diverse_take_disagreements_first_too() -> None:
    picked = ids(select_for_review(SHADOWED, strategy="random", limit=4, seed=3))
    assert set(picked[:2]) <= {"d85", "d90", "d95"} and len(set(picked)) == 4
    vectors = np.eye(10)[: len(SHADOWED)]
    diverse = ids(select_for_review(SHADOWED, strategy="diverse", limit=4, embeddings=vectors))
    assert diverse[:2] == ["d85", "d90"] and len(set(diverse)) == 4
    assert not {"d85", "d90"} & set(diverse[2:])


def _shadow_rows(url: str, rows: list[tuple[uuid.UUID, str]]) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import insert, select, text

    from capture import db
    from capture.models import PromptLog
    from capture.shadow import SHADOW_TABLE, shadow_predictions

    log = PromptLog.__table__
    with db.get_sync_engine(url).begin() as conn:
        conn.execute(text(f"DELETE FROM {SHADOW_TABLE}"))
        found = conn.execute(
            select(log.c.id, log.c.created_at).where(log.c.id.in_([i for i, _ in rows]))
        )
        created = {log_id: at for log_id, at in found}
        conn.execute(
            insert(shadow_predictions),
            [
                {
                    "log_id": log_id,
                    "log_created_at": created[log_id],
                    "candidate_version": "2",
                    "champion_version": "1",
                    "predicted_intent": intent,
                    "confidence": 0.7,
                    "predicted_at": datetime.now(UTC),
                }
                for log_id, intent in rows
            ],
        )


def test_review_export_favours_shadow_disagreements(db_url: str, tmp_path: Path) -> None:
    """On both databases: confident prompts the shadow candidate disagreed on are exported, and
    first; a corrected one, an agreeing one and one outside the window are not."""
    from tasks.review_export import ReviewSelection, export_review
    from tasks.review_file import read_review_file
    from tests.cycle_helpers import Log, insert_logs

    logs = [Log(f"unsure {i}", "music", 0.1 + i / 20) for i in range(6)]  # uncertain
    logs += [
        Log("confident a", "banking", 0.97),  # shadow: weather
        Log("confident b", "banking", 0.96),  # shadow: weather
        Log("confident c", "banking", 0.98),  # shadow: weather
        Log("confident agreed", "banking", 0.99),  # shadow: banking
        Log("confident corrected", "banking", 0.95, corrected="weather"),  # shadow: weather
        Log("confident but old", "banking", 0.95, age_days=20),  # shadow: weather
        Log("confident unshadowed", "banking", 0.95),
    ]
    ids_ = insert_logs(db_url, logs)
    by_prompt = dict(zip([log.prompt for log in logs], ids_, strict=True))
    _shadow_rows(
        db_url,
        [(by_prompt[f"confident {k}"], "weather") for k in ("a", "b", "c", "corrected", "but old")]
        + [(by_prompt["confident agreed"], "banking")],
    )
    export = export_review(tmp_path / "review.json", ReviewSelection(days=7, limit=4), url=db_url)
    assert export.n_candidates == 6 + 3  # the uncertain ones and three disagreements
    chosen = [c.prompt for c in export.selected]
    # Two of the four places go to disagreements first, the least confident first.
    assert chosen == ["confident b", "confident a", "unsure 0", "unsure 1"]
    assert export.reasons == {"shadow-disagreement": 2, "low-confidence": 2}
    assert [r.prompt for r in read_review_file(tmp_path / "review.json")] == chosen
    # Without a budget limit every disagreement is included.
    everything = export_review(
        tmp_path / "all.json", ReviewSelection(days=7, limit=100), url=db_url
    )
    assert {"confident a", "confident b", "confident c"} <= {c.prompt for c in everything.selected}


def test_a_budget_taken_by_disagreements_alone() -> None:
    vectors = np.eye(10)[: len(SHADOWED)]
    for strategy in ("threshold", "diverse"):
        picked = select_for_review(
            SHADOWED, strategy=strategy, limit=2, shadow_share=1.0, embeddings=vectors
        )
        assert ids(picked) == ["d85", "d90"]
