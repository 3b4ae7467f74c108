"""nlu_prompt_logs partitioned by RANGE (created_at) on PostgreSQL; SQLite keeps the plain table.

Upgrade (one transaction, the table locked ACCESS EXCLUSIVE for its duration):

1. record what hangs on the table: its indexes, foreign keys, extended statistics, triggers,
   row-level-security flags and policies, grants and owner (from the catalogs, so whatever 0001,
   0003 and 0004 made, and whatever an administrator changed since, carries over);
2. rename it, create ``nlu_prompt_logs`` ``(LIKE old INCLUDING DEFAULTS CONSTRAINTS STORAGE)
   PARTITION BY RANGE (created_at)`` with a DEFAULT partition (catches any row outside the created
   ranges, so no insert ever fails) and one partition per UTC day (or ISO week:
   ``PROMPT_CAPTURE_PARTITION_INTERVAL``) from the oldest row (at most ``MAX_BACKFILL_PERIODS``
   back) to ``AHEAD_DAYS`` after now;
3. copy every row (``INSERT ... SELECT *``, before any index or trigger exists), check the count,
   drop the old table;
4. primary key ``(id, created_at)`` (PostgreSQL requires the partition key in every unique
   constraint), then the recorded objects again; plus one trigger of its own: a row whose
   ``created_at`` moves to another partition is deleted and inserted by PostgreSQL, which fires
   neither the UPDATE row trigger nor the DELETE statement trigger of 0004, so a BEFORE UPDATE
   trigger marks both hours dirty; ANALYZE.

Later partitions are created ahead of time, and expired ones detached and dropped, by the daily
retention flow (``capture.partitions``, ``tasks.retention``) running as the table owner.

Downgrade reverses it: a plain table with primary key ``(id)``, the same rows (refused, naming an
id, when two rows share an id), the recorded objects again. Tables left by an interrupted
retention (``nlu_prompt_logs_expired_*``) are not touched.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from alembic import op
from sqlalchemy import Connection, text

from migrations.helpers import is_postgres

revision = "0007"
down_revision = "0006"

LOGS = "nlu_prompt_logs"
STAGING = "nlu_prompt_logs_0007_staging"
DEFAULT_PARTITION = f"{LOGS}_default"
PK = f"pk_{LOGS}"
#: Partitions created ahead of now (the retention flow keeps this many days ahead).
AHEAD_DAYS = 14
#: Older rows than this many periods before now stay in the DEFAULT partition.
MAX_BACKFILL_PERIODS = 400
#: 0004's "late change" age, for the row-movement trigger.
LATE_AFTER_SECONDS = 300
MOVE_TRIGGER = "trg_nlu_prompt_logs_stats_move"
MOVE_FUNCTION = "nlu_prompt_stats_mark_moved"
_POLICY_COMMANDS = {"*": "ALL", "r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}


def _interval() -> str:
    from capture.settings import get_settings

    return get_settings().partition_interval


# --------------------------------------------------------------------------- recorded objects


class _Dependents:
    """What must be created again on the new table (SQL statements, in order). A plain class:
    Alembic loads this file outside ``sys.modules``, where ``@dataclass`` cannot resolve it."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.indexes: list[str] = []
        self.constraints: list[str] = []
        self.statistics: list[str] = []
        self.triggers: list[str] = []
        self.security: list[str] = []
        self.grants: list[str] = []

    def statements(self) -> list[str]:
        return [
            *self.indexes,
            *self.constraints,
            *self.statistics,
            *self.triggers,
            *self.security,
            *self.grants,
        ]


def _quote(conn: Connection, name: str) -> str:
    return str(conn.execute(text("SELECT quote_ident(:n)"), {"n": name}).scalar_one())


