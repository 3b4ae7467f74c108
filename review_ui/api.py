"""The JSON API the review page calls with ``fetch`` (every route needs a session; POSTs need the
CSRF header). A decision answers with the next item, so the page never reloads.

- ``GET /api/next?round=ID[&raw=1]`` → ``{"item": {...} | null}`` (the held item, else a new lease)
- ``POST /api/decide`` ``{"item_id", "action", "intent"?, "notes"?, "group"?, "raw"?}`` →
  ``{"result": {...}, "item": next | null}``; 409 ``{"error", "item"}`` when the lease was lost;
  422 ``{"error", "propose": true}`` for an intent outside the catalogue
- ``POST /api/skip`` ``{"item_id", "raw"?}`` → ``{"item": next | null}``
- ``POST /api/undo`` ``{"round_id", "raw"?}`` → ``{"undone", "item"}`` (the item, leased again)
- ``POST /api/note`` ``{"item_id", "text"}`` → ``{"note_id"}``
- ``GET /api/progress?round=ID`` → progress counts and agreement
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import Connection, select

from review_ui.security import CurrentUser, check_csrf, require_user, workbench
from review_ui.state import Workbench
from tasks.review_decide import decide, undo_last
from tasks.review_progress import round_agreement, round_progress
from tasks.review_queue import add_note, claim_next, load_item, skip
from tasks.review_tables import LeaseLost, NotInCatalog, items
from tasks.review_users import ReviewUser

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api", dependencies=[Depends(require_user), Depends(check_csrf)])


class DecideBody(BaseModel):
    item_id: uuid.UUID
    action: Literal["confirm", "correct", "out_of_scope", "propose"]
    intent: str | None = Field(default=None, max_length=200)
    notes: str | None = Field(default=None, max_length=10_000)
    group: bool = False
    raw: bool = False


class ItemBody(BaseModel):
    item_id: uuid.UUID
    raw: bool = False


class UndoBody(BaseModel):
    round_id: uuid.UUID
    raw: bool = False


class NoteBody(BaseModel):
    item_id: uuid.UUID
    text: str = Field(max_length=10_000)


def _next_view(
    wb: Workbench,
    conn: Connection,
    round_id: uuid.UUID,
    user: ReviewUser,
    raw: bool,
    *,
    resume: bool = True,
) -> dict[str, Any] | None:
    """The item to show next (``resume``: the one the reviewer holds first), read in the
    transaction that leases it; commits (with whatever the caller wrote before)."""
    now = wb.clock()
    item_id = claim_next(conn, round_id, user, now=now, lease=wb.settings.lease, resume=resume)
    view = None if item_id is None else load_item(conn, item_id, raw=raw and user.is_admin)
    conn.commit()
    return None if view is None else view.as_dict()


@router.get("/next")
def api_next(
    request: Request, round: uuid.UUID, user: CurrentUser, raw: bool = False
) -> dict[str, Any]:
    wb = workbench(request)
    with wb.writing(), wb.connect() as conn:
        return {"item": _next_view(wb, conn, round, user, raw)}


def _round_of(conn: Connection, item_id: uuid.UUID) -> uuid.UUID | None:
    found: uuid.UUID | None = conn.execute(
        select(items.c.round_id).where(items.c.id == item_id)
    ).scalar_one_or_none()
    return found


@router.post("/decide")
def api_decide(request: Request, body: DecideBody, user: CurrentUser) -> JSONResponse:
    wb = workbench(request)
    catalog = wb.catalog()
    with wb.writing(), wb.connect() as conn:
        try:
            result = decide(
                conn,
                body.item_id,
                user,
                action=body.action,
                intent=body.intent,
                notes=body.notes,
                group=body.group,
                catalog=catalog,
                now=wb.clock(),
            )
        except NotInCatalog as exc:
            conn.rollback()
            return JSONResponse({"error": str(exc), "propose": True}, status_code=422)
        except LeaseLost as exc:
            conn.rollback()
            round_id = _round_of(conn, body.item_id)
            nxt = _next_view(wb, conn, round_id, user, body.raw) if round_id else None
            return JSONResponse({"error": str(exc), "item": nxt}, status_code=409)
        # The decision and the next lease commit together (one WAL flush on PostgreSQL).
        nxt = _next_view(wb, conn, result.round_id, user, body.raw, resume=False)
    return JSONResponse(
        {
            "result": {
                "decision_id": str(result.decision_id),
                "action": result.action,
                "intent": result.intent,
                "state": result.state,
                "final": result.final,
                "group_members": result.group_members,
            },
            "item": nxt,
        }
    )


@router.post("/skip")
def api_skip(request: Request, body: ItemBody, user: CurrentUser) -> JSONResponse:
    wb = workbench(request)
    with wb.writing(), wb.connect() as conn:
        try:
            round_id = skip(conn, body.item_id, user, now=wb.clock())
        except LeaseLost as exc:
            conn.rollback()
            found = _round_of(conn, body.item_id)
            nxt = _next_view(wb, conn, found, user, body.raw) if found else None
            return JSONResponse({"error": str(exc), "item": nxt}, status_code=409)
        nxt = _next_view(wb, conn, round_id, user, body.raw, resume=False)
    return JSONResponse({"item": nxt})


@router.post("/undo")
def api_undo(request: Request, body: UndoBody, user: CurrentUser) -> dict[str, Any]:
    wb = workbench(request)
    with wb.writing(), wb.connect() as conn:
        undone = undo_last(conn, body.round_id, user, now=wb.clock(), lease=wb.settings.lease)
        conn.commit()
        view = load_item(conn, undone.item_id, raw=body.raw and user.is_admin).as_dict()
        conn.commit()
    return {"undone": str(undone.undone_id), "reverted_logs": undone.reverted_logs, "item": view}


@router.post("/note")
def api_note(request: Request, body: NoteBody, user: CurrentUser) -> dict[str, Any]:
    wb = workbench(request)
    with wb.writing(), wb.connect() as conn:
        note_id = add_note(conn, body.item_id, user, body.text, now=wb.clock())
        conn.commit()
    return {"note_id": str(note_id)}


@router.get("/progress")
def api_progress(request: Request, round: uuid.UUID) -> dict[str, Any]:
    wb = workbench(request)
    with wb.connect() as conn:
        progress = round_progress(conn, round, now=wb.clock())
        agreement = round_agreement(conn, round)
    return {
        "progress": progress.as_dict(),
        "agreement": {
            "items": agreement.items,
            "pairs": [
                {
                    "reviewers": [p.reviewer_a, p.reviewer_b],
                    "items": p.items,
                    "observed": p.observed,
                    "kappa": p.kappa,
                }
                for p in agreement.pairs
            ],
            "intents": [
                {"intent": i.intent, "items": i.items, "agreed": i.agreed, "rate": i.rate}
                for i in agreement.intents
            ],
        },
    }
