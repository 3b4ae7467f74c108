"""The review workbench: reviewers, login attempts, rounds, the leased queue, audited decisions,
new-intent proposals.

- ``review_users``: name (unique), role ``reviewer`` | ``admin``, argon2 hash, active flag.
- ``review_login_attempts``: user name, client address, success, time; the failed-login limit
  (10 per 15 minutes per user and per address) is counted here, so a restart does not reset it.
- ``review_rounds``: the selection that filled a round (strategy, budget, parameters), the share
  of items shown to two reviewers, open/closed.
- ``review_round_items``: one row per selected prompt (``pending`` → ``done``, or ``disputed`` /
  ``proposal`` waiting for an admin) and per collapsed near-duplicate (``member``, decided with
  its group: ``group_id``, ``group_size``). A reviewer holds an item through a lease
  (``lease_owner``, ``lease_expires_at``); ``double_review`` items need two reviewers
  (``reviews_needed`` 2). ``prev_log_id`` / ``next_log_id``: the conversation neighbours, found
  when the round was opened.
- ``review_decisions``: the audit. One row per decision, skip, note, undo and settlement:
  reviewer, time, ``before_intent`` → ``after_intent``, source ``ui`` | ``file`` |
  ``label_studio``, group id; ``applied`` when the row wrote ``corrected_intent`` (with the
  values it replaced, for undo). Rows are never updated: an undo is a new row (``undoes``).
- ``review_intent_proposals``: an intent typed by a reviewer that the catalogue lacks;
  ``proposed`` until an admin accepts or rejects it.

Log references hold the ``nlu_prompt_logs`` id without a foreign key (retention deletes raw logs;
the review history stays). Same tables on SQLite and PostgreSQL; on PostgreSQL the pipeline role
of migration 0003 (the workbench connects as a member of it) gets ``SELECT, INSERT, UPDATE,
DELETE`` on them, the application role nothing.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from migrations.helpers import grant_pipeline_tables, revoke_pipeline_tables
from migrations.helpers import sql_in as _in
from migrations.helpers import timestamp as _ts

revision = "0005"
down_revision = "0004"

USERS = "review_users"
ATTEMPTS = "review_login_attempts"
ROUNDS = "review_rounds"
ITEMS = "review_round_items"
DECISIONS = "review_decisions"
PROPOSALS = "review_intent_proposals"
TABLES = (USERS, ATTEMPTS, ROUNDS, ITEMS, DECISIONS, PROPOSALS)

ITEM_STATES = ("pending", "member", "disputed", "proposal", "done")
ACTIONS = (
    "confirm",
    "correct",
    "out_of_scope",
    "propose",
    "skip",
    "note",
    "undo",
    "settle",
    "accept_proposal",
    "reject_proposal",
)


def _fk(
    table: str, column: str, parent: str, *, ondelete: str | None = None
) -> sa.ForeignKeyConstraint:
    """``table.column`` references ``parent.id``; named ``fk_<table>_<column>_<parent>``."""
    return sa.ForeignKeyConstraint(
        [column], [f"{parent}.id"], name=op.f(f"fk_{table}_{column}_{parent}"), ondelete=ondelete
    )


def _indexes(table: str, *column_lists: tuple[str, ...]) -> None:
    """One index on ``table`` per column list, named ``ix_<table>_<columns joined by _>``."""
    for columns in column_lists:
        op.create_index(f"ix_{table}_{'_'.join(columns)}", table, list(columns))


def _json() -> sa.types.TypeEngine[Any]:
    from sqlalchemy.dialects.postgresql import JSONB

    return sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        USERS,
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_users")),
        sa.UniqueConstraint("name", name=op.f("uq_review_users_name")),
        sa.CheckConstraint(_in("role", ("reviewer", "admin")), name=op.f("ck_review_users_role")),
    )
    op.create_table(
        ATTEMPTS,
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_name", sa.Text(), nullable=False),
        sa.Column("client", sa.Text(), nullable=False),
        sa.Column("succeeded", sa.Boolean(), nullable=False),
        _ts("at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_login_attempts")),
    )
    _indexes(ATTEMPTS, ("user_name", "at"), ("client", "at"))

    op.create_table(
        ROUNDS,
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("strategy", sa.Text(), nullable=False),
        sa.Column("budget", sa.Integer(), nullable=False),
        sa.Column("double_review_share", sa.Float(), nullable=False),
        sa.Column("params", _json(), nullable=False),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        _ts("created_at", nullable=False),
        _ts("closed_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_rounds")),
        _fk(ROUNDS, "created_by", USERS),
        sa.CheckConstraint(_in("status", ("open", "closed")), name=op.f("ck_review_rounds_status")),
        sa.CheckConstraint(
            "double_review_share >= 0 AND double_review_share <= 1",
            name=op.f("ck_review_rounds_double_review_share"),
        ),
    )

    op.create_table(
        ITEMS,
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("round_id", sa.Uuid(), nullable=False),
        sa.Column("log_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("group_id", sa.Uuid(), nullable=True),
        sa.Column("group_size", sa.Integer(), server_default="1", nullable=False),
        sa.Column("double_review", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("reviews_needed", sa.SmallInteger(), server_default="1", nullable=False),
        sa.Column("reviews_done", sa.SmallInteger(), server_default="0", nullable=False),
        sa.Column("first_reviewer", sa.Uuid(), nullable=True),
        sa.Column("lease_owner", sa.Uuid(), nullable=True),
        _ts("lease_expires_at"),
        sa.Column("prev_log_id", sa.Uuid(), nullable=True),
        sa.Column("next_log_id", sa.Uuid(), nullable=True),
        sa.Column("final_intent", sa.Text(), nullable=True),
        sa.Column("final_decision_id", sa.Uuid(), nullable=True),
        _ts("decided_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_round_items")),
        _fk(ITEMS, "round_id", ROUNDS, ondelete="CASCADE"),
        _fk(ITEMS, "lease_owner", USERS),
        sa.UniqueConstraint("round_id", "log_id", name="uq_review_round_items_round_id_log_id"),
        sa.CheckConstraint(_in("state", ITEM_STATES), name=op.f("ck_review_round_items_state")),
        sa.CheckConstraint(
            "reviews_needed IN (1, 2)", name=op.f("ck_review_round_items_reviews_needed")
        ),
    )
    # The claim reads the first pending items of a round by position (the first index).
    _indexes(ITEMS, ("round_id", "state", "position"), ("group_id",), ("lease_owner",))

    op.create_table(
        DECISIONS,
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("round_id", sa.Uuid(), nullable=True),
        sa.Column("item_id", sa.Uuid(), nullable=True),
        sa.Column("log_id", sa.Uuid(), nullable=False),
        sa.Column("reviewer_id", sa.Uuid(), nullable=True),
        sa.Column("reviewer", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("before_intent", sa.Text(), nullable=True),
        sa.Column("after_intent", sa.Text(), nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("group_id", sa.Uuid(), nullable=True),
        sa.Column("batch_id", sa.Uuid(), nullable=True),
        sa.Column("undoes", sa.Uuid(), nullable=True),
        sa.Column("applied", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("prior_corrected_intent", sa.Text(), nullable=True),
        sa.Column("prior_correction_notes", sa.Text(), nullable=True),
        _ts("prior_corrected_at"),
        _ts("created_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_decisions")),
        _fk(DECISIONS, "round_id", ROUNDS),
        _fk(DECISIONS, "item_id", ITEMS),
        _fk(DECISIONS, "reviewer_id", USERS),
        _fk(DECISIONS, "undoes", DECISIONS),
        sa.CheckConstraint(_in("action", ACTIONS), name=op.f("ck_review_decisions_action")),
        sa.CheckConstraint(
            _in("source", ("ui", "file", "label_studio")), name=op.f("ck_review_decisions_source")
        ),
    )
    _indexes(
        DECISIONS,
        ("item_id",),
        ("reviewer_id", "round_id", "created_at"),
        ("undoes",),
        ("log_id",),
        ("batch_id",),
    )

    op.create_table(
        PROPOSALS,
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("intent", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("round_id", sa.Uuid(), nullable=True),
        sa.Column("proposed_by", sa.Uuid(), nullable=True),
        _ts("proposed_at", nullable=False),
        sa.Column("decided_by", sa.Uuid(), nullable=True),
        _ts("decided_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_intent_proposals")),
        sa.UniqueConstraint("intent", name=op.f("uq_review_intent_proposals_intent")),
        _fk(PROPOSALS, "round_id", ROUNDS),
        _fk(PROPOSALS, "proposed_by", USERS),
        _fk(PROPOSALS, "decided_by", USERS),
        sa.CheckConstraint(
            _in("status", ("proposed", "accepted", "rejected")),
            name=op.f("ck_review_intent_proposals_status"),
        ),
    )

    # The workbench connects as a member of the pipeline role (docs/DATABASE.md); the
    # online application role gets nothing here.
    grant_pipeline_tables(TABLES)


def downgrade() -> None:
    revoke_pipeline_tables(TABLES)
    for table in reversed(TABLES):
        op.drop_table(table)