def _record(conn: Connection) -> _Dependents:
    """The objects on ``nlu_prompt_logs`` except its primary key and CHECK constraints (LIKE
    copies those), as statements that create them on a table of the same name."""
    oid = conn.execute(text(f"SELECT CAST('{LOGS}' AS regclass)::oid")).scalar_one()
    owner = conn.execute(
        text("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = :o"), {"o": oid}
    ).scalar_one()
    found = _Dependents(owner=str(owner))
    for (sql,) in conn.execute(
        text(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = :o "
            "AND NOT indisprimary ORDER BY indexrelid"
        ),
        {"o": oid},
    ):
        found.indexes.append(re.sub(r" ON ONLY ", " ON ", str(sql), count=1))
    for name, definition in conn.execute(
        text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = :o AND contype IN ('f', 'u', 'x') ORDER BY oid"
        ),
        {"o": oid},
    ):
        found.constraints.append(
            f"ALTER TABLE {LOGS} ADD CONSTRAINT {_quote(conn, name)} {definition}"
        )
    for (sql,) in conn.execute(
        text(
            "SELECT pg_get_statisticsobjdef(oid) FROM pg_statistic_ext WHERE stxrelid = :o "
            "ORDER BY oid"
        ),
        {"o": oid},
    ):
        found.statistics.append(str(sql))
    for (sql,) in conn.execute(
        text(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = :o "
            "AND NOT tgisinternal AND tgname <> :move ORDER BY tgname"
        ),
        {"o": oid, "move": MOVE_TRIGGER},
    ):
        found.triggers.append(str(sql))
    rls, force = conn.execute(
        text("SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = :o"),
        {"o": oid},
    ).one()
    if rls:
        found.security.append(f"ALTER TABLE {LOGS} ENABLE ROW LEVEL SECURITY")
    if force:
        found.security.append(f"ALTER TABLE {LOGS} FORCE ROW LEVEL SECURITY")
    for name, permissive, command, roles, using, check in conn.execute(
        text(
            "SELECT polname, polpermissive, polcmd, "
            "ARRAY(SELECT CASE WHEN r = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r)) "
            "END FROM unnest(polroles) AS r), "
            "pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid) "
            "FROM pg_policy WHERE polrelid = :o ORDER BY polname"
        ),
        {"o": oid},
    ):
        sql = (
            f"CREATE POLICY {_quote(conn, name)} ON {LOGS} "
            f"AS {'PERMISSIVE' if permissive else 'RESTRICTIVE'} "
            f"FOR {_POLICY_COMMANDS[str(command)]} TO {', '.join(roles)}"
        )
        if using is not None:
            sql += f" USING ({using})"
        if check is not None:
            sql += f" WITH CHECK ({check})"
        found.security.append(sql)
    for grantee, privilege, grantable in conn.execute(
        text(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' "
            "ELSE quote_ident(pg_get_userbyid(a.grantee)) END, a.privilege_type, a.is_grantable "
            "FROM pg_class AS c, aclexplode(c.relacl) AS a "
            "WHERE c.oid = :o AND a.grantee <> c.relowner ORDER BY 1, 2"
        ),
        {"o": oid},
    ):
        option = " WITH GRANT OPTION" if grantable else ""
        found.grants.append(f"GRANT {privilege} ON {LOGS} TO {grantee}{option}")
    return found


def _restore(conn: Connection, found: _Dependents, partitions: list[str]) -> None:
    for sql in found.statements():
        conn.exec_driver_sql(sql)
    me = conn.execute(text("SELECT current_user")).scalar_one()
    if found.owner != me:
        for table in (LOGS, *partitions):
            conn.exec_driver_sql(f"ALTER TABLE {table} OWNER TO {_quote(conn, found.owner)}")


# --------------------------------------------------------------------------- partitions


def _period_start(moment: datetime, interval: str) -> datetime:
    day = moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday()) if interval == "week" else day


def _step(interval: str) -> timedelta:
    return timedelta(days=7 if interval == "week" else 1)


def _create_partitions(conn: Connection, source: str, interval: str) -> list[str]:
    """The DEFAULT partition and one per period from the oldest row of ``source`` (at most
    ``MAX_BACKFILL_PERIODS`` back) to ``AHEAD_DAYS`` after now; returns their names."""
    now = conn.execute(text("SELECT now()")).scalar_one()
    oldest = conn.execute(text(f"SELECT min(created_at) FROM {source}")).scalar_one()
    step = _step(interval)
    start = _period_start(now, interval)
    if oldest is not None:
        start = min(
            start, max(_period_start(oldest, interval), start - MAX_BACKFILL_PERIODS * step)
        )
    end = now + timedelta(days=AHEAD_DAYS)
    conn.exec_driver_sql(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF {LOGS} DEFAULT")
    names = [DEFAULT_PARTITION]
    lo = start
    while lo < end:
        hi = lo + step
        name = f"{LOGS}_p{lo:%Y%m%d}"
        conn.exec_driver_sql(
            f"CREATE TABLE {name} PARTITION OF {LOGS} "
            f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
        )
        names.append(name)
        lo = hi
    return names


def _partitions(conn: Connection) -> list[str]:
    rows = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
            f"WHERE i.inhparent = CAST('{LOGS}' AS regclass) ORDER BY c.relname"
        )
    )
    return [str(r[0]) for r in rows]


