"""nlu_training_examples: the anonymised training store that outlives raw-log retention."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"

TABLE = "nlu_training_examples"


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.Uuid(), nullable=False),
        # sha256 of the raw log id: makes the retention copy idempotent without keeping a link.
        sa.Column("source_key", sa.Text(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("corrected", sa.Boolean(), nullable=False),
        sa.Column("confidence", sa.Float(precision=24), nullable=True),
        sa.Column("was_successful", sa.Boolean(), nullable=True),
        sa.Column("model_version", sa.Text(), nullable=True),
        sa.Column("week", sa.Date(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nlu_training_examples")),
        sa.UniqueConstraint("source_key", name=op.f("uq_nlu_training_examples_source_key")),
        sa.CheckConstraint(
            "confidence IS NULL OR (confidence >= 0 AND confidence <= 1)",
            name=op.f("ck_nlu_training_examples_confidence_range"),
        ),
    )
    op.create_index("ix_nlu_training_examples_week", TABLE, ["week"])


def downgrade() -> None:
    op.drop_index("ix_nlu_training_examples_week", table_name=TABLE)
    op.drop_table(TABLE)
