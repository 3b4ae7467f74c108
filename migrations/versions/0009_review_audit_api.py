"""Review audit for every writer of a correction: source ``api``, and the application role may
append audit rows.

``capture.repository.add_prompt_correction`` (the online API, run as the application role of
migration 0003) now writes the same ``review_decisions`` audit row as the workbench and the file
import (``capture.review_audit``), with source ``api``. This widens the source check to
``ui | file | label_studio | api`` and, on PostgreSQL, grants the application role ``INSERT``
(only: it reads, changes and deletes nothing there) on ``review_decisions``.
"""

from __future__ import annotations

from alembic import op

from migrations.helpers import APP_ROLE, is_postgres, sql_in, when_roles_exist

revision = "0009"
down_revision = "0008"

TABLE = "review_decisions"
CHECK = "ck_review_decisions_source"
NEW = ("ui", "file", "label_studio", "api")
OLD = ("ui", "file", "label_studio")


def _replace_check(values: tuple[str, ...]) -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_constraint(op.f(CHECK), type_="check")
        # the full name: the naming convention must not prefix it again
        batch.create_check_constraint(op.f(CHECK), sql_in("source", values))


def upgrade() -> None:
    _replace_check(NEW)
    if is_postgres():
        op.execute(f"GRANT INSERT ON {TABLE} TO {APP_ROLE}")


def downgrade() -> None:
    when_roles_exist((APP_ROLE, f"REVOKE INSERT ON {TABLE} FROM {APP_ROLE}"))
    op.execute(f"DELETE FROM {TABLE} WHERE source = 'api'")
    _replace_check(OLD)
