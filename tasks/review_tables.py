"""The review workbench's tables (migration 0005), as SQLAlchemy Core tables, and their vocabulary.

Six tables (docs/review-workbench in the README; shapes below):

- ``review_users``: who may log in to the workbench (``role`` reviewer | admin, argon2 hash).
- ``review_login_attempts``: every login attempt (user name, client address, success, time):
  the failed-login limit is counted here, so a restart does not reset it.
- ``review_rounds``: a review round (the selection that filled it, double-review share).
- ``review_round_items``: the queue of a round, one row per selected prompt and per collapsed
  near-duplicate (``state`` ``member``). A reviewer holds an item through a lease
  (``lease_owner``, ``lease_expires_at``); ``double_review`` items need two reviewers.
- ``review_decisions``: the audit, one row per decision, skip, note, undo, settlement (who, when,
  before → after, source ui | file | label_studio | api, group id). Rows are never updated or
  deleted: an undo is a new row naming the row it reverses (``undoes``).
- ``review_intent_proposals``: intents a reviewer typed that are not in the catalogue; they reach
  ``corrected_intent`` only when an admin accepts them.

Log references (``log_id``, ``prev_log_id``, ``next_log_id``) hold the ``nlu_prompt_logs`` id
without a foreign key: retention deletes raw logs, the review history stays.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    false,
    true,
)
from sqlalchemy.sql.schema import SchemaItem

from capture.errors import UserError
from capture.models import NAMING_CONVENTION, JsonB, Timestamp
from capture.review_audit import AUDIT_SOURCES

logger = logging.getLogger(__name__)

ROLES: Final = ("reviewer", "admin")
SOURCES: Final = AUDIT_SOURCES  # ui, file, label_studio, api (migration 0009 added api)
#: Item states: ``pending`` needs (more) reviews; ``member`` is a collapsed near-duplicate decided
#: with its group; ``disputed`` (two reviewers disagree) and ``proposal`` (a new intent) wait for an
#: admin; ``done`` has its final decision written to ``nlu_prompt_logs``.
STATES: Final = ("pending", "member", "disputed", "proposal", "done")
#: Decisions that label a prompt (count as a review).
LABEL_ACTIONS: Final = ("confirm", "correct", "out_of_scope", "propose")
#: Every audited action.
ACTIONS: Final = (
    *LABEL_ACTIONS,
    "skip",
    "note",
    "undo",
    "settle",
    "accept_proposal",
    "reject_proposal",
)
PROPOSAL_STATES: Final = ("proposed", "accepted", "rejected")


class ReviewError(UserError, ValueError):
    """A review action that cannot be done as asked (unknown round or item, an intent outside
    the catalogue, nothing to undo, a bad parameter); the message names the fix."""


class LeaseLost(ReviewError):
    """The item is no longer leased to this reviewer (the lease expired and another reviewer
    took it, or it was decided meanwhile); show the next item."""


class NotInCatalog(ReviewError):
    """The intent is not in the model's catalogue; the reviewer may propose it as a new intent."""


metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _table(name: str, *columns: SchemaItem, indexes: Sequence[tuple[str, ...]] = ()) -> Table:
    """The workbench table ``name``: a UUID primary key ``id``, then ``columns`` (and
    constraints), and one index per column tuple of ``indexes``, named as migration 0005 names
    them: ``ix_<table>_<columns joined by _>``."""
    named = (Index(f"ix_{name}_{'_'.join(cols)}", *cols) for cols in indexes)
    return Table(name, metadata, Column("id", Uuid, primary_key=True), *columns, *named)


def _ts(name: str, *, nullable: bool = True) -> Column[object]:
    return Column(name, Timestamp, nullable=nullable)


def _user(name: str) -> Column[object]:
    """A reference to a workbench user (None: nobody, or a user from before)."""
    return Column(name, Uuid, ForeignKey("review_users.id"), nullable=True)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


