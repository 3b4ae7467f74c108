"""The workbench's settings: passed to ``create_app(settings)``, never read from the environment
inside the app (the CLI builds them from ``capture.settings``)."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from capture.errors import UserError
from capture.files import make_private_dir, write_text_atomic

logger = logging.getLogger(__name__)

SECRET_FILE = "review_ui/session_secret"


@dataclass(frozen=True, slots=True)
class WorkbenchSettings:
    """Everything the workbench needs.

    ``home``: PROMPT_CAPTURE_HOME (the registry under ``home/models`` gives the catalogue; the
    session secret is kept in ``home/review_ui/session_secret``, 0600, unless ``secret_key``).
    ``database_url``: the database (on PostgreSQL a login in the pipeline role).
    ``lease_minutes``: how long a reviewer holds an item (default 10).
    ``double_review_share``: share of a new round's items shown to two reviewers (default 0.1).
    ``https_only``: mark the session cookie ``Secure`` (set it behind HTTPS).
    """

    home: Path
    database_url: str
    lease_minutes: float = 10.0
    double_review_share: float = 0.1
    secret_key: str | None = None
    session_hours: float = 12.0
    https_only: bool = False
    catalog_ttl_seconds: float = 30.0
    max_failed_logins: int = 10
    login_window_minutes: float = 15.0

    def __post_init__(self) -> None:
        if not 0 < self.lease_minutes <= 24 * 60:
            raise UserError(
                f"lease_minutes: expected minutes in (0, 1440], found {self.lease_minutes!r}"
            )
        if not 0.0 <= self.double_review_share <= 1.0:
            raise UserError(
                f"double_review_share: expected a share in [0, 1], found "
                f"{self.double_review_share!r}"
            )
        if not self.database_url:
            raise UserError("database_url: expected a SQLAlchemy URL, found nothing")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def lease(self) -> timedelta:
        return timedelta(minutes=self.lease_minutes)

    @property
    def login_window(self) -> timedelta:
        return timedelta(minutes=self.login_window_minutes)

    def with_(self, **changes: Any) -> WorkbenchSettings:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    def session_secret(self) -> str:
        """``secret_key``, else the secret kept under ``home`` (created on first use, 0600), so
        sessions survive a restart."""
        if self.secret_key:
            return self.secret_key
        path = self.home / SECRET_FILE
        if path.is_file():
            value = path.read_text(encoding="utf-8").strip()
            if len(value) >= 32:
                return value
        make_private_dir(path.parent)
        value = secrets.token_urlsafe(48)
        write_text_atomic(path, value + "\n", private=True)
        logger.info("created the workbench session secret %s", path)
        return value
