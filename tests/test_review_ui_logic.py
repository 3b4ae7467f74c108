"""The workbench's logic (tasks/review_*.py) on SQLite and PostgreSQL: rounds from the review
selection, leases under concurrency, the final-decision rule, undo, groups, double review,
proposals, agreement maths, the login limit."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, select, update
from sqlalchemy.pool import NullPool

from capture import db
from tasks.review_decide import decide, settle, undo_last
from tasks.review_export import ReviewSelection
from tasks.review_progress import (
    agreement_from_pairs,
    cohen_kappa,
    round_agreement,
    round_progress,
)
from tasks.review_proposals import accept_proposal, list_proposals, reject_proposal
from tasks.review_queue import Catalog, claim_next, load_catalog, load_item, skip
from tasks.review_rounds import open_round
from tasks.review_tables import LeaseLost, NotInCatalog, ReviewError, items
from tasks.review_users import LoginRateLimited, ReviewUser, login
from tests.test_review_ui_support import (
    LABELS,
    LOGS,
    NOW,
    PASSWORD,
    audit,
    corrections,
    make_user,
    make_users,
    seed_logs,
)

CATALOG = Catalog(frozenset(LABELS), "oos", "1")


def _open(url: str, *, limit: int = 200, seed: int = 0, **kw: Any) -> uuid.UUID:
    selection = ReviewSelection(limit=limit, seed=seed)
    with db.get_sync_engine(url).begin() as conn:
        return open_round(conn, now=NOW, selection=selection, **kw).id


def _claim(url: str, round_id: uuid.UUID, user: ReviewUser, now=NOW) -> uuid.UUID | None:
    with db.get_sync_engine(url).begin() as conn:
        return claim_next(conn, round_id, user, now=now)


def _decide(url: str, item_id: uuid.UUID, user: ReviewUser, action: str, **kw: Any):
    with db.get_sync_engine(url).begin() as conn:
        return decide(conn, item_id, user, action=action, catalog=CATALOG, now=NOW, **kw)


def _alice_holds_an_item(url: str, n_logs: int) -> tuple[uuid.UUID, ReviewUser, uuid.UUID]:
    """``seed_logs(url, n_logs)`` in a single-review round; alice claims its first item:
    (round, alice, item)."""
    seed_logs(url, n_logs)
    round_id = _open(url, limit=100, double_review_share=0.0)
    alice = make_user(url, "alice")
    item = _claim(url, round_id, alice)
    assert item is not None
    return round_id, alice, item


def _items(url: str, round_id: uuid.UUID) -> list:
    with db.get_sync_engine(url).connect() as conn:
        return list(
            conn.execute(
                select(items).where(items.c.round_id == round_id).order_by(items.c.position)
            )
        )


def test_open_round_fills_the_queue_from_the_review_selection(workbench_db: str) -> None:
    seeded = seed_logs(workbench_db, 12)
    round_id = _open(workbench_db, limit=100, double_review_share=0.25, seed=3)
    rows = _items(workbench_db, round_id)
    pending = [r for r in rows if r.state == "pending"]
    members = [r for r in rows if r.state == "member"]
    # 12 prompts + 1 kept of 3 duplicates + the uncertain conversation message; 2 collapsed.
    assert len(pending) == 14 and len(members) == 2
    assert {m.log_id for m in members} < set(seeded.duplicates)
    leader = next(r for r in pending if r.log_id in seeded.duplicates)
    assert leader.group_size == 3 and {m.group_id for m in members} == {leader.group_id}
    # Priority order: the threshold strategy puts the lowest confidence first.
    assert [r.position for r in pending] == sorted(r.position for r in pending)
    # Double review: a quarter of the selected prompts, never one with a group.
    doubles = [r for r in pending if r.double_review]
    assert len(doubles) == round(0.25 * 14)
    assert all(r.reviews_needed == 2 and r.group_size == 1 for r in doubles)
    # Conversation neighbours were found once, at opening.
    dentist = next(r for r in pending if r.log_id == seeded.conversation[1])
    assert (dentist.prev_log_id, dentist.next_log_id) == (
        seeded.conversation[0],
        seeded.conversation[2],
    )
    # A second round does not queue the same prompts again.
    again = _open(workbench_db, limit=100)
    assert _items(workbench_db, again) == []


def test_item_view_scrubs_pii_unless_raw_and_shows_context(workbench_db: str) -> None:
    seeded = seed_logs(workbench_db, 5)
    round_id = _open(workbench_db, limit=100)
    rows = {r.log_id: r for r in _items(workbench_db, round_id)}
    with db.get_sync_engine(workbench_db).connect() as conn:
        failed = load_item(conn, rows[seeded.ids[0]].id)
        raw = load_item(conn, rows[seeded.ids[0]].id, raw=True)
        dentist = load_item(conn, rows[seeded.conversation[1]].id)
    assert "<PHONE>" in failed.text and "7946" not in failed.text
    assert "7946" in raw.text
    assert failed.was_successful is False and failed.execution_error == "timeout for <EMAIL>"
    assert len(failed.alternatives) == 3
    assert failed.alternatives[0][1] >= failed.alternatives[1][1] >= failed.alternatives[2][1]
    assert failed.predicted_intent not in {a for a, _ in failed.alternatives}
    assert (dentist.previous, dentist.next) == ("hi there", "thanks")


def test_fifty_concurrent_claims_never_get_the_same_item(workbench_db: str) -> None:
    seed_logs(workbench_db, 40)
    round_id = _open(workbench_db, limit=100, double_review_share=0.0)
    users = make_users(workbench_db, [f"r{i:02d}" for i in range(50)])
    got: dict[str, uuid.UUID | None] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(50)

    # Fifty connections at once (no pool limit), each claiming in its own transaction.
    url = db.sync_url(workbench_db)
    engine = create_engine(
        url,
        poolclass=NullPool,
        connect_args={"timeout": 60} if db.is_sqlite(url) else {},
    )

    def claim(user: ReviewUser) -> None:
        try:
            with engine.connect() as conn:
                barrier.wait()
                got[user.name] = claim_next(conn, round_id, user, now=NOW)
                conn.commit()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    claimed = [x for x in got.values() if x is not None]
    n_items = len([r for r in _items(workbench_db, round_id) if r.state == "pending"])
    assert len(claimed) == min(50, n_items) == n_items  # 42 items, 50 reviewers
    assert len(set(claimed)) == len(claimed), "an item was leased twice"
    leased = {r.id: r.lease_owner for r in _items(workbench_db, round_id) if r.lease_owner}
    assert leased == {item: u.id for u in users if (item := got[u.name]) is not None}


def test_lease_expires_and_a_lost_lease_refuses_the_decision(workbench_db: str) -> None:
    seed_logs(workbench_db, 1)
    round_id = _open(workbench_db, limit=1, double_review_share=0.0)
    alice, bob = make_user(workbench_db, "alice"), make_user(workbench_db, "bob")
    first = _claim(workbench_db, round_id, alice)
    assert first is not None and _claim(workbench_db, round_id, bob) is None
    later = NOW + timedelta(minutes=11)  # the default lease is 10 minutes
    assert _claim(workbench_db, round_id, bob, now=later) == first
    with pytest.raises(LeaseLost):
        _decide(workbench_db, first, alice, "confirm")
    assert corrections(workbench_db) == {}


def test_final_decision_rule_nothing_pending_reaches_corrected_intent(workbench_db: str) -> None:
    seeded = seed_logs(workbench_db, 6)
    round_id = _open(workbench_db, limit=100, double_review_share=1.0)
    alice, bob, admin = (
        make_user(workbench_db, "alice"),
        make_user(workbench_db, "bob"),
        make_user(workbench_db, "root", "admin"),
    )
    # Double review: alice's decision alone is pending, nothing is written.
    item = _claim(workbench_db, round_id, alice)
    assert item is not None
    first = _decide(workbench_db, item, alice, "correct", intent="weather", notes="rain")
    assert (first.state, first.final) == ("pending", False)
    assert corrections(workbench_db) == {}
    # The blind second review never goes back to alice.
    with db.get_sync_engine(workbench_db).begin() as conn:
        mine = [claim_next(conn, round_id, alice, now=NOW) for _ in range(3)]
    assert item not in mine
    assert _claim(workbench_db, round_id, bob) == item
    second = _decide(workbench_db, item, bob, "correct", intent="banking")
    assert (second.state, second.final) == ("disputed", False)
    assert corrections(workbench_db) == {}
    with (
        pytest.raises(ReviewError, match="only an admin"),
        db.get_sync_engine(workbench_db).begin() as conn,
    ):
        settle(conn, item, bob, "banking", catalog=CATALOG, now=NOW)
    with db.get_sync_engine(workbench_db).begin() as conn:
        settled = settle(conn, item, admin, "weather", catalog=CATALOG, now=NOW)
    assert settled.final
    log_id = next(r.log_id for r in _items(workbench_db, round_id) if r.id == item)
    assert corrections(workbench_db) == {log_id: ("weather", "rain")}
    assert log_id in seeded.ids + seeded.conversation + seeded.duplicates


def test_single_review_is_final_and_undo_writes_a_new_audit_row(workbench_db: str) -> None:
    round_id, alice, item = _alice_holds_an_item(workbench_db, 3)
    result = _decide(workbench_db, item, alice, "out_of_scope", notes="  spam  ")
    assert result.final and result.intent == "oos"
    log_id = next(r.log_id for r in _items(workbench_db, round_id) if r.id == item)
    assert corrections(workbench_db) == {log_id: ("oos", "spam")}
    with db.get_sync_engine(workbench_db).begin() as conn:
        undone = undo_last(conn, round_id, alice, now=NOW)
    assert undone.item_id == item and undone.reverted_logs == 1
    assert corrections(workbench_db) == {}
    rows = audit(workbench_db)
    assert [r.action for r in rows] == ["out_of_scope", "undo"]
    assert rows[1].undoes == rows[0].id and rows[0].applied  # history kept, not deleted
    assert (rows[1].before_intent, rows[1].reviewer, rows[1].source) == ("oos", "alice", "ui")
    # The item is alice's again; deciding again works; a second undo has nothing left.
    again = _decide(workbench_db, item, alice, "confirm")
    assert again.final
    with db.get_sync_engine(workbench_db).begin() as conn:
        undo_last(conn, round_id, alice, now=NOW)
    with (
        pytest.raises(ReviewError, match="nothing to undo"),
        db.get_sync_engine(workbench_db).begin() as conn,
    ):
        undo_last(conn, round_id, alice, now=NOW)


def test_group_decision_corrects_every_member_with_the_group_id(workbench_db: str) -> None:
    seeded = seed_logs(workbench_db, 0)
    round_id = _open(workbench_db, limit=100, double_review_share=0.0)
    alice = make_user(workbench_db, "alice")
    leader = next(
        r for r in _items(workbench_db, round_id) if r.group_size == 3 and r.state == "pending"
    )
    with db.get_sync_engine(workbench_db).begin() as conn:
        for _ in range(5):  # claim until the group's leader is alice's
            got = claim_next(conn, round_id, alice, now=NOW)
            if got == leader.id or got is None:
                break
            skip(conn, got, alice, now=NOW)
    result = _decide(workbench_db, leader.id, alice, "correct", intent="weather", group=True)
    assert result.final and result.group_members == 2
    assert corrections(workbench_db) == {x: ("weather", None) for x in seeded.duplicates}
    rows = [r for r in audit(workbench_db) if r.action == "correct"]
    assert len(rows) == 3 and {r.group_id for r in rows} == {leader.group_id}
    with db.get_sync_engine(workbench_db).begin() as conn:
        undo_last(conn, round_id, alice, now=NOW)
    assert corrections(workbench_db) == {}
    assert Counter(r.action for r in audit(workbench_db))["undo"] == 3


def test_workbench_corrections_meet_the_import_validation(workbench_db: str) -> None:
    round_id, alice, item = _alice_holds_an_item(workbench_db, 2)
    with pytest.raises(NotInCatalog):
        _decide(workbench_db, item, alice, "correct", intent="crypto")
    # The log was deleted meanwhile (retention): the import's "no logged prompt" rule refuses.
    log_id = next(r.log_id for r in _items(workbench_db, round_id) if r.id == item)
    with db.get_sync_engine(workbench_db).begin() as conn:
        conn.execute(update(items).where(items.c.id == item).values(log_id=uuid.uuid4()))
    with pytest.raises(ReviewError, match="deleted"):
        _decide(workbench_db, item, alice, "confirm")
    assert corrections(workbench_db) == {} and log_id


def test_new_intent_waits_for_an_admin(workbench_db: str) -> None:
    round_id, alice, one = _alice_holds_an_item(workbench_db, 2)
    admin = make_user(workbench_db, "root", "admin")
    proposed = _decide(workbench_db, one, alice, "propose", intent="crypto_prices")
    assert (proposed.state, proposed.final) == ("proposal", False)
    two = _claim(workbench_db, round_id, alice)
    assert two is not None
    _decide(workbench_db, two, alice, "propose", intent="stocks")
    assert corrections(workbench_db) == {}
    with db.get_sync_engine(workbench_db).connect() as conn:
        assert {p["intent"]: p["waiting"] for p in list_proposals(conn)} == {
            "crypto_prices": 1,
            "stocks": 1,
        }
    with db.get_sync_engine(workbench_db).begin() as conn:
        assert accept_proposal(conn, "crypto_prices", admin, now=NOW) == 1
        assert reject_proposal(conn, "stocks", admin, now=NOW) == 1
        assert "crypto_prices" in load_catalog(conn, None).intents
    assert list(corrections(workbench_db).values()) == [("crypto_prices", None)]
    state = {r.id: r.state for r in _items(workbench_db, round_id)}
    assert (state[one], state[two]) == ("done", "pending")


def test_agreement_maths_on_a_hand_computed_example() -> None:
    # Ten items, two reviewers. Confusion (a rows, b columns) over x, y, z:
    #        x  y  z
    #   x    4  1  0     a: x 5, y 3, z 2    b: x 5, y 3, z 2
    #   y    1  2  0     agree = 4 + 2 + 2 = 8, p_o = 0.8
    #   z    0  0  2     p_e = (5*5 + 3*3 + 2*2) / 100 = 0.38
    # kappa = (0.8 - 0.38) / (1 - 0.38) = 0.42 / 0.62 = 0.677419...
    a = ["x"] * 4 + ["x"] + ["y"] + ["y"] * 2 + ["z"] * 2
    b = ["x"] * 4 + ["y"] + ["x"] + ["y"] * 2 + ["z"] * 2
    assert cohen_kappa(a, b) == pytest.approx(0.42 / 0.62)
    assert cohen_kappa(["x", "x"], ["x", "x"]) is None  # p_e = 1: undefined
    assert cohen_kappa(["x", "y"], ["y", "x"]) == pytest.approx(-1.0)
    assert cohen_kappa([], []) is None
    from sklearn.metrics import cohen_kappa_score  # the reference (installed for tests)

    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))

    # Raw agreement per intent: of the items where someone chose the intent, both did.
    pairs = [("ann", la, "bob", lb) for la, lb in zip(a, b, strict=True)]
    pairs.append(("cat", "x", "ann", "z"))  # another pair, keyed (ann, cat)
    agreement = agreement_from_pairs(pairs)
    by_pair = {(p.reviewer_a, p.reviewer_b): p for p in agreement.pairs}
    assert by_pair["ann", "bob"].agreed == 8 and by_pair["ann", "bob"].items == 10
    assert by_pair["ann", "cat"].items == 1 and by_pair["ann", "cat"].agreed == 0
    rates = {i.intent: (i.agreed, i.items) for i in agreement.intents}
    assert rates == {"x": (4, 7), "y": (2, 4), "z": (2, 3)}


def test_round_agreement_and_progress_from_the_database(workbench_db: str) -> None:
    seed_logs(workbench_db, 3)
    round_id = _open(workbench_db, limit=100, double_review_share=1.0)
    ann, bob = make_user(workbench_db, "ann"), make_user(workbench_db, "bob")
    labels = [("weather", "weather"), ("music", "banking"), ("music", "music")]
    doubles = {r.id for r in _items(workbench_db, round_id) if r.double_review}
    singles = 0
    while labels:
        item = _claim(workbench_db, round_id, ann)
        assert item is not None
        if item not in doubles:  # the near-duplicate group's leader: never double-reviewed
            _decide(workbench_db, item, ann, "confirm")
            singles += 1
            continue
        label_a, label_b = labels.pop(0)
        _decide(workbench_db, item, ann, "correct", intent=label_a)
        assert _claim(workbench_db, round_id, bob) == item
        _decide(workbench_db, item, bob, "correct", intent=label_b)
    with db.get_sync_engine(workbench_db).connect() as conn:
        agreement = round_agreement(conn, round_id)
        progress = round_progress(conn, round_id, now=NOW)
    (pair,) = agreement.pairs
    assert (pair.items, pair.agreed) == (3, 2)
    # a = [weather, music, music], b = [weather, banking, music]: p_o = 2/3,
    # p_e = (1*1 + 2*1) / 9 = 1/3, kappa = (2/3 - 1/3) / (2/3) = 0.5
    assert pair.kappa == pytest.approx(0.5)
    assert singles == 1
    assert (progress.done, progress.disputed) == (2 + singles, 1)
    assert {r.reviewer: r.decisions for r in progress.reviewers} == {"ann": 4, "bob": 3}


def test_next_item_resumes_the_held_lease(workbench_db: str) -> None:
    seed_logs(workbench_db, 3)
    round_id = _open(workbench_db, limit=100)
    alice = make_user(workbench_db, "alice")
    with db.get_sync_engine(workbench_db).connect() as conn:
        first = claim_next(conn, round_id, alice, now=NOW, resume=True)
        later = NOW + timedelta(minutes=1)
        assert claim_next(conn, round_id, alice, now=later, resume=True) == first


def test_failed_logins_are_limited_per_user_and_address(workbench_db: str) -> None:
    make_user(workbench_db, "alice")
    engine = db.get_sync_engine(workbench_db)
    for _ in range(10):
        with engine.begin() as conn:
            assert login(conn, "alice", "wrong", client="10.0.0.1", now=lambda: NOW) is None
    with engine.begin() as conn, pytest.raises(LoginRateLimited):
        login(conn, "alice", PASSWORD, client="10.0.0.2", now=lambda: NOW)  # per user
    with engine.begin() as conn, pytest.raises(LoginRateLimited):
        login(conn, "bob", "x", client="10.0.0.1", now=lambda: NOW)  # per address
    later = NOW + timedelta(minutes=16)
    with engine.begin() as conn:
        user = login(conn, "alice", PASSWORD, client="10.0.0.2", now=lambda: later)
    assert user is not None and user.name == "alice"


def test_unknown_home_catalog_falls_back_to_database_intents(
    workbench_db: str, tmp_path: Path
) -> None:
    seed_logs(workbench_db, 4)
    with db.get_sync_engine(workbench_db).connect() as conn:
        catalog = load_catalog(conn, tmp_path / "no-models")
    assert {"banking", "calendar", "music", "weather", "oos"} <= catalog.intents


def test_an_item_whose_log_was_deleted_is_not_claimed(workbench_db: str) -> None:
    seeded = seed_logs(workbench_db, 2)
    round_id = _open(workbench_db, limit=100, double_review_share=0.0)
    first = _items(workbench_db, round_id)[0]
    with db.get_sync_engine(workbench_db).begin() as conn:  # retention deleted it
        conn.execute(delete(LOGS).where(LOGS.c.id == first.log_id))
    alice = make_user(workbench_db, "alice")
    claimed = _claim(workbench_db, round_id, alice)
    assert claimed is not None and claimed != first.id and seeded.ids
