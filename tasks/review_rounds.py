"""Review rounds: open one from the review selection, list and close them.

A round's queue is filled by the same selection as the review file (``tasks.review_export``'s
candidates, ``tasks.review_select.select_for_review`` with the default strategy and budget,
near-duplicates collapsed). Every selected prompt becomes a ``pending`` item in priority order;
each collapsed near-duplicate becomes a ``member`` item of the selected prompt it duplicates
(same ``group_id``; ``group_size`` counts the selected prompt and its members), so a reviewer can
apply one decision to the whole group. A seeded ``double_review_share`` of the selected prompts
without a group is marked for two blind reviews. Conversation neighbours (message index ± 1 of
the same conversation) are looked up once here, so showing an item reads rows by id only.

Prompts already waiting in another open round are left out.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, and_, case, func, insert, select, update

from capture.db import database_url, get_sync_engine
from capture.ids import uuid7
from capture.models import PROMPT_LOGS
from capture.values import from_db_datetime
from tasks.retry import io_task
from tasks.review_export import ReviewSelection
from tasks.review_select import (
    ReviewCandidate,
    normalise_prompt,
    select_for_review,
)
from tasks.review_tables import ReviewError, items, rounds

logger = logging.getLogger(__name__)

_LOGS = PROMPT_LOGS
_CHUNK = 2_000
_EMBED_CHUNK = 256
DEFAULT_DOUBLE_REVIEW_SHARE = 0.1

EmbedFn = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True, slots=True)
class RoundSummary:
    """A round: ``items`` to review (selected prompts), ``members`` (collapsed near-duplicates
    decided with their group), ``double_review`` (items shown to two reviewers)."""

    id: uuid.UUID
    name: str
    status: str
    created_at: datetime | None
    items: int
    members: int
    double_review: int
    n_candidates: int | None = None


def _check_share(share: float) -> float:
    if not isinstance(share, int | float) or isinstance(share, bool) or not 0.0 <= share <= 1.0:
        raise ReviewError(f"double_review_share: expected a number in [0, 1], found {share!r}")
    return float(share)


def _embed_all(embed: EmbedFn, prompts: Sequence[str]) -> np.ndarray:
    parts = [
        np.asarray(embed(list(prompts[i : i + _EMBED_CHUNK])), dtype=np.float32)
        for i in range(0, len(prompts), _EMBED_CHUNK)
    ]
    matrix = np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def group_duplicates(
    candidates: Sequence[ReviewCandidate],
    selected: Sequence[ReviewCandidate],
    *,
    embeddings: np.ndarray | None = None,
    threshold: float = 0.95,
) -> dict[str, list[ReviewCandidate]]:
    """The collapsed near-duplicates of each selected prompt: ``{selected id: [members]}``.

    A candidate that was not selected joins the selected prompt with the same normalised text
    (``normalise_prompt``), else, with ``embeddings`` (L2-normalised, one row per candidate, in
    ``candidates`` order), the most similar selected prompt when the cosine reaches ``threshold``
    — the rule the selection collapsed it by. Candidates that match none are not in any group.
    """
    chosen = {str(c.id) for c in selected}
    by_text = {normalise_prompt(c.prompt): str(c.id) for c in reversed(selected)}
    index = {str(c.id): i for i, c in enumerate(candidates)}
    groups: dict[str, list[ReviewCandidate]] = {str(c.id): [] for c in selected}
    sel_ids = [str(c.id) for c in selected]
    sel_vectors = (
        embeddings[[index[i] for i in sel_ids]] if embeddings is not None and sel_ids else None
    )
    for position, candidate in enumerate(candidates):
        key = str(candidate.id)
        if key in chosen:
            continue
        owner = by_text.get(normalise_prompt(candidate.prompt))
        if owner is None and sel_vectors is not None and embeddings is not None:
            similarity = sel_vectors @ embeddings[position]
            best = int(np.argmax(similarity))
            if float(similarity[best]) >= threshold:
                owner = sel_ids[best]
        if owner is not None:
            groups[owner].append(candidate)
    return groups


def _queued_elsewhere(conn: Connection) -> set[str]:
    stmt = (
        select(items.c.log_id)
        .join(rounds, rounds.c.id == items.c.round_id)
        .where(rounds.c.status == "open", items.c.state != "done")
    )
    return {str(x) for x in conn.execute(stmt).scalars()}


def conversation_neighbours(
    conn: Connection, log_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[uuid.UUID | None, uuid.UUID | None]]:
    """``{log id: (previous message's log id, next message's log id)}`` in its conversation
    (same ``conversation_id``, ``message_index`` ± 1; the earliest logged row when several
    share an index). Logs without a conversation are left out."""
    where: dict[uuid.UUID, tuple[uuid.UUID, int]] = {}
    for start in range(0, len(log_ids), _CHUNK):
        chunk = list(log_ids[start : start + _CHUNK])
        rows = conn.execute(
            select(_LOGS.c.id, _LOGS.c.conversation_id, _LOGS.c.message_index).where(
                _LOGS.c.id.in_(chunk),
                _LOGS.c.conversation_id.is_not(None),
                _LOGS.c.message_index.is_not(None),
            )
        )
        for row in rows:
            where[row.id] = (row.conversation_id, int(row.message_index))
    conversations = sorted({conv for conv, _ in where.values()}, key=str)
    by_position: dict[tuple[uuid.UUID, int], uuid.UUID] = {}
    for start in range(0, len(conversations), _CHUNK):
        chunk = conversations[start : start + _CHUNK]
        rows = conn.execute(
            select(_LOGS.c.id, _LOGS.c.conversation_id, _LOGS.c.message_index)
            .where(_LOGS.c.conversation_id.in_(chunk), _LOGS.c.message_index.is_not(None))
            .order_by(_LOGS.c.created_at.desc(), _LOGS.c.id.desc())
        )
        for row in rows:  # newest first, so the earliest row of an index is kept
            by_position[(row.conversation_id, int(row.message_index))] = row.id
    return {
        log_id: (by_position.get((conv, index - 1)), by_position.get((conv, index + 1)))
        for log_id, (conv, index) in where.items()
    }


def open_round(
    conn: Connection,
    *,
    name: str | None = None,
    created_by: uuid.UUID | None = None,
    selection: ReviewSelection | None = None,
    double_review_share: float = DEFAULT_DOUBLE_REVIEW_SHARE,
    dedupe_threshold: float = 0.95,
    embed: EmbedFn | None = None,
    now: datetime | None = None,
) -> RoundSummary:
    """Open a round whose queue is this week's review selection; returns its summary.

    ``selection`` is the review export's (``tasks.review_export.ReviewSelection``: window,
    thresholds, budget, strategy, seed; default: its defaults; a bad value is refused when it
    is built), ``embed`` for cosine near-duplicates as there; ``double_review_share`` (0-1, of
    the selected prompts) and ``created_by`` (the admin's user id; None for a flow or the CLI).
    Runs in the caller's transaction (the caller commits). Raises :class:`ReviewError` for a bad
    share.
    An empty selection still opens an (empty) round.
    """
    share = _check_share(double_review_share)
    now = now or datetime.now(UTC)
    selection = selection or ReviewSelection()
    queued = _queued_elsewhere(conn)
    found = selection.candidates(conn, now=now)
    candidates = [c for c, _ in found if str(c.id) not in queued]
    embeddings = _embed_all(embed, [c.prompt for c in candidates]) if embed else None
    selected = select_for_review(
        candidates,
        **selection.ranking(),
        embeddings=embeddings,
        dedupe_threshold=dedupe_threshold,
    )
    groups = (
        group_duplicates(candidates, selected, embeddings=embeddings, threshold=dedupe_threshold)
        if selection.strategy != "random"
        else {str(c.id): [] for c in selected}
    )
    singles = [i for i, c in enumerate(selected) if not groups[str(c.id)]]
    n_double = min(len(singles), round(share * len(selected)))
    rng = np.random.default_rng(selection.seed)
    double = {singles[i] for i in rng.permutation(len(singles))[:n_double].tolist()}
    neighbours = conversation_neighbours(conn, [uuid.UUID(str(c.id)) for c in selected])

    round_id = uuid7()
    title = name or f"round {now.strftime('%Y-%m-%d %H:%M')} UTC"
    conn.execute(
        insert(rounds).values(
            id=round_id,
            name=title,
            status="open",
            strategy=selection.strategy,
            budget=selection.limit,
            double_review_share=share,
            params={
                "days": selection.days,
                "confidence_threshold": selection.confidence_threshold,
                "margin_threshold": selection.margin_threshold,
                "seed": selection.seed,
                "dedupe_threshold": dedupe_threshold,
                "embeddings": embed is not None,
                "candidates": len(candidates),
            },
            created_by=created_by,
            created_at=now,
        )
    )
    rows: list[dict[str, Any]] = []
    n_members = 0
    for position, candidate in enumerate(selected):
        log_id = uuid.UUID(str(candidate.id))
        members = groups[str(candidate.id)]
        group_id = uuid7() if members else None
        prev_id, next_id = neighbours.get(log_id, (None, None))
        is_double = position in double
        rows.append(
            _item_row(
                round_id,
                log_id,
                position,
                "pending",
                group_id=group_id,
                group_size=len(members) + 1,
            )
            | {
                "double_review": is_double,
                "reviews_needed": 2 if is_double else 1,
                "prev_log_id": prev_id,
                "next_log_id": next_id,
            }
        )
        for member in members:
            rows.append(
                _item_row(
                    round_id,
                    uuid.UUID(str(member.id)),
                    position,
                    "member",
                    group_id=group_id,
                    group_size=len(members) + 1,
                )
            )
        n_members += len(members)
    for start in range(0, len(rows), _CHUNK):
        conn.execute(insert(items), rows[start : start + _CHUNK])
    logger.info(
        "review round %s opened: %d prompts (%d near-duplicates in groups, %d double-reviewed) "
        "of %d candidates",
        title,
        len(selected),
        n_members,
        len(double),
        len(candidates),
    )
    return RoundSummary(
        id=round_id,
        name=title,
        status="open",
        created_at=now,
        items=len(selected),
        members=n_members,
        double_review=len(double),
        n_candidates=len(candidates),
    )


def _item_row(
    round_id: uuid.UUID,
    log_id: uuid.UUID,
    position: int,
    state: str,
    *,
    group_id: uuid.UUID | None,
    group_size: int,
) -> dict[str, Any]:
    return {
        "id": uuid7(),
        "round_id": round_id,
        "log_id": log_id,
        "position": position,
        "state": state,
        "group_id": group_id,
        "group_size": group_size,
        "double_review": False,
        "reviews_needed": 1,
        "reviews_done": 0,
        "first_reviewer": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "prev_log_id": None,
        "next_log_id": None,
        "final_intent": None,
        "final_decision_id": None,
        "decided_at": None,
    }


def open_review_round(url: str | None = None, **kwargs: Any) -> RoundSummary:
    """:func:`open_round` in its own transaction on the database at ``url`` (default: the
    settings' database) — what a flow or the CLI calls. ``kwargs`` are :func:`open_round`'s."""
    with get_sync_engine(database_url(url)).begin() as conn:
        return open_round(conn, **kwargs)


def _count(condition: Any) -> Any:
    return func.sum(case((condition, 1), else_=0))


def list_rounds(
    conn: Connection, *, include_closed: bool = True, round_id: uuid.UUID | None = None
) -> list[RoundSummary]:
    """Every round (or only ``round_id``), newest first, with its item counts."""
    stmt = (
        select(
            rounds.c.id,
            rounds.c.name,
            rounds.c.status,
            rounds.c.created_at,
            _count(items.c.state != "member").label("n_items"),
            _count(items.c.state == "member").label("n_members"),
            _count(items.c.double_review.is_(True)).label("n_double"),
        )
        .select_from(rounds.outerjoin(items, items.c.round_id == rounds.c.id))
        .group_by(rounds.c.id, rounds.c.name, rounds.c.status, rounds.c.created_at)
        .order_by(rounds.c.created_at.desc(), rounds.c.id.desc())
    )
    if not include_closed:
        stmt = stmt.where(rounds.c.status == "open")
    if round_id is not None:
        stmt = stmt.where(rounds.c.id == round_id)
    return [
        RoundSummary(
            id=r.id,
            name=r.name,
            status=r.status,
            created_at=from_db_datetime(r.created_at),
            items=int(r.n_items or 0),
            members=int(r.n_members or 0),
            double_review=int(r.n_double or 0),
        )
        for r in conn.execute(stmt)
    ]


def get_round(conn: Connection, round_id: uuid.UUID) -> RoundSummary:
    """One round; :class:`ReviewError` when there is no such round."""
    found = list_rounds(conn, round_id=round_id)
    if not found:
        raise ReviewError(
            f"no review round has id {round_id}; see `prompt-capture review-round list`"
        )
    return found[0]


def close_round(conn: Connection, round_id: uuid.UUID, *, now: datetime | None = None) -> None:
    """Close a round: its items leave the queue (decisions already made stay)."""
    done = conn.execute(
        update(rounds)
        .where(and_(rounds.c.id == round_id, rounds.c.status == "open"))
        .values(status="closed", closed_at=now or datetime.now(UTC))
    )
    if done.rowcount == 0:
        raise ReviewError(f"no open review round has id {round_id}")


#: The Prefect task a flow calls (e.g. the weekly review export opening a round).
open_review_round_task = io_task(open_review_round, name="open-review-round")
