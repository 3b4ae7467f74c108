"""The monitor's state in the database: the hours it checked, the alerts it sent, its markers.

- ``monitor_hours``: one row per aligned UTC hour the monitor has checked (``hour`` = its start,
  the primary key), with when, by which run, and what it found (prompts, breaches). A run
  claims the completed hours after the newest one here with ``INSERT ... ON CONFLICT DO
  NOTHING``: two overlapping runs never check one hour twice, and a late or missed run leaves
  no gap (the next run checks every hour since).
- ``monitor_alerts``: one row per alert and channel, unique on ``(check_name, scope, channel,
  hour)``; inserted BEFORE the alert is sent, so of two overlapping runs only the one whose
  insert wins sends it. ``status``: ``sending`` (claimed by ``run_id`` at ``claimed_at``),
  ``sent``, ``failed`` (retried by a later run).
- ``monitor_markers``: named times; ``weekly_cycle_success`` is the weekly cycle's last success,
  read by the stale-cycle check (it replaces ``HOME/monitor/weekly_cycle.json``, and
  ``monitor_alerts`` replaces ``HOME/monitor/alerts_sent.json``).

The same tables on SQLite and PostgreSQL; on PostgreSQL the pipeline role (migration 0003) gets
``SELECT, INSERT, UPDATE, DELETE`` on them, the application role nothing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from migrations.helpers import grant_pipeline_tables, revoke_pipeline_tables, sql_in
from migrations.helpers import timestamp as _ts

revision = "0006"
down_revision = "0005"

HOURS = "monitor_hours"
ALERTS = "monitor_alerts"
MARKERS = "monitor_markers"
TABLES = (HOURS, ALERTS, MARKERS)
ALERT_STATES = ("sending", "sent", "failed")


def upgrade() -> None:
    op.create_table(
        HOURS,
        _ts("hour", nullable=False),
        _ts("checked_at", nullable=False),
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("prompts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("breaches", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("hour", name=op.f("pk_monitor_hours")),
    )
    op.create_table(
        ALERTS,
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("check_name", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        _ts("hour", nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("sample", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("run_id", sa.Text(), nullable=False),
        _ts("created_at", nullable=False),
        _ts("claimed_at", nullable=False),
        _ts("sent_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitor_alerts")),
        sa.UniqueConstraint(
            "check_name",
            "scope",
            "channel",
            "hour",
            name="uq_monitor_alerts_check_name_scope_channel_hour",
        ),
        sa.CheckConstraint(sql_in("status", ALERT_STATES), name=op.f("ck_monitor_alerts_status")),
    )
    # A run retries the failed alerts of the last hours: by status, then hour.
    op.create_index("ix_monitor_alerts_status_hour", ALERTS, ["status", "hour"])
    op.create_table(
        MARKERS,
        sa.Column("name", sa.Text(), nullable=False),
        _ts("at", nullable=False),
        _ts("updated_at", nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_monitor_markers")),
    )
    grant_pipeline_tables(TABLES)


def downgrade() -> None:
    revoke_pipeline_tables(TABLES)
    for table in reversed(TABLES):
        op.drop_table(table)
