"""Review workbench users: argon2 password hashes, logins, and the failed-login limit.

The limit is counted in ``review_login_attempts`` (the database, so a restart does not reset it):
a login is refused, before the password is checked, when the user name or the client address has
``max_failures`` (10) failed attempts within the last ``window`` (15 minutes).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import Connection, func, insert, select, update

from capture.errors import UserError
from capture.ids import uuid7
from tasks.review_tables import ROLES, login_attempts, users

logger = logging.getLogger(__name__)

MAX_FAILURES: Final = 10
WINDOW: Final = timedelta(minutes=15)
MIN_PASSWORD_CHARS: Final = 8
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_hasher = PasswordHasher()
# Verified when the user does not exist, so an unknown name costs as much time as a known one.
_DUMMY_HASH = _hasher.hash("not a password of anyone")

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class ReviewUserError(UserError, ValueError):
    """A user cannot be created or changed as asked (bad name, role or password)."""


class LoginRateLimited(UserError):
    """Too many failed logins for this user name or client address; ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ReviewUser:
    """A workbench user as the app sees it (never the hash)."""

    id: uuid.UUID
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ReviewUserError(
            f"user name: expected 1-64 letters, digits or _ . @ -, found {name!r}; pick another"
        )
    return name


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ReviewUserError(f"role: expected one of {', '.join(ROLES)}, found {role!r}")
    return role


def _check_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        raise ReviewUserError(
            f"password: expected at least {MIN_PASSWORD_CHARS} characters, found "
            f"{len(password) if isinstance(password, str) else 0}; pipe a longer one to "
            "--password-stdin"
        )
    return password


def add_user(
    conn: Connection, name: str, *, role: str, password: str, now: Clock = _utc_now
) -> ReviewUser:
    """Create user ``name`` with ``role`` (reviewer | admin) and an argon2 hash of ``password``.

    Raises :class:`ReviewUserError` for a bad name, role or short password, or an existing name.
    The caller commits.
    """
    _check_name(name)
    _check_role(role)
    _check_password(password)
    if conn.execute(select(users.c.id).where(users.c.name == name)).first() is not None:
        raise ReviewUserError(
            f"user {name!r} exists already; use `prompt-capture review-user passwd {name}` "
            "to change the password"
        )
    user_id = uuid7()
    stamp = now()
    conn.execute(
        insert(users).values(
            id=user_id,
            name=name,
            role=role,
            password_hash=_hasher.hash(password),
            active=True,
            created_at=stamp,
            updated_at=stamp,
        )
    )
    logger.info("review user %s (%s) created", name, role)
    return ReviewUser(user_id, name, role)


def set_password(conn: Connection, name: str, password: str, *, now: Clock = _utc_now) -> None:
    """Replace the password of user ``name``; :class:`ReviewUserError` when there is none."""
    _check_password(password)
    done = conn.execute(
        update(users)
        .where(users.c.name == name)
        .values(password_hash=_hasher.hash(password), updated_at=now())
    )
    if done.rowcount == 0:
        raise ReviewUserError(f"no review user is called {name!r}; add it with review-user add")


def set_active(conn: Connection, name: str, active: bool, *, now: Clock = _utc_now) -> None:
    """Enable or disable user ``name`` (a disabled user's sessions stop working at once)."""
    done = conn.execute(
        update(users).where(users.c.name == name).values(active=active, updated_at=now())
    )
    if done.rowcount == 0:
        raise ReviewUserError(f"no review user is called {name!r}")


def get_user(conn: Connection, user_id: uuid.UUID) -> ReviewUser | None:
    """The active user with ``user_id``, or None (unknown or disabled)."""
    row = conn.execute(
        select(users.c.id, users.c.name, users.c.role).where(
            users.c.id == user_id, users.c.active.is_(True)
        )
    ).first()
    return None if row is None else ReviewUser(row.id, row.name, row.role)


def list_users(conn: Connection) -> list[tuple[str, str, bool]]:
    """Every user as ``(name, role, active)``, by name."""
    rows = conn.execute(select(users.c.name, users.c.role, users.c.active).order_by(users.c.name))
    return [(r.name, r.role, bool(r.active)) for r in rows]


def _failures_since(conn: Connection, column: str, value: str, since: datetime) -> int:
    col = login_attempts.c[column]
    stmt = select(func.count()).where(
        col == value, login_attempts.c.at > since, login_attempts.c.succeeded.is_(False)
    )
    return int(conn.execute(stmt).scalar_one())


def login(
    conn: Connection,
    name: str,
    password: str,
    *,
    client: str,
    now: Clock = _utc_now,
    max_failures: int = MAX_FAILURES,
    window: timedelta = WINDOW,
) -> ReviewUser | None:
    """Check ``name``/``password`` from ``client`` (an address); record the attempt.

    Returns the user, or None for a wrong name or password (the same answer for both). Raises
    :class:`LoginRateLimited` without checking the password when the name or the address has
    ``max_failures`` failures within ``window``. The caller commits (the attempt must be
    committed even when the login fails).
    """
    stamp = now()
    since = stamp - window
    name = name.strip() if isinstance(name, str) else ""
    for column, value, what in (("user_name", name, "user"), ("client", client, "address")):
        if _failures_since(conn, column, value, since) >= max_failures:
            minutes = int(window.total_seconds() // 60)
            raise LoginRateLimited(
                f"too many failed logins for this {what} ({max_failures} within {minutes} "
                f"minutes); wait {minutes} minutes or ask an admin",
                retry_after=int(window.total_seconds()),
            )
    row = conn.execute(
        select(users.c.id, users.c.name, users.c.role, users.c.password_hash).where(
            users.c.name == name, users.c.active.is_(True)
        )
    ).first()
    ok = False
    try:
        ok = _hasher.verify(row.password_hash if row is not None else _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        ok = False
    ok = ok and row is not None
    conn.execute(
        insert(login_attempts).values(
            id=uuid7(), user_name=name[:64], client=client[:128], succeeded=ok, at=stamp
        )
    )
    if not ok or row is None:
        logger.warning("failed review login for %r from %s", name[:64], client)
        return None
    if _hasher.check_needs_rehash(row.password_hash):
        conn.execute(
            update(users)
            .where(users.c.id == row.id)
            .values(password_hash=_hasher.hash(password), updated_at=stamp)
        )
    return ReviewUser(row.id, row.name, row.role)