users = _table(
    "review_users",
    Column("name", Text, nullable=False, unique=True),
    Column("role", Text, nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("active", Boolean, nullable=False, server_default=true()),
    _ts("created_at", nullable=False),
    _ts("updated_at", nullable=False),
    CheckConstraint(_in("role", ROLES), name="role"),
)

login_attempts = _table(
    "review_login_attempts",
    Column("user_name", Text, nullable=False),
    Column("client", Text, nullable=False),
    Column("succeeded", Boolean, nullable=False),
    _ts("at", nullable=False),
    indexes=[("user_name", "at"), ("client", "at")],
)

rounds = _table(
    "review_rounds",
    Column("name", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("strategy", Text, nullable=False),
    Column("budget", Integer, nullable=False),
    Column("double_review_share", Float, nullable=False),
    Column("params", JsonB, nullable=False),
    _user("created_by"),
    _ts("created_at", nullable=False),
    _ts("closed_at"),
    CheckConstraint(_in("status", ("open", "closed")), name="status"),
    CheckConstraint(
        "double_review_share >= 0 AND double_review_share <= 1", name="double_review_share"
    ),
)

items = _table(
    "review_round_items",
    Column("round_id", Uuid, ForeignKey("review_rounds.id", ondelete="CASCADE"), nullable=False),
    Column("log_id", Uuid, nullable=False),
    Column("position", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("group_id", Uuid, nullable=True),
    Column("group_size", Integer, nullable=False, server_default="1"),
    Column("double_review", Boolean, nullable=False, server_default=false()),
    Column("reviews_needed", SmallInteger, nullable=False, server_default="1"),
    Column("reviews_done", SmallInteger, nullable=False, server_default="0"),
    Column("first_reviewer", Uuid, nullable=True),
    _user("lease_owner"),
    _ts("lease_expires_at"),
    Column("prev_log_id", Uuid, nullable=True),
    Column("next_log_id", Uuid, nullable=True),
    Column("final_intent", Text, nullable=True),
    Column("final_decision_id", Uuid, nullable=True),
    _ts("decided_at"),
    CheckConstraint(_in("state", STATES), name="state"),
    CheckConstraint("reviews_needed IN (1, 2)", name="reviews_needed"),
    UniqueConstraint("round_id", "log_id", name="uq_review_round_items_round_id_log_id"),
    # The first: the claim (the first pending item of a round by position).
    indexes=[("round_id", "state", "position"), ("group_id",), ("lease_owner",)],
)

decisions = _table(
    "review_decisions",
    Column("round_id", Uuid, ForeignKey("review_rounds.id"), nullable=True),
    Column("item_id", Uuid, ForeignKey("review_round_items.id"), nullable=True),
    Column("log_id", Uuid, nullable=False),
    _user("reviewer_id"),
    Column("reviewer", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("before_intent", Text, nullable=True),
    Column("after_intent", Text, nullable=True),
    Column("notes", Text, nullable=True),
    Column("source", Text, nullable=False),
    Column("group_id", Uuid, nullable=True),
    Column("batch_id", Uuid, nullable=True),
    Column("undoes", Uuid, ForeignKey("review_decisions.id"), nullable=True),
    Column("applied", Boolean, nullable=False, server_default=false()),
    Column("prior_corrected_intent", Text, nullable=True),
    Column("prior_correction_notes", Text, nullable=True),
    _ts("prior_corrected_at"),
    _ts("created_at", nullable=False),
    CheckConstraint(_in("action", ACTIONS), name="action"),
    CheckConstraint(_in("source", SOURCES), name="source"),
    indexes=[
        ("item_id",),
        ("reviewer_id", "round_id", "created_at"),
        ("undoes",),
        ("log_id",),
        ("batch_id",),
    ],
)

proposals = _table(
    "review_intent_proposals",
    Column("intent", Text, nullable=False, unique=True),
    Column("status", Text, nullable=False),
    Column("round_id", Uuid, ForeignKey("review_rounds.id"), nullable=True),
    _user("proposed_by"),
    _ts("proposed_at", nullable=False),
    _user("decided_by"),
    _ts("decided_at"),
    CheckConstraint(_in("status", PROPOSAL_STATES), name="status"),
)

#: Every workbench table, parents first (delete in reverse order).
TABLES: Final = (users, login_attempts, rounds, items, decisions, proposals)
