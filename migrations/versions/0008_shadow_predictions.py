"""Shadow predictions of a candidate model (production A/B, docs/AB_TESTING.md).

``nlu_shadow_predictions``: one append-only row per prompt a shadow candidate predicted after the
champion answered, keyed by the prompt's log id and ``created_at`` (the log row is never
UPDATEd for it) and the candidate version. No foreign key to ``nlu_prompt_logs``: dropping old
log partitions (0007, retention) must never be blocked by, or cascade into, this table; the
readout joins on ``(log_id, log_created_at)`` and ignores rows whose log is gone.

On PostgreSQL the application role (0003) may INSERT (the NLU service writes them), the pipeline
role may SELECT and DELETE (the readout and retention).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from migrations.helpers import APP_ROLE, PIPELINE_ROLE, when_roles_exist

revision = "0008"
down_revision = "0007"

TABLE = "nlu_shadow_predictions"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("log_id", sa.Uuid(), nullable=False),
        sa.Column("log_created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("candidate_version", sa.Text(), nullable=False),
        sa.Column("champion_version", sa.Text(), nullable=True),
        sa.Column("predicted_intent", sa.Text(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("predicted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("log_id", "candidate_version", name="pk_nlu_shadow_predictions"),
        sa.CheckConstraint(
            "confidence >= 0 AND confidence <= 1", name="ck_nlu_shadow_predictions_confidence"
        ),
    )
    op.create_index(
        "ix_nlu_shadow_predictions_candidate_created",
        TABLE,
        ["candidate_version", "log_created_at"],
    )
    when_roles_exist(
        (APP_ROLE, f"GRANT INSERT ON {TABLE} TO {APP_ROLE}"),
        (PIPELINE_ROLE, f"GRANT SELECT, INSERT, DELETE ON {TABLE} TO {PIPELINE_ROLE}"),
    )


def downgrade() -> None:
    op.drop_index("ix_nlu_shadow_predictions_candidate_created", table_name=TABLE)
    op.drop_table(TABLE)
