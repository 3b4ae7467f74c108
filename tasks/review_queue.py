"""The review queue: leases, the item a reviewer sees, skips and notes, the intent catalogue.

Leases. :func:`claim_next` gives a reviewer the first pending item of a round (by position) that
nobody holds, and holds it for ``lease`` (default 10 minutes); an abandoned item goes back to the
queue when its lease expires. Two reviewers never get the same item: on PostgreSQL the claim is
one ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED)`` (concurrent claims skip each
other's row locks and re-check the lease on the latest row version); on SQLite the same single
conditional ``UPDATE`` runs under the database's one write lock (SQLAlchemy renders no
``FOR UPDATE`` there). A double-review item is never given to the reviewer who decided it first.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Required, TypedDict, Unpack

from sqlalchemy import (
    Connection,
    Select,
    and_,
    bindparam,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)

from capture.model_dir import METADATA_FILE, ModelMetadata
from capture.models import PROMPT_LOGS
from capture.review_audit import Prior, audit_values
from capture.values import from_db_datetime, from_real, parse_secondary_intents
from tasks.anonymise import scrub_pii
from tasks.corrections import MAX_NOTES_CHARS, intent_catalog
from tasks.registry import current_model_dir, current_version
from tasks.review_tables import LeaseLost, ReviewError, decisions, items, proposals, rounds
from tasks.review_users import ReviewUser

logger = logging.getLogger(__name__)

_LOGS = PROMPT_LOGS
DEFAULT_LEASE = timedelta(minutes=10)
DEFAULT_OOS_LABEL = "oos"
N_ALTERNATIVES = 3


@dataclass(frozen=True, slots=True)
class Catalog:
    """The intents a workbench decision may name: the serving model's labels (else every intent
    the database knows, as the file import), the out-of-scope label, and accepted proposals."""

    intents: frozenset[str]
    oos_label: str = DEFAULT_OOS_LABEL
    model_version: str | None = None

    def sorted(self) -> list[str]:
        return sorted(self.intents)


def load_catalog(conn: Connection, models_dir: Path | None) -> Catalog:
    """The catalogue now (reads the registry's ``current`` model metadata and the database)."""
    oos = DEFAULT_OOS_LABEL
    version = None
    if models_dir is not None:
        version = current_version(models_dir)
        model_dir = current_model_dir(models_dir)
        if model_dir is not None and (model_dir / METADATA_FILE).is_file():
            oos = ModelMetadata.read(model_dir).oos_label
    base = intent_catalog(conn, models_dir)
    accepted = conn.execute(
        select(proposals.c.intent).where(proposals.c.status == "accepted")
    ).scalars()
    return Catalog(frozenset(base | set(accepted) | {oos}), oos, version)


@dataclass(frozen=True, slots=True)
class ItemView:
    """What a reviewer sees of one item.

    ``text`` is PII-scrubbed (``tasks.anonymise.scrub_pii``) unless ``raw`` (admins only), as are
    the neighbours and the workflow error. ``alternatives``: up to three runners-up
    ``(intent, probability)`` from ``secondary_intents``, best first (older rows: what they have).
    """

    item_id: uuid.UUID
    round_id: uuid.UUID
    log_id: uuid.UUID
    text: str
    raw: bool
    predicted_intent: str
    confidence: float | None
    alternatives: tuple[tuple[str, float], ...]
    was_successful: bool | None
    workflow_type: str | None
    execution_error: str | None
    previous: str | None
    next: str | None
    group_size: int
    double_review: bool
    lease_expires_at: datetime | None
    created_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form (ids and times as strings) for the web page."""
        return {
            "item_id": str(self.item_id),
            "round_id": str(self.round_id),
            "log_id": str(self.log_id),
            "text": self.text,
            "raw": self.raw,
            "predicted_intent": self.predicted_intent,
            "confidence": self.confidence,
            "alternatives": [{"intent": i, "confidence": c} for i, c in self.alternatives],
            "was_successful": self.was_successful,
            "workflow_type": self.workflow_type,
            "execution_error": self.execution_error,
            "previous": self.previous,
            "next": self.next,
            "group_size": self.group_size,
            "lease_expires_at": _iso(self.lease_expires_at),
            "created_at": _iso(self.created_at),
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# The claim, built once (bound per call: no per-call statement construction). "Free": no lease,
# an expired one, or already this reviewer's (an undo re-leases an item while the next is held).
_FREE = or_(
    items.c.lease_expires_at.is_(None),
    items.c.lease_expires_at < bindparam("b_now"),
    items.c.lease_owner == bindparam("b_reviewer"),
)
_PICK = (
    select(items.c.id)
    .where(
        items.c.round_id == bindparam("b_round"),
        items.c.state == "pending",
        _FREE,
        or_(items.c.first_reviewer.is_(None), items.c.first_reviewer != bindparam("b_reviewer")),
        exists().where(rounds.c.id == bindparam("b_round"), rounds.c.status == "open"),
        # Not an item whose logged prompt retention has deleted since the round opened.
        exists().where(_LOGS.c.id == items.c.log_id),
    )
    .order_by(items.c.position, items.c.id)
    .limit(1)
    .with_for_update(skip_locked=True, of=items)  # PostgreSQL; SQLite renders no FOR UPDATE
    .scalar_subquery()
)
_CLAIM = (
    update(items)
    .where(items.c.id == _PICK, items.c.state == "pending", _FREE)
    .values(lease_owner=bindparam("b_reviewer"), lease_expires_at=bindparam("b_expires"))
    .returning(items.c.id)
)


def claim_next(
    conn: Connection,
    round_id: uuid.UUID,
    reviewer: ReviewUser,
    *,
    now: datetime,
    lease: timedelta = DEFAULT_LEASE,
    resume: bool = False,
) -> uuid.UUID | None:
    """Lease the next free pending item of an open round to ``reviewer``; its id, or None when
    nothing is left for this reviewer (``resume``: the item the reviewer holds comes first).
    The caller commits (at once: the lease is then visible)."""
    if resume:
        held = current_lease(conn, round_id, reviewer, now=now)
        if held is not None:
            return held
    params = {
        "b_round": round_id,
        "b_reviewer": reviewer.id,
        "b_now": now,
        "b_expires": now + lease,
    }
    found: uuid.UUID | None = conn.execute(_CLAIM, params).scalar_one_or_none()
    return found


def current_lease(
    conn: Connection, round_id: uuid.UUID, reviewer: ReviewUser, *, now: datetime
) -> uuid.UUID | None:
    """The pending item of ``round_id`` that ``reviewer`` holds an unexpired lease on, if any."""
    stmt = (
        select(items.c.id)
        .where(
            items.c.lease_owner == reviewer.id,
            items.c.round_id == round_id,
            items.c.state == "pending",
            items.c.lease_expires_at >= now,
        )
        .order_by(items.c.position, items.c.id)
        .limit(1)
    )
    return conn.execute(stmt).scalar_one_or_none()


def _alternatives(
    secondary: Any, predicted: str, limit: int = N_ALTERNATIVES
) -> tuple[tuple[str, float], ...]:
    pairs = sorted(parse_secondary_intents(secondary), key=lambda p: -p[1])
    return tuple((name, conf) for name, conf in pairs if name != predicted)[:limit]


def item_with_log(*log_columns: Any) -> Select[Any]:
    """The review item bound as ``item_id`` with ``log_columns`` of its log (None where
    retention deleted the log: an outer join). Built once at import: no per-call compile work."""
    return (
        select(items, *log_columns)
        .select_from(items.outerjoin(_LOGS, _LOGS.c.id == items.c.log_id))
        .where(items.c.id == bindparam("item_id"))
    )


_VIEW = item_with_log(
    _LOGS.c.prompt,
    _LOGS.c.predicted_intent,
    _LOGS.c.confidence,
    _LOGS.c.secondary_intents,
    _LOGS.c.was_successful,
    _LOGS.c.workflow_type,
    _LOGS.c.execution_error,
    _LOGS.c.created_at,
)


def load_item(conn: Connection, item_id: uuid.UUID, *, raw: bool = False) -> ItemView:
    """The view of one item (see :class:`ItemView`); :class:`ReviewError` when unknown or its log
    was deleted (retention)."""
    row = conn.execute(_VIEW, {"item_id": item_id}).first()
    if row is None or row.prompt is None:
        raise ReviewError(f"review item {item_id} is unknown or its logged prompt was deleted")
    show = (lambda s: s) if raw else scrub_pii
    neighbours: dict[uuid.UUID, str] = {}
    wanted = [x for x in (row.prev_log_id, row.next_log_id) if x is not None]
    if wanted:
        for log_id, prompt in conn.execute(
            select(_LOGS.c.id, _LOGS.c.prompt).where(_LOGS.c.id.in_(wanted))
        ):
            neighbours[log_id] = show(prompt)
    error = row.execution_error
    return ItemView(
        item_id=row.id,
        round_id=row.round_id,
        log_id=row.log_id,
        text=show(row.prompt),
        raw=raw,
        predicted_intent=row.predicted_intent,
        confidence=None if row.confidence is None else from_real(row.confidence),
        alternatives=_alternatives(row.secondary_intents, row.predicted_intent),
        was_successful=row.was_successful,
        workflow_type=row.workflow_type,
        execution_error=None if error is None else show(error),
        previous=neighbours.get(row.prev_log_id) if row.prev_log_id else None,
        next=neighbours.get(row.next_log_id) if row.next_log_id else None,
        group_size=int(row.group_size),
        double_review=bool(row.double_review),
        lease_expires_at=from_db_datetime(row.lease_expires_at),
        created_at=from_db_datetime(row.created_at),
    )


def clean_notes(notes: str | None) -> str | None:
    """Notes as the file import keeps them: stripped, at most ``MAX_NOTES_CHARS``, None if empty."""
    if notes is None:
        return None
    if not isinstance(notes, str):
        raise ReviewError(f"notes: expected text, found {type(notes).__name__}")
    return notes.strip()[:MAX_NOTES_CHARS] or None


class AuditFields(TypedDict, total=False):
    """What a workbench audit row names besides its author and source: the keyword arguments of
    :func:`capture.review_audit.audit_values` (the one shape every writer uses)."""

    log_id: Required[uuid.UUID]
    action: Required[str]
    now: Required[datetime]
    round_id: uuid.UUID | None
    item_id: uuid.UUID | None
    before: str | None
    after: str | None
    notes: str | None
    group_id: uuid.UUID | None
    batch_id: uuid.UUID | None
    undoes: uuid.UUID | None
    applied: bool
    prior: Prior
    decision_id: uuid.UUID | None


def audit_row(
    *, reviewer: ReviewUser, source: str = "ui", **fields: Unpack[AuditFields]
) -> dict[str, Any]:
    """One ``review_decisions`` row (the audit) of a workbench user: who, when, before → after,
    source, group — ``capture.review_audit.audit_values`` with the user's name and id."""
    return audit_values(reviewer=reviewer.name, reviewer_id=reviewer.id, source=source, **fields)


def item_audit_row(
    item: Any, reviewer: ReviewUser, action: str, now: datetime, **more: Any
) -> dict[str, Any]:
    """:func:`audit_row` of ``reviewer``'s ``action`` on the queue item ``item`` (a
    ``review_round_items`` row with ``id``, ``round_id`` and ``log_id``); ``more`` are the
    other :func:`audit_row` fields (before, after, notes, ...)."""
    return audit_row(
        log_id=item.log_id,
        reviewer=reviewer,
        action=action,
        now=now,
        round_id=item.round_id,
        item_id=item.id,
        **more,
    )


_ITEM = select(items).where(items.c.id == bindparam("item_id"))


def held_item(
    conn: Connection, item_id: uuid.UUID, reviewer: ReviewUser, query: Select[Any] = _ITEM
) -> Any:
    """The row ``query`` reads for the item bound as ``item_id`` (default: the item's columns),
    when ``reviewer`` holds the item: :class:`ReviewError` when it is unknown,
    :class:`LeaseLost` when the reviewer no longer holds it."""
    row = conn.execute(query, {"item_id": item_id}).first()
    if row is None:
        raise ReviewError(f"review item {item_id} is unknown")
    if row.state != "pending" or row.lease_owner != reviewer.id:
        raise LeaseLost(
            f"review item {item_id} is no longer yours (the lease expired and another reviewer "
            "took it, or it was decided meanwhile); the next item is shown"
        )
    return row


def skip(conn: Connection, item_id: uuid.UUID, reviewer: ReviewUser, *, now: datetime) -> uuid.UUID:
    """Give a held item back and move it to the end of its round's queue (audited as ``skip``);
    returns the round id. :class:`LeaseLost` when the reviewer does not hold it. The caller
    commits."""
    row = held_item(conn, item_id, reviewer)
    last = (
        select(func.coalesce(func.max(items.c.position), 0) + 1)
        .where(items.c.round_id == row.round_id)
        .scalar_subquery()
    )
    done = conn.execute(
        update(items)
        .where(
            and_(
                items.c.id == item_id,
                items.c.state == "pending",
                items.c.lease_owner == reviewer.id,
            )
        )
        .values(lease_owner=None, lease_expires_at=None, position=last)
    )
    if done.rowcount == 0:
        raise LeaseLost(f"review item {item_id} is no longer yours")
    conn.execute(insert(decisions).values(item_audit_row(row, reviewer, "skip", now)))
    return uuid.UUID(str(row.round_id))


def add_note(
    conn: Connection, item_id: uuid.UUID, reviewer: ReviewUser, text: str, *, now: datetime
) -> uuid.UUID:
    """Record a note on an item (audited as ``note``); returns the audit row id. The note also
    travels with the reviewer's decision into ``correction_notes``. The caller commits."""
    notes = clean_notes(text)
    if notes is None:
        raise ReviewError("note: expected some text, found nothing")
    row = conn.execute(
        select(items.c.id, items.c.round_id, items.c.log_id).where(items.c.id == item_id)
    ).first()
    if row is None:
        raise ReviewError(f"review item {item_id} is unknown")
    values = item_audit_row(row, reviewer, "note", now, notes=notes)
    conn.execute(insert(decisions).values(values))
    return uuid.UUID(str(values["id"]))
