"""Row-level security on nlu_prompt_logs (PostgreSQL): users see only their own logs; planner
statistics for the confidence-bucket query.

Two NOLOGIN group roles (created here when missing; see docs/DATABASE.md for login users):

- ``prompt_capture_app``: the online application. Sees and changes only rows whose ``user_id``
  equals the transaction's ``app.user_id`` setting (``set_config('app.user_id', uid, true)``,
  done by ``capture.repository.user_scope``). Without a scope it sees nothing.
- ``prompt_capture_pipeline``: the Prefect flows and the capture writer. Reads and writes all rows.

RLS is enabled and FORCEd, so the table owner is subject to policies as well; a third policy lets
the owner (migrations, admin work) reach every row unless it sets a user scope itself, in which
case it is scoped like the app. Superusers and BYPASSRLS roles skip RLS entirely. PostgreSQL
refuses ``COPY ... FROM`` for any role that RLS applies to (the FORCEd owner included): a bulk
writer that uses COPY must log in with BYPASSRLS (see docs/DATABASE.md) or use INSERT.

SQLite has no row-level security: nothing changes there, and the repository's user-scoped calls
filter with ``WHERE user_id = :uid`` instead.
"""

from __future__ import annotations

from alembic import op

from migrations.helpers import APP_ROLE, PIPELINE_ROLE, is_postgres

revision = "0003"
down_revision = "0002"

TABLE = "nlu_prompt_logs"
ROLE_MARKER = "prompt-capture: created by migration 0003"

APP_POLICY = "nlu_prompt_logs_app_own_rows"
PIPELINE_POLICY = "nlu_prompt_logs_pipeline_all_rows"
OWNER_POLICY = "nlu_prompt_logs_owner_rows"

# Planner statistics on the confidence-bucket expression of capture.dialect_sql.confidence_tenths
# (PostgreSQL text, verbatim), so GROUP BY it is estimated at ~11 groups and hashed instead of
# sorting the whole window. Statistics cost nothing at insert time (computed by ANALYZE).
TENTHS_STATISTICS = "nlu_prompt_logs_confidence_tenths"
TENTHS_EXPRESSION = (
    "(CASE WHEN CAST(confidence AS DOUBLE PRECISION) >= 0.1"
    " THEN (CAST(floor(CAST(confidence AS DOUBLE PRECISION) * 1000000 + 0.5) AS BIGINT) + 50000)"
    " / 100000"
    " ELSE (CAST(floor(CAST(confidence AS DOUBLE PRECISION) * 10000000 + 0.5) AS BIGINT) + 500000)"
    " / 1000000 END)"
)

# The transaction's user scope; '' (a reset custom setting) and unset both mean "no scope".
SCOPE = "NULLIF(current_setting('app.user_id', true), '')"


def _scalar(sql: str) -> str:
    value = op.get_bind().exec_driver_sql(sql).scalar()
    return str(value)


def _create_role(name: str) -> None:
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN
                BEGIN
                    CREATE ROLE {name} NOLOGIN;
                    COMMENT ON ROLE {name} IS '{ROLE_MARKER}';
                EXCEPTION
                    WHEN duplicate_object OR unique_violation THEN
                        NULL;  -- created concurrently by another migration run
                    WHEN insufficient_privilege THEN
                        RAISE EXCEPTION 'cannot create role {name}: %', SQLERRM
                            USING HINT = 'run the migration as a role with CREATEROLE, or have '
                                'an administrator run: CREATE ROLE {name} NOLOGIN; '
                                '(see docs/DATABASE.md)';
                END;
            END IF;
        END
        $$
        """
    )


def _drop_role_if_ours(name: str) -> None:
    """Drop a role this migration created, unless it still has members or other databases use
    it (roles are cluster-wide)."""
    op.execute(
        f"""
        DO $$
        DECLARE
            role_oid oid := (SELECT oid FROM pg_roles WHERE rolname = '{name}');
        BEGIN
            IF role_oid IS NULL
               OR shobj_description(role_oid, 'pg_authid') IS DISTINCT FROM '{ROLE_MARKER}'
               OR EXISTS (SELECT 1 FROM pg_auth_members WHERE roleid = role_oid) THEN
                RETURN;
            END IF;
            BEGIN
                DROP ROLE {name};
            EXCEPTION
                WHEN dependent_objects_still_exist OR insufficient_privilege THEN
                    RAISE NOTICE 'keeping role {name}: %', SQLERRM;
            END;
        END
        $$
        """
    )


def upgrade() -> None:
    if not is_postgres():
        return
    schema = _scalar("SELECT current_schema()")
    owner = _scalar(
        f"SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = '{TABLE}'::regclass"
    )
    _create_role(APP_ROLE)
    _create_role(PIPELINE_ROLE)

    op.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {APP_ROLE}, {PIPELINE_ROLE}')
    # The app logs, reads and updates its users' rows (RLS narrows these to the scoped user).
    op.execute(f"GRANT SELECT, INSERT, UPDATE ON {TABLE} TO {APP_ROLE}")
    # The flows export, correct, copy to the training store and delete expired rows.
    op.execute(
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE}, nlu_training_examples TO {PIPELINE_ROLE}"
    )
    # Both check the schema revision at start (capture.db.ensure_migrated).
    op.execute(f"GRANT SELECT ON alembic_version TO {APP_ROLE}, {PIPELINE_ROLE}")

    op.execute(f"ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {TABLE} FORCE ROW LEVEL SECURITY")
    op.execute(
        f"""
        CREATE POLICY {APP_POLICY} ON {TABLE} FOR ALL TO {APP_ROLE}
            USING (user_id = {SCOPE}::uuid)
            WITH CHECK (user_id = {SCOPE}::uuid)
        """
    )
    op.execute(
        f"""
        CREATE POLICY {PIPELINE_POLICY} ON {TABLE} FOR ALL TO {PIPELINE_ROLE}
            USING (true) WITH CHECK (true)
        """
    )
    # FORCE makes the owner subject to RLS too: give it every row unless it scopes itself.
    op.execute(
        f"""
        CREATE POLICY {OWNER_POLICY} ON {TABLE} FOR ALL TO "{owner}"
            USING ({SCOPE} IS NULL OR user_id = {SCOPE}::uuid)
            WITH CHECK ({SCOPE} IS NULL OR user_id = {SCOPE}::uuid)
        """
    )
    if int(_scalar("SHOW server_version_num")) >= 140000:  # expression statistics: PG 14+
        op.execute(
            f"CREATE STATISTICS IF NOT EXISTS {TENTHS_STATISTICS} ON ({TENTHS_EXPRESSION}) "
            f"FROM {TABLE}"
        )


def downgrade() -> None:
    if not is_postgres():
        return
    schema = _scalar("SELECT current_schema()")
    op.execute(f"DROP STATISTICS IF EXISTS {TENTHS_STATISTICS}")
    for policy in (OWNER_POLICY, PIPELINE_POLICY, APP_POLICY):
        op.execute(f"DROP POLICY IF EXISTS {policy} ON {TABLE}")
    op.execute(f"ALTER TABLE {TABLE} NO FORCE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {TABLE} DISABLE ROW LEVEL SECURITY")
    for role in (APP_ROLE, PIPELINE_ROLE):
        op.execute(
            f"""
            DO $$
            BEGIN
                IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN
                    REVOKE ALL ON {TABLE}, nlu_training_examples, alembic_version FROM {role};
                    REVOKE USAGE ON SCHEMA "{schema}" FROM {role};
                END IF;
            END
            $$
            """
        )
        _drop_role_if_ours(role)
