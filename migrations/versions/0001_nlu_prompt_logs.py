"""nlu_prompt_logs: the captured prompts, their predictions, outcomes and corrections."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from migrations.helpers import is_postgres

revision = "0001"
down_revision = None

TABLE = "nlu_prompt_logs"


def upgrade() -> None:
    json_type = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    ts = sa.DateTime(timezone=True)
    op.create_table(
        TABLE,
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("predicted_intent", sa.Text(), nullable=False),
        sa.Column("confidence", sa.Float(precision=24), nullable=True),
        sa.Column("secondary_intents", json_type, server_default="[]", nullable=True),
        sa.Column("corrected_intent", sa.Text(), nullable=True),
        sa.Column("correction_notes", sa.Text(), nullable=True),
        sa.Column("corrected_at", ts, nullable=True),
        sa.Column("was_successful", sa.Boolean(), nullable=True),
        sa.Column("workflow_type", sa.Text(), nullable=True),
        sa.Column("execution_error", sa.Text(), nullable=True),
        sa.Column("conversation_id", sa.Uuid(), nullable=True),
        sa.Column("message_index", sa.Integer(), nullable=True),
        sa.Column("model_version", sa.Text(), nullable=True),
        sa.Column("created_at", ts, server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", ts, server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint(
            "confidence >= 0 AND confidence <= 1", name=op.f("ck_nlu_prompt_logs_confidence_range")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nlu_prompt_logs")),
    )
    # Review queue: WHERE confidence < :t [AND created_at > :since] ORDER BY confidence.
    op.create_index("ix_nlu_prompt_logs_confidence_created_at", TABLE, ["confidence", "created_at"])
    # Monitoring windows: the statistics read only these columns, so the scans are index-only.
    op.create_index(
        "ix_nlu_prompt_logs_created_at",
        TABLE,
        ["created_at"],
        postgresql_include=["predicted_intent", "confidence", "was_successful"],
    )
    op.create_index("ix_nlu_prompt_logs_user_id", TABLE, ["user_id"])

    if not is_postgres():
        return
    # Partial indexes: failed workflows and corrected rows are small slices that queries seek.
    op.create_index(
        "ix_nlu_prompt_logs_failed_created_at",
        TABLE,
        ["created_at"],
        postgresql_where=sa.text("was_successful = false"),
    )
    op.create_index(
        "ix_nlu_prompt_logs_corrected_created_at",
        TABLE,
        ["created_at"],
        postgresql_where=sa.text("corrected_intent IS NOT NULL"),
    )
    # updated_at is maintained by the database on every UPDATE.
    op.execute(
        """
        CREATE OR REPLACE FUNCTION nlu_prompt_logs_touch_updated_at() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            NEW.updated_at := now();
            RETURN NEW;
        END;
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER trg_nlu_prompt_logs_updated_at
        BEFORE UPDATE ON nlu_prompt_logs
        FOR EACH ROW EXECUTE FUNCTION nlu_prompt_logs_touch_updated_at()
        """
    )
    # The spec references auth.users(id) (a Supabase-style auth schema). Add the foreign key
    # where that table exists; elsewhere user_id is a plain UUID.
    op.execute(
        """
        DO $$
        BEGIN
            IF to_regclass('auth.users') IS NOT NULL THEN
                ALTER TABLE nlu_prompt_logs
                    ADD CONSTRAINT fk_nlu_prompt_logs_user_id_users
                    FOREIGN KEY (user_id) REFERENCES auth.users(id);
            END IF;
        END;
        $$
        """
    )


def downgrade() -> None:
    if is_postgres():
        op.execute("DROP TRIGGER IF EXISTS trg_nlu_prompt_logs_updated_at ON nlu_prompt_logs")
        op.execute("DROP FUNCTION IF EXISTS nlu_prompt_logs_touch_updated_at()")
        op.drop_index("ix_nlu_prompt_logs_corrected_created_at", table_name=TABLE)
        op.drop_index("ix_nlu_prompt_logs_failed_created_at", table_name=TABLE)
    op.drop_index("ix_nlu_prompt_logs_user_id", table_name=TABLE)
    op.drop_index("ix_nlu_prompt_logs_created_at", table_name=TABLE)
    op.drop_index("ix_nlu_prompt_logs_confidence_created_at", table_name=TABLE)
    op.drop_table(TABLE)
