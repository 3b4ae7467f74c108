"""Small pieces several migrations share: the dialect check, the two group roles 0003 creates
(PostgreSQL) and grants to them, a timestamp column, a check-constraint ``IN`` list.

Only for blocks that are the same in each migration that uses them: a helper here must never
change what an applied migration runs, so change none of these once a migration calls it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

#: The group roles of migration 0003: the online application and the pipeline (flows, workbench).
APP_ROLE = "prompt_capture_app"
PIPELINE_ROLE = "prompt_capture_pipeline"


def is_postgres() -> bool:
    """True when the migration runs on PostgreSQL (grants and roles exist only there)."""
    return op.get_bind().dialect.name == "postgresql"


def timestamp(name: str, *, nullable: bool = True) -> sa.Column[object]:
    """A ``timestamp with time zone`` column named ``name``."""
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def sql_in(column: str, values: tuple[str, ...]) -> str:
    """The check-constraint condition ``<column> IN ('a', 'b', ...)`` (each value as ``repr``)."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def grant_pipeline_tables(tables: tuple[str, ...]) -> None:
    """PostgreSQL: the pipeline role may read and write ``tables`` (``SELECT, INSERT, UPDATE,
    DELETE``); nothing on SQLite."""
    if is_postgres():
        op.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(tables)} TO {PIPELINE_ROLE}"
        )


def when_roles_exist(*steps: tuple[str, str]) -> None:
    """PostgreSQL: run each ``(role, statement)`` step's statement (a GRANT or REVOKE naming
    ``role``) only if that role exists, in one ``DO`` block; nothing on SQLite."""
    if is_postgres():
        checks = "".join(
            f"\n    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN"
            f"\n        {statement};"
            "\n    END IF;"
            for role, statement in steps
        )
        op.execute(f"DO $$\nBEGIN{checks}\nEND\n$$")


def revoke_pipeline_tables(tables: tuple[str, ...]) -> None:
    """PostgreSQL: undo :func:`grant_pipeline_tables` (when the pipeline role still exists);
    nothing on SQLite."""
    when_roles_exist((PIPELINE_ROLE, f"REVOKE ALL ON {', '.join(tables)} FROM {PIPELINE_ROLE}"))
