"""Monitoring rollup: hourly and daily aggregates of nlu_prompt_logs, and change tracking.

The three monitoring statistics (confidence buckets, intent distribution, success rate by intent)
read these aggregates for closed hours and ``nlu_prompt_logs`` itself only for the rest (see
``capture.stats_rollup.plan_stats_cover`` and docs/DATABASE.md "Monitoring rollup"):

- ``nlu_prompt_stats_hourly`` / ``nlu_prompt_stats_daily``: per UTC hour (day) and predicted
  intent: rows, rows with a confidence, the sum of confidence (double), corrections, rows with an
  outcome, successes, and the row count of every confidence bucket (``tenths_0`` .. ``tenths_10``
  = ``capture.dialect_sql.confidence_tenths``, ``tenths_null`` = NULL confidence). Enough to
  reproduce the three statistics exactly.
- ``nlu_prompt_stats_state``: one row. ``watermark``: hours before it are rolled up (NULL: never
  refreshed, the statistics read the raw table); ``late_after_seconds``: the "late change" age
  the PostgreSQL triggers use (below).
- ``nlu_prompt_stats_dirty``: hours whose rows changed after they may have been rolled up (late
  outcomes and corrections, spool replays, deletes). The statistics read such an hour from the
  raw table until ``refresh`` recomputes it, so they never differ from the raw computation.

Change tracking (triggers; the capture writer's hot path fires none of them):

- PostgreSQL: a row trigger marks the hour of a row inserted, or of a statistics column updated,
  when its ``created_at`` is older than ``clock_timestamp() - late_after_seconds``; a statement
  trigger (transition table) marks the hours of deleted rows the same way; ``TRUNCATE`` empties
  the rollup. Marks are keyed by (hour, transaction id), so a refresh consumes exactly the marks
  whose changes it can see. The refresh never rolls up an hour younger than that age and first
  waits for the transactions that were writing the table (``capture.stats_rollup.refresh_begin``).
- SQLite (one writer at a time): row triggers mark the hour of any insert, update of a
  statistics column, or delete whose ``created_at`` is before the watermark.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from migrations.helpers import APP_ROLE, PIPELINE_ROLE, is_postgres

revision = "0004"
down_revision = "0003"

LOGS = "nlu_prompt_logs"
HOURLY = "nlu_prompt_stats_hourly"
DAILY = "nlu_prompt_stats_daily"
STATE = "nlu_prompt_stats_state"
DIRTY = "nlu_prompt_stats_dirty"

#: A change to a row older than this (at the time of the change) marks its hour.
LATE_AFTER_SECONDS = 300
#: The columns the statistics read: an UPDATE of any other column marks nothing.
STAT_COLUMNS = (
    "predicted_intent",
    "confidence",
    "was_successful",
    "corrected_intent",
    "created_at",
)
TENTHS = tuple(range(11))

# SQLite stores timestamps as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC); the hour in the same format
# (capture.dialect_sql.utc_hour compiles to the same text).
SQLITE_HOUR = "strftime('%Y-%m-%d %H:00:00.000000', {})"


def _measures() -> list[sa.Column[object]]:
    count = sa.BigInteger()
    columns: list[sa.Column[object]] = [
        sa.Column("predicted_intent", sa.Text(), nullable=False),
        sa.Column("prompts", count, nullable=False),
        sa.Column("confidence_count", count, nullable=False),
        sa.Column("confidence_sum", sa.Float(precision=53), nullable=False),
        sa.Column("corrections", count, nullable=False),
        sa.Column("outcomes", count, nullable=False),
        sa.Column("successes", count, nullable=False),
    ]
    columns += [sa.Column(f"tenths_{k}", count, nullable=False) for k in TENTHS]
    columns.append(sa.Column("tenths_null", count, nullable=False))
    return columns


def upgrade() -> None:
    ts = sa.DateTime(timezone=True)
    op.create_table(
        HOURLY,
        sa.Column("hour", ts, nullable=False),
        *_measures(),
        sa.PrimaryKeyConstraint("hour", "predicted_intent", name=op.f(f"pk_{HOURLY}")),
    )
    op.create_table(
        DAILY,
        sa.Column("day", ts, nullable=False),
        *_measures(),
        sa.PrimaryKeyConstraint("day", "predicted_intent", name=op.f(f"pk_{DAILY}")),
    )
    op.create_table(
        STATE,
        sa.Column("id", sa.SmallInteger(), nullable=False),
        sa.Column("watermark", ts, nullable=True),
        sa.Column("late_after_seconds", sa.Integer(), nullable=False),
        sa.Column("refreshed_at", ts, nullable=True),
        sa.CheckConstraint("id = 1", name=op.f(f"ck_{STATE}_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{STATE}")),
    )
    op.create_table(
        DIRTY,
        sa.Column("hour", ts, nullable=False),
        # The marking transaction (PostgreSQL); 0 on SQLite, whose writers are serialised.
        sa.Column("txid", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("hour", "txid", name=op.f(f"pk_{DIRTY}")),
    )
    op.execute(
        sa.text(
            f"INSERT INTO {STATE} (id, watermark, late_after_seconds) VALUES (1, NULL, :late)"
        ).bindparams(late=LATE_AFTER_SECONDS)
    )
    if is_postgres():
        _postgres_triggers()
    else:
        _sqlite_triggers()


def _postgres_triggers() -> None:
    schema = str(op.get_bind().exec_driver_sql("SELECT current_schema()").scalar())
    dirty = f'"{schema}".{DIRTY}'
    late = f"clock_timestamp() - interval '{LATE_AFTER_SECONDS} seconds'"
    txid = "pg_current_xact_id()::text::bigint"
    # SECURITY DEFINER: the application role may write logs without any grant on the rollup.
    # Called only for late rows (the WHEN clause below), so its cost stays off the hot path.
    op.execute(
        f"""
        CREATE FUNCTION nlu_prompt_stats_mark_row() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
            IF TG_OP = 'UPDATE' THEN
                INSERT INTO {dirty} (hour, txid)
                VALUES (date_trunc('hour', OLD.created_at, 'UTC'), {txid})
                ON CONFLICT DO NOTHING;
            END IF;
            INSERT INTO {dirty} (hour, txid)
            VALUES (date_trunc('hour', NEW.created_at, 'UTC'), {txid})
            ON CONFLICT DO NOTHING;
            RETURN NULL;
        END;
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION nlu_prompt_stats_mark_deleted() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
            INSERT INTO {dirty} (hour, txid)
            SELECT DISTINCT date_trunc('hour', created_at, 'UTC'), {txid}
            FROM old_rows WHERE created_at < {late}
            ON CONFLICT DO NOTHING;
            RETURN NULL;
        END;
        $$
        """
    )
    op.execute(
        f"""
        CREATE FUNCTION nlu_prompt_stats_reset() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
            DELETE FROM "{schema}".{HOURLY};
            DELETE FROM "{schema}".{DAILY};
            DELETE FROM {dirty};
            UPDATE "{schema}".{STATE} SET watermark = NULL;
            RETURN NULL;
        END;
        $$
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER trg_nlu_prompt_logs_stats_insert
        AFTER INSERT ON {LOGS} FOR EACH ROW
        WHEN (NEW.created_at < {late})
        EXECUTE FUNCTION nlu_prompt_stats_mark_row()
        """
    )
    changed = " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in STAT_COLUMNS)
    op.execute(
        f"""
        CREATE TRIGGER trg_nlu_prompt_logs_stats_update
        AFTER UPDATE OF {", ".join(STAT_COLUMNS)} ON {LOGS} FOR EACH ROW
        WHEN ((OLD.created_at < {late} OR NEW.created_at < {late}) AND ({changed}))
        EXECUTE FUNCTION nlu_prompt_stats_mark_row()
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER trg_nlu_prompt_logs_stats_delete
        AFTER DELETE ON {LOGS} REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION nlu_prompt_stats_mark_deleted()
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER trg_nlu_prompt_logs_stats_truncate
        AFTER TRUNCATE ON {LOGS} FOR EACH STATEMENT EXECUTE FUNCTION nlu_prompt_stats_reset()
        """
    )
    for function in ("mark_row()", "mark_deleted()", "reset()"):
        op.execute(f"REVOKE ALL ON FUNCTION nlu_prompt_stats_{function} FROM PUBLIC")
    # Roles of migration 0003: the flows refresh and read the rollup; the application reads only
    # the bookkeeping, so its statistics stay on the raw table, where RLS scopes them.
    op.execute(
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {HOURLY}, {DAILY}, {STATE}, {DIRTY} "
        f"TO {PIPELINE_ROLE}"
    )
    op.execute(f"GRANT SELECT ON {STATE}, {DIRTY} TO {APP_ROLE}")


def _sqlite_triggers() -> None:
    watermark = f"(SELECT watermark FROM {STATE} WHERE id = 1)"

    def mark(row: str) -> str:
        hour = SQLITE_HOUR.format(f"{row}.created_at")
        return (
            f"INSERT OR IGNORE INTO {DIRTY} (hour, txid) "
            f"SELECT {hour}, 0 WHERE {row}.created_at < {watermark};"
        )

    op.execute(
        f"""
        CREATE TRIGGER trg_nlu_prompt_logs_stats_insert AFTER INSERT ON {LOGS}
        WHEN NEW.created_at < {watermark}
        BEGIN {mark("NEW")} END
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER trg_nlu_prompt_logs_stats_update
        AFTER UPDATE OF {", ".join(STAT_COLUMNS)} ON {LOGS}
        WHEN OLD.created_at < {watermark} OR NEW.created_at < {watermark}
        BEGIN {mark("OLD")} {mark("NEW")} END
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER trg_nlu_prompt_logs_stats_delete AFTER DELETE ON {LOGS}
        WHEN OLD.created_at < {watermark}
        BEGIN {mark("OLD")} END
        """
    )


def downgrade() -> None:
    for trigger in ("insert", "update", "delete", "truncate"):
        if trigger == "truncate" and not is_postgres():
            continue
        on = f" ON {LOGS}" if is_postgres() else ""
        op.execute(f"DROP TRIGGER IF EXISTS trg_nlu_prompt_logs_stats_{trigger}{on}")
    if is_postgres():
        for function in ("mark_row()", "mark_deleted()", "reset()"):
            op.execute(f"DROP FUNCTION IF EXISTS nlu_prompt_stats_{function}")
    for table in (DIRTY, STATE, DAILY, HOURLY):
        op.drop_table(table)
