"""Which database a URL reaches: the identity the capture spool records in every segment.

A spool segment must be replayed only into the database it was written for (issue 13: rows
spooled while database A was down were replayed into database B started with the same home).
:class:`DatabaseIdentity` holds what identifies a database:

- always: the backend and a hash of the normalised URL (:func:`normalised_url`: no user name,
  no password, no connection options; host lower-cased, default port filled in);
- PostgreSQL, once the server has been reached: ``system_identifier`` (from
  ``pg_control_system()``, unique per cluster, made by ``initdb``) and ``current_database()``;
- SQLite: the resolved path of the database file.

Two identities match (:meth:`DatabaseIdentity.matches`) when they are the same backend and:
SQLite — the same file; PostgreSQL — the same ``(system_identifier, database)`` when both are
known (so ``localhost`` and ``127.0.0.1`` are the same database, and one host name that now
reaches another cluster is not), else the same URL hash (a segment written before the server was
ever reached records only its URL).

:func:`identity_from_url` needs no I/O; :func:`fetch_identity` connects (PostgreSQL) and fills
in the server's facts. The URL shown in messages never holds the password.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from capture import db

logger = logging.getLogger(__name__)

__all__ = ["DatabaseIdentity", "fetch_identity", "identity_from_url", "normalised_url"]

_HASH_CHARS = 16
_KEY_CHARS = 12
# Query parameters that say where the database is (the others are connection options).
_LOCATION_PARAMS = ("dbname", "host", "hostaddr", "port", "service")
_DEFAULT_PORTS = {"postgresql": 5432}


def _backend(drivername: str) -> str:
    name = drivername.split("+", 1)[0]
    return "postgresql" if name in ("postgres", "postgresql") else name


def normalised_url(url: str) -> str:
    """The database location of ``url`` as one canonical string (what the URL hash is of):
    ``postgresql://host:port/database[?host=...]`` (no user, password or connection options;
    host lower-cased; port 5432 when not given) or ``sqlite:///<resolved file path>``."""
    from sqlalchemy.engine import make_url

    path = db.sqlite_path(url)
    if path is not None:
        return f"sqlite:///{path}"
    parsed = make_url(url)
    backend = _backend(parsed.drivername)
    host = (parsed.host or "").lower()
    port = parsed.port or _DEFAULT_PORTS.get(backend)
    query = sorted(
        (key, ",".join(value) if isinstance(value, tuple) else value)
        for key, value in parsed.query.items()
        if key in _LOCATION_PARAMS
    )
    location = f"{host}:{port}" if port else host
    suffix = "?" + "&".join(f"{k}={v}" for k, v in query) if query else ""
    return f"{backend}://{location}/{parsed.database or ''}{suffix}"


def _hash(text: str, chars: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:chars]


@dataclass(frozen=True, slots=True)
class DatabaseIdentity:
    """What identifies one database (see the module docstring).

    ``backend``: ``postgresql`` or ``sqlite``; ``url``: the URL without its password (shown to
    people); ``url_hash``: 16 hex of the SHA-256 of :func:`normalised_url`;
    ``system_identifier`` / ``database``: PostgreSQL's, ``None`` until the server was reached;
    ``path``: the SQLite file, resolved.
    """

    backend: str
    url: str
    url_hash: str
    system_identifier: str | None = None
    database: str | None = None
    path: str | None = None

    @property
    def key(self) -> str:
        """12 hex naming this identity (the group id that ``prompt-capture spool`` shows)."""
        facts = [self.backend, self.url_hash, self.system_identifier, self.database, self.path]
        return _hash(json.dumps(facts), _KEY_CHARS)

    @property
    def server_known(self) -> bool:
        """True when the PostgreSQL server's facts are recorded (always True for SQLite)."""
        return self.backend != "postgresql" or self.system_identifier is not None

    def matches(self, other: DatabaseIdentity) -> bool:
        """True when ``self`` and ``other`` are the same database (module docstring)."""
        if self.backend != other.backend:
            return False
        if self.path is not None or other.path is not None:
            return self.path == other.path
        if self.server_known and other.server_known and self.backend == "postgresql":
            return (self.system_identifier, self.database) == (
                other.system_identifier,
                other.database,
            )
        return self.url_hash == other.url_hash

    def describe(self) -> str:
        """One line for people: ``postgresql+psycopg://app@db:5432/prod (PostgreSQL system
        7301234567890123456, database prod)``."""
        if self.path is not None:
            return f"{self.url} (SQLite file {self.path})"
        if self.backend == "postgresql":
            if self.system_identifier is None:
                return f"{self.url} (server not reached when written: known by its URL only)"
            return (
                f"{self.url} (PostgreSQL system {self.system_identifier}, database {self.database})"
            )
        return self.url

    def as_record(self) -> dict[str, str | None]:
        """The JSON object the spool writes (every field, ``None`` as ``null``)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: object) -> DatabaseIdentity:
        """An identity read back from :meth:`as_record`; ``ValueError`` for anything else."""
        if not isinstance(record, dict):
            raise ValueError(f"expected a database identity object, found {record!r:.80}")
        try:
            values: dict[str, Any] = {
                "backend": str(record["backend"]),
                "url": str(record["url"]),
                "url_hash": str(record["url_hash"]),
            }
        except KeyError as exc:
            raise ValueError(f"database identity without {exc.args[0]!r}") from None
        for name in ("system_identifier", "database", "path"):
            value = record.get(name)
            values[name] = None if value is None else str(value)
        return cls(**values)


def identity_from_url(url: str) -> DatabaseIdentity:
    """The identity ``url`` gives without connecting (PostgreSQL: no server facts yet)."""
    resolved = db.database_url(url)
    path = db.sqlite_path(resolved)
    from sqlalchemy.engine import make_url

    return DatabaseIdentity(
        backend=_backend(make_url(resolved).drivername),
        url=db.display_url(db.sync_url(resolved)),
        url_hash=_hash(normalised_url(resolved), _HASH_CHARS),
        path=None if path is None else str(path),
    )


async def fetch_identity(url: str) -> DatabaseIdentity:
    """The identity of the database ``url`` reaches, with the server's facts (PostgreSQL:
    ``pg_control_system().system_identifier`` and ``current_database()``; a role not allowed to
    call ``pg_control_system()`` gets ``system_identifier=None`` and a debug log).

    Raises what ``psycopg.AsyncConnection.connect`` raises when the server cannot be reached
    (``psycopg.OperationalError``, ``OSError``): the caller retries. SQLite: no I/O.
    """
    base = identity_from_url(url)
    if base.backend != "postgresql":
        return base
    import psycopg

    conn = await psycopg.AsyncConnection.connect(
        db.libpq_url(db.database_url(url)), autocommit=True, connect_timeout=5
    )
    async with conn:
        cur = await conn.execute("SELECT current_database()")
        row = await cur.fetchone()
        database = None if row is None else str(row[0])
        system: str | None = None
        try:
            cur = await conn.execute("SELECT system_identifier FROM pg_control_system()")
            row = await cur.fetchone()
            system = None if row is None else str(row[0])
        except psycopg.errors.InsufficientPrivilege as exc:
            logger.debug("pg_control_system() is not allowed for this role (%s)", exc)
    return DatabaseIdentity(
        backend=base.backend,
        url=base.url,
        url_hash=base.url_hash,
        system_identifier=system,
        database=database,
    )
