"""New-intent proposals: a reviewer's intent outside the catalogue waits for an admin.

Accepting it corrects every item (and group member) that proposed it — the final decision;
rejecting it sends those items back to the queue for a new review. Both are audited
(``accept_proposal`` / ``reject_proposal`` rows).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from capture.ids import uuid7
from capture.review_audit import prior_of
from tasks.corrections import fetch_logs, write_correction
from tasks.review_decide import before_intent, live, merge_notes, require_admin, validate_decision
from tasks.review_queue import audit_row, item_audit_row
from tasks.review_tables import ReviewError, decisions, items, proposals
from tasks.review_users import ReviewUser

logger = logging.getLogger(__name__)


def _proposal_items(conn: Connection, intent: str) -> list[Any]:
    return list(
        conn.execute(
            select(items).where(items.c.state == "proposal", items.c.final_intent == intent)
        )
    )


def _set_proposal(
    conn: Connection, intent: str, status: str, admin: ReviewUser, now: datetime
) -> None:
    done = conn.execute(
        update(proposals)
        .where(proposals.c.intent == intent, proposals.c.status == "proposed")
        .values(status=status, decided_by=admin.id, decided_at=now)
    )
    if done.rowcount == 0:
        raise ReviewError(f"no open proposal for intent {intent!r}")


def accept_proposal(conn: Connection, intent: str, admin: ReviewUser, *, now: datetime) -> int:
    """Accept a new intent: every item (and group member) waiting on it is corrected to it.
    Returns the number of logs corrected. The caller commits."""
    require_admin(admin)
    _set_proposal(conn, intent, "accepted", admin, now)
    corrected = 0
    for item in _proposal_items(conn, intent):
        proposed = list(
            conn.execute(
                select(decisions).where(
                    decisions.c.item_id == item.id,
                    decisions.c.action == "propose",
                    decisions.c.batch_id.is_(None),
                    live(),
                )
            )
        )
        leader_ids = [d.id for d in proposed]
        members = (
            list(
                conn.execute(select(decisions).where(decisions.c.batch_id.in_(leader_ids), live()))
            )
            if leader_ids
            else []
        )
        notes = merge_notes(*(d.notes for d in proposed))
        targets = [(item.id, item.log_id), *((m.item_id, m.log_id) for m in members)]
        validate_decision(
            conn, [t[1] for t in targets], intent, notes, catalog=set(), allow_new_intent=True
        )
        logs = fetch_logs(conn, [t[1] for t in targets])
        accept_id = uuid7()
        rows = []
        for index, (target_item, log_id) in enumerate(targets):
            log = logs[log_id]
            rows.append(
                audit_row(
                    decision_id=accept_id if index == 0 else None,
                    log_id=log_id,
                    reviewer=admin,
                    action="accept_proposal",
                    now=now,
                    round_id=item.round_id,
                    item_id=target_item,
                    before=before_intent(log),
                    after=intent,
                    notes=notes,
                    group_id=item.group_id if members else None,
                    batch_id=None if index == 0 else accept_id,
                    applied=True,
                    prior=prior_of(log),
                )
            )
            write_correction(conn, log_id, intent, notes, now)
            corrected += 1
        conn.execute(insert(decisions), rows)
        conn.execute(
            update(items)
            .where(items.c.id.in_([t[0] for t in targets]))
            .values(final_intent=intent, final_decision_id=accept_id, decided_at=now)
        )
        conn.execute(update(items).where(items.c.id == item.id).values(state="done"))
    logger.info("proposal %r accepted by %s: %d logs corrected", intent, admin.name, corrected)
    return corrected


def reject_proposal(conn: Connection, intent: str, admin: ReviewUser, *, now: datetime) -> int:
    """Reject a new intent: the items waiting on it go back to the queue for a new review.
    Returns the number of items returned. The caller commits."""
    require_admin(admin)
    _set_proposal(conn, intent, "rejected", admin, now)
    waiting = _proposal_items(conn, intent)
    for item in waiting:
        audit = item_audit_row(item, admin, "reject_proposal", now, before=intent, after=None)
        conn.execute(insert(decisions).values(audit))
    if waiting:
        conn.execute(
            update(items)
            .where(items.c.id.in_([i.id for i in waiting]))
            .values(state="pending", reviews_done=0, first_reviewer=None, final_intent=None)
        )
    return len(waiting)


def list_proposals(conn: Connection, *, status: str | None = "proposed") -> list[dict[str, Any]]:
    """Proposals (default: the open ones) with how many items wait on each, oldest first."""
    stmt = select(proposals).order_by(proposals.c.proposed_at, proposals.c.intent)
    if status is not None:
        stmt = stmt.where(proposals.c.status == status)
    out = []
    for row in conn.execute(stmt):
        waiting = len(_proposal_items(conn, row.intent))
        out.append({"intent": row.intent, "status": row.status, "waiting": waiting})
    return out
