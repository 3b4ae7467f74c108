"""Review decisions: decide, undo, settle, and new-intent proposals; the final-decision rule.

Every call writes audit rows (``review_decisions``: reviewer, time, before → after, source, group
id) and never updates or deletes one. ``corrected_intent`` / ``correction_notes`` /
``corrected_at`` of ``nlu_prompt_logs`` (what the training export reads) are written only when a
decision is **final**:

- a single-review item: its one decision (confirm, correction, out of scope);
- a double-review item: the second reviewer's decision when both chose the same intent;
  otherwise the item is ``disputed`` until an admin settles it (:func:`settle`);
- a new intent (``propose``): when an admin accepts the proposal (:func:`accept_proposal`);
  a rejected proposal sends its items back to the queue.

A group decision (``group=True``) records the same decision for every collapsed near-duplicate
of the item (one audit row each, with the group id) and corrects them together. Every
correction passes ``tasks.corrections.validate_correction_rows`` — the file import's rules — and
is written by ``tasks.corrections.write_correction``, the file import's update.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Connection, exists, insert, select, update
from sqlalchemy.exc import IntegrityError

from capture.ids import uuid7
from capture.models import PROMPT_LOGS
from capture.review_audit import prior_of
from capture.values import from_db_datetime
from tasks.corrections import fetch_logs, validate_correction_rows, write_correction
from tasks.review_queue import (
    DEFAULT_LEASE,
    Catalog,
    audit_row,
    clean_notes,
    held_item,
    item_audit_row,
    item_with_log,
)
from tasks.review_tables import (
    LABEL_ACTIONS,
    LeaseLost,
    NotInCatalog,
    ReviewError,
    decisions,
    items,
    proposals,
)
from tasks.review_users import ReviewUser

logger = logging.getLogger(__name__)

_LOGS = PROMPT_LOGS
_UNDO = decisions.alias("undo_rows")


@dataclass(frozen=True, slots=True)
class DecisionResult:
    """What a decision did: the item's new ``state``, whether it was ``final`` (written to the
    log), the intent decided, and how many group members were decided with it."""

    decision_id: uuid.UUID
    item_id: uuid.UUID
    round_id: uuid.UUID
    action: str
    intent: str
    state: str
    final: bool
    group_members: int = 0


@dataclass(frozen=True, slots=True)
class UndoResult:
    """The undone decision, its item (leased back to the reviewer), and the logs it reverted."""

    undone_id: uuid.UUID
    item_id: uuid.UUID
    reverted_logs: int


def live(column: Any = None) -> Any:
    """Decisions not reversed by an undo row."""
    target = decisions.c.id if column is None else column
    return ~exists().where(_UNDO.c.undoes == target)


# One round trip for the item and its log.
_ITEM_WITH_LOG = item_with_log(
    _LOGS.c.predicted_intent,
    _LOGS.c.corrected_intent,
    _LOGS.c.correction_notes,
    _LOGS.c.corrected_at,
)


def _target(action: str, intent: str | None, predicted: str, catalog: Catalog) -> tuple[str, str]:
    """``(action, intent)`` a request means: confirm → the prediction, out of scope → the
    catalogue's out-of-scope label, a typed intent → correct (confirm when it is the
    prediction) or, outside the catalogue, propose."""
    if action not in LABEL_ACTIONS:
        raise ReviewError(f"action: expected one of {', '.join(LABEL_ACTIONS)}, found {action!r}")
    if action == "confirm":
        return "confirm", predicted
    if action == "out_of_scope":
        return "out_of_scope", catalog.oos_label
    name = intent.strip() if isinstance(intent, str) else ""
    if not name:
        raise ReviewError(f"intent: {action} needs an intent name, found nothing")
    if name in catalog.intents:
        return ("confirm" if name == predicted else "correct"), name
    if action == "correct":
        raise NotInCatalog(
            f"{name!r} is not an intent of the model's catalogue; pick one from the list, or "
            "propose it as a new intent (an admin must accept it before it reaches training)"
        )
    return "propose", name


def validate_decision(
    conn: Connection, log_ids: Sequence[uuid.UUID], intent: str, notes: str | None, **kw: Any
) -> None:
    rows = [{"id": str(x), "corrected_intent": intent, "notes": notes or ""} for x in log_ids]
    _, problems = validate_correction_rows(conn, rows, **kw)
    if problems:
        shown = "; ".join(str(p) for p in problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ReviewError(f"the correction was refused: {shown}{more}")


def before_intent(log: Any) -> str:
    return str(log.corrected_intent or log.predicted_intent)


def merge_notes(*notes: str | None) -> str | None:
    seen = [n for n in dict.fromkeys(x for x in notes if x)]
    return clean_notes(" | ".join(seen)) if seen else None


def _ensure_proposal(
    conn: Connection, intent: str, reviewer: ReviewUser, round_id: uuid.UUID, now: datetime
) -> None:
    status = conn.execute(
        select(proposals.c.status).where(proposals.c.intent == intent)
    ).scalar_one_or_none()
    if status == "rejected":
        conn.execute(
            update(proposals)
            .where(proposals.c.intent == intent)
            .values(
                status="proposed",
                proposed_by=reviewer.id,
                proposed_at=now,
                round_id=round_id,
                decided_by=None,
                decided_at=None,
            )
        )
    elif status is None:
        try:
            with conn.begin_nested():
                conn.execute(
                    insert(proposals).values(
                        id=uuid7(),
                        intent=intent,
                        status="proposed",
                        round_id=round_id,
                        proposed_by=reviewer.id,
                        proposed_at=now,
                    )
                )
        except IntegrityError:  # proposed at the same moment by another reviewer
            logger.debug("proposal %r was created concurrently", intent)


def _other_decision(conn: Connection, item_id: uuid.UUID, reviewer_id: uuid.UUID) -> Any:
    return conn.execute(
        select(decisions.c.id, decisions.c.after_intent, decisions.c.notes)
        .where(
            decisions.c.item_id == item_id,
            decisions.c.reviewer_id == reviewer_id,
            decisions.c.action.in_(LABEL_ACTIONS),
            decisions.c.batch_id.is_(None),
            live(),
        )
        .order_by(decisions.c.id.desc())
        .limit(1)
    ).first()


def decide(
    conn: Connection,
    item_id: uuid.UUID,
    reviewer: ReviewUser,
    *,
    action: str,
    catalog: Catalog,
    now: datetime,
    intent: str | None = None,
    notes: str | None = None,
    group: bool = False,
    source: str = "ui",
) -> DecisionResult:
    """Record ``reviewer``'s decision on the item they hold; write it to the log when final.

    ``action``: ``confirm`` (the prediction), ``correct`` (``intent`` from the catalogue),
    ``out_of_scope``, ``propose`` (``intent`` outside the catalogue). ``group``: decide every
    collapsed near-duplicate of the item too. Raises :class:`LeaseLost` when the reviewer no
    longer holds the item, :class:`NotInCatalog` for ``correct`` with an unknown intent,
    :class:`ReviewError` when the file import's validation refuses it. The caller commits.
    """
    item = held_item(conn, item_id, reviewer, _ITEM_WITH_LOG)
    log = item  # the log's columns came with the item (outer join)
    if log.predicted_intent is None:
        raise ReviewError(f"the logged prompt {item.log_id} was deleted (retention); skip it")
    action, after = _target(action, intent, log.predicted_intent, catalog)
    notes = clean_notes(notes)
    members = []
    if group and item.group_id is not None:
        members = list(
            conn.execute(
                select(items.c.id, items.c.log_id).where(
                    items.c.group_id == item.group_id, items.c.state == "member"
                )
            )
        )
    validate_decision(
        conn,
        [item.log_id, *(m.log_id for m in members)],
        after,
        notes,
        catalog=set(catalog.intents),
        allow_new_intent=action == "propose",
    )

    reviews_done = item.reviews_done + 1
    first = item.first_reviewer or reviewer.id
    final_notes = notes
    if item.reviews_needed == 2 and reviews_done == 1:
        state = "pending"
    elif item.reviews_needed == 2:
        other = _other_decision(conn, item.id, item.first_reviewer)
        agree = other is not None and other.after_intent == after
        state = ("proposal" if action == "propose" else "done") if agree else "disputed"
        final_notes = merge_notes(other.notes if other else None, notes)
    else:
        state = "proposal" if action == "propose" else "done"
    final = state == "done"
    decision_id = uuid7()
    values: dict[str, Any] = {
        "state": state,
        "reviews_done": reviews_done,
        "first_reviewer": first,
        "lease_owner": None,
        "lease_expires_at": None,
    }
    if final:
        values |= {"final_intent": after, "final_decision_id": decision_id, "decided_at": now}
    elif state == "proposal":
        values |= {"final_intent": after}
    done = conn.execute(
        update(items)
        .where(
            items.c.id == item.id,
            items.c.state == "pending",
            items.c.lease_owner == reviewer.id,
            items.c.reviews_done == item.reviews_done,
        )
        .values(**values)
    )
    if done.rowcount == 0:
        raise LeaseLost(f"review item {item_id} was taken or decided meanwhile")
    group_id = item.group_id if members else None
    # The item's audit row and its members' differ only in which log/item and their priors.
    group_audit_row = partial(
        audit_row,
        reviewer=reviewer,
        action=action,
        now=now,
        round_id=item.round_id,
        after=after,
        notes=notes,
        source=source,
        group_id=group_id,
        applied=final,
    )
    rows = [
        group_audit_row(
            decision_id=decision_id,
            log_id=item.log_id,
            item_id=item.id,
            before=before_intent(log),
            prior=prior_of(log) if final else (None, None, None),
        )
    ]
    if final:
        write_correction(conn, item.log_id, after, final_notes, now)
    if members:
        member_logs = fetch_logs(conn, [m.log_id for m in members])
        for member in members:
            mlog = member_logs[member.log_id]
            rows.append(
                group_audit_row(
                    log_id=member.log_id,
                    item_id=member.id,
                    before=before_intent(mlog),
                    batch_id=decision_id,
                    prior=prior_of(mlog) if final else (None, None, None),
                )
            )
            if final:
                write_correction(conn, member.log_id, after, notes, now)
        if final:
            conn.execute(
                update(items)
                .where(items.c.id.in_([m.id for m in members]))
                .values(final_intent=after, final_decision_id=decision_id, decided_at=now)
            )
    conn.execute(insert(decisions), rows)
    if action == "propose":
        _ensure_proposal(conn, after, reviewer, item.round_id, now)
    return DecisionResult(
        decision_id, item.id, item.round_id, action, after, state, final, len(members)
    )


def undo_last(
    conn: Connection,
    round_id: uuid.UUID,
    reviewer: ReviewUser,
    *,
    now: datetime,
    lease: timedelta = DEFAULT_LEASE,
) -> UndoResult:
    """Reverse ``reviewer``'s latest decision in the round that is not undone yet.

    Writes an ``undo`` audit row per reversed row (the decision and, for a group decision, each
    member's), puts back the log values the decision replaced, and leases the item back to the
    reviewer so it is shown again. Refused (:class:`ReviewError`) when there is nothing to undo,
    when a second reviewer or an admin has decided the item since, or when the log was changed
    by someone else since. The caller commits.
    """
    last = conn.execute(
        select(decisions)
        .where(
            decisions.c.round_id == round_id,
            decisions.c.reviewer_id == reviewer.id,
            decisions.c.action.in_(LABEL_ACTIONS),
            decisions.c.batch_id.is_(None),
            live(),
        )
        .order_by(decisions.c.created_at.desc(), decisions.c.id.desc())
        .limit(1)
    ).first()
    if last is None:
        raise ReviewError("nothing to undo: you have no decision in this round that is not undone")
    item = conn.execute(select(items).where(items.c.id == last.item_id)).first()
    if item is None:
        raise ReviewError(f"review item {last.item_id} is unknown")
    _check_undoable(item, last, reviewer, now)
    reviews_done = max(0, item.reviews_done - 1)
    done = conn.execute(
        update(items)
        .where(
            items.c.id == item.id,
            items.c.state == item.state,
            items.c.reviews_done == item.reviews_done,
        )
        .values(
            state="pending",
            reviews_done=reviews_done,
            first_reviewer=item.first_reviewer if reviews_done == 1 else None,
            lease_owner=reviewer.id,
            lease_expires_at=now + lease,
            final_intent=None,
            final_decision_id=None,
            decided_at=None,
        )
    )
    if done.rowcount == 0:
        raise ReviewError("cannot undo: the item changed meanwhile; try again")
    batch = [last, *conn.execute(select(decisions).where(decisions.c.batch_id == last.id, live()))]
    reverted = 0
    rows: list[dict[str, Any]] = []
    for row in batch:
        if row.applied:
            back = conn.execute(
                update(_LOGS)
                .where(_LOGS.c.id == row.log_id, _LOGS.c.corrected_intent == row.after_intent)
                .values(
                    corrected_intent=row.prior_corrected_intent,
                    correction_notes=row.prior_correction_notes,
                    corrected_at=row.prior_corrected_at,
                )
            )
            if back.rowcount == 0:
                raise ReviewError(
                    f"cannot undo: the correction of log {row.log_id} was changed since "
                    "(another import or reviewer); ask an admin"
                )
            reverted += 1
        rows.append(
            audit_row(
                log_id=row.log_id,
                reviewer=reviewer,
                action="undo",
                now=now,
                round_id=round_id,
                item_id=row.item_id,
                before=row.after_intent,
                after=row.before_intent if row.applied else None,
                group_id=row.group_id,
                batch_id=None if row is last else rows[0]["id"],
                undoes=row.id,
                applied=bool(row.applied),
                prior=(row.after_intent, row.notes, now) if row.applied else (None, None, None),
            )
        )
    members = [row.item_id for row in batch[1:] if row.item_id is not None]
    if members:
        conn.execute(
            update(items)
            .where(items.c.id.in_(members))
            .values(final_intent=None, final_decision_id=None, decided_at=None)
        )
    conn.execute(insert(decisions), rows)
    return UndoResult(last.id, item.id, reverted)


def _check_undoable(item: Any, last: Any, reviewer: ReviewUser, now: datetime) -> None:
    """Refuse an undo unless ``last`` still is what the item's state rests on."""
    mine_second = item.reviews_needed == 2 and item.first_reviewer != reviewer.id
    if item.state == "done":
        current = item.final_decision_id == last.id
    elif item.state in ("disputed", "proposal"):
        current = item.reviews_done >= 1 and (item.reviews_needed == 1 or mine_second)
    elif item.state == "pending":
        current = item.reviews_done == 1 and item.first_reviewer == reviewer.id
    else:
        current = False
    if not current:
        raise ReviewError(
            "cannot undo: this item was decided since by another reviewer or by an admin "
            "(settled, or a proposal accepted or rejected)"
        )
    expires = from_db_datetime(item.lease_expires_at)
    if (
        item.state == "pending"
        and item.lease_owner not in (None, reviewer.id)
        and expires is not None
        and expires >= now
    ):
        raise ReviewError("cannot undo: another reviewer is looking at this item right now")


def require_admin(user: ReviewUser) -> None:
    if not user.is_admin:
        raise ReviewError(f"{user.name} is a reviewer; only an admin can do this")


def settle(
    conn: Connection,
    item_id: uuid.UUID,
    admin: ReviewUser,
    intent: str,
    *,
    catalog: Catalog,
    now: datetime,
    notes: str | None = None,
) -> DecisionResult:
    """An admin's final decision on a disputed double-review item (``intent`` from the
    catalogue); the reviewers' notes are kept when ``notes`` is None. The caller commits."""
    require_admin(admin)
    item = conn.execute(select(items).where(items.c.id == item_id)).first()
    if item is None or item.state != "disputed":
        raise ReviewError(f"review item {item_id} is not waiting to be settled")
    name = intent.strip() if isinstance(intent, str) else ""
    if name not in catalog.intents:
        raise NotInCatalog(
            f"{name!r} is not in the catalogue; settle with a catalogue intent (accept a "
            "proposal first to use a new one)"
        )
    notes = clean_notes(notes)
    if notes is None:
        earlier = conn.execute(
            select(decisions.c.notes).where(
                decisions.c.item_id == item.id, decisions.c.action.in_(LABEL_ACTIONS), live()
            )
        ).scalars()
        notes = merge_notes(*earlier)
    validate_decision(conn, [item.log_id], name, notes, catalog=set(catalog.intents))
    log = fetch_logs(conn, [item.log_id])[item.log_id]
    decision_id = uuid7()
    done = conn.execute(
        update(items)
        .where(items.c.id == item.id, items.c.state == "disputed")
        .values(state="done", final_intent=name, final_decision_id=decision_id, decided_at=now)
    )
    if done.rowcount == 0:
        raise ReviewError(f"review item {item_id} was settled meanwhile")
    audit = item_audit_row(
        item,
        admin,
        "settle",
        now,
        decision_id=decision_id,
        before=before_intent(log),
        after=name,
        notes=notes,
        applied=True,
        prior=prior_of(log),
    )
    conn.execute(insert(decisions).values(audit))
    write_correction(conn, item.log_id, name, notes, now)
    return DecisionResult(decision_id, item.id, item.round_id, "settle", name, "done", True)