def _copy_rows(conn: Connection, source: str, target: str) -> int:
    """Every row of ``source`` into ``target`` (same columns in the same order); refuses to go
    on unless both then hold the same number of rows."""
    copied = conn.execute(text(f"INSERT INTO {target} SELECT * FROM {source}")).rowcount
    counts = conn.execute(
        text(f"SELECT (SELECT count(*) FROM {source}), (SELECT count(*) FROM {target})")
    ).one()
    if counts[0] != counts[1] or copied != counts[0]:
        raise RuntimeError(
            f"migration 0007: copied {copied} rows from {source} to {target}, "
            f"found {counts[0]} and {counts[1]}; nothing was changed (the transaction rolls back)"
        )
    return int(copied)


def _move_trigger(conn: Connection) -> None:
    schema = conn.execute(text("SELECT current_schema()")).scalar_one()
    dirty = f'"{schema}".nlu_prompt_stats_dirty'
    late = f"clock_timestamp() - interval '{LATE_AFTER_SECONDS} seconds'"
    txid = "pg_current_xact_id()::text::bigint"
    conn.exec_driver_sql(
        f"""
        CREATE FUNCTION {MOVE_FUNCTION}() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
            INSERT INTO {dirty} (hour, txid)
            VALUES (date_trunc('hour', OLD.created_at, 'UTC'), {txid}),
                   (date_trunc('hour', NEW.created_at, 'UTC'), {txid})
            ON CONFLICT DO NOTHING;
            RETURN NEW;
        END;
        $$
        """
    )
    conn.exec_driver_sql(f"REVOKE ALL ON FUNCTION {MOVE_FUNCTION}() FROM PUBLIC")
    conn.exec_driver_sql(
        f"""
        CREATE TRIGGER {MOVE_TRIGGER}
        BEFORE UPDATE OF created_at ON {LOGS} FOR EACH ROW
        WHEN (OLD.created_at IS DISTINCT FROM NEW.created_at
              AND (OLD.created_at < {late} OR NEW.created_at < {late}))
        EXECUTE FUNCTION {MOVE_FUNCTION}()
        """
    )


def _relkind(conn: Connection) -> str:
    return str(
        conn.execute(
            text(f"SELECT relkind FROM pg_class WHERE oid = CAST('{LOGS}' AS regclass)")
        ).scalar_one()
    )


def upgrade() -> None:
    if not is_postgres():
        return
    conn = op.get_bind()
    if _relkind(conn) == "p":
        return  # already partitioned (e.g. created so by an administrator)
    conn.exec_driver_sql(f"LOCK TABLE {LOGS} IN ACCESS EXCLUSIVE MODE")
    found = _record(conn)
    conn.exec_driver_sql(f"ALTER TABLE {LOGS} RENAME TO {STAGING}")
    conn.exec_driver_sql(
        f"CREATE TABLE {LOGS} (LIKE {STAGING} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
        "INCLUDING STORAGE) PARTITION BY RANGE (created_at)"
    )
    partitions = _create_partitions(conn, STAGING, _interval())
    _copy_rows(conn, STAGING, LOGS)
    conn.exec_driver_sql(f"DROP TABLE {STAGING}")
    conn.exec_driver_sql(f"ALTER TABLE {LOGS} ADD CONSTRAINT {PK} PRIMARY KEY (id, created_at)")
    _restore(conn, found, partitions)
    _move_trigger(conn)
    conn.exec_driver_sql(f"ANALYZE {LOGS}")


def downgrade() -> None:
    if not is_postgres():
        return
    conn = op.get_bind()
    if _relkind(conn) != "p":
        return
    conn.exec_driver_sql(f"LOCK TABLE {LOGS} IN ACCESS EXCLUSIVE MODE")
    duplicate = conn.execute(
        text(f"SELECT id FROM {LOGS} GROUP BY id HAVING count(*) > 1 LIMIT 1")
    ).scalar()
    if duplicate is not None:
        raise RuntimeError(
            f"migration 0007 downgrade: id {duplicate} is used by more than one row of {LOGS} "
            "(allowed with the primary key (id, created_at)); the plain table's primary key "
            "is (id): delete or re-key the duplicates first"
        )
    conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {MOVE_TRIGGER} ON {LOGS}")
    conn.exec_driver_sql(f"DROP FUNCTION IF EXISTS {MOVE_FUNCTION}()")
    found = _record(conn)
    conn.exec_driver_sql(
        f"CREATE TABLE {STAGING} (LIKE {LOGS} INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
        "INCLUDING STORAGE)"
    )
    _copy_rows(conn, LOGS, STAGING)
    conn.exec_driver_sql(f"DROP TABLE {LOGS}")  # and its partitions
    conn.exec_driver_sql(f"ALTER TABLE {STAGING} RENAME TO {LOGS}")
    conn.exec_driver_sql(f"ALTER TABLE {LOGS} ADD CONSTRAINT {PK} PRIMARY KEY (id)")
    _restore(conn, found, [])
    conn.exec_driver_sql(f"ANALYZE {LOGS}")
