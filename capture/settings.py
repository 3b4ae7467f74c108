"""The one settings object of the project (environment prefix ``PROMPT_CAPTURE_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self, overload

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from capture.errors import UserError

ENV_PREFIX = "PROMPT_CAPTURE_"
#: The database backends this project runs on (the URL's scheme, before any ``+driver``).
DATABASE_BACKENDS = ("sqlite", "postgresql")

Durability = Literal["buffered", "spool", "fsync"]
PartitionInterval = Literal["day", "week"]


def normalise_database_url(url: str) -> str:
    """Return ``url`` with the driver this project uses for each backend.

    ``postgresql://`` and ``postgres://`` become ``postgresql+psycopg://`` (psycopg 3);
    ``sqlite://`` stays as it is (the async side adds ``+aiosqlite`` itself).
    """
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class SettingsError(UserError, ValueError):
    """A ``PROMPT_CAPTURE_*`` variable (environment or ``.env``) holds a value the settings
    refuse; the message names the variable, what was found and what is allowed."""


def home_problem(home: Path) -> str | None:
    """Why ``home`` cannot be a PROMPT_CAPTURE_HOME (it exists and is not a folder), or None."""
    if home.exists() and not home.is_dir():
        return "is a file, not a folder; pass a folder (it is created if missing)"
    return None


def database_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the database URL (not a URL, or a backend this project does not
    run on), or None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        return "is not a database URL"
    if backend not in DATABASE_BACKENDS:
        return f"backend {backend!r} is not supported"
    return None


def _settings_error(exc: ValidationError) -> SettingsError:
    """One message for every refused variable: name, value found (a database URL without its
    password), what is allowed, and the fix."""
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        variable = f"{ENV_PREFIX}{name.upper()}"
        found = error.get("input")
        if name == "database_url" and isinstance(found, str):
            from capture.db import display_url  # lazy: capture.db imports this module

            found = display_url(found)
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{variable}: found {found!r}; {message}")
    return SettingsError(
        "; ".join(problems) + " (fix or unset the variable, in the environment or .env)"
    )


#: The default SQLite database's file name under the home.
DATABASE_FILE = "prompt_capture.db"


class _HomeFolder:
    """A read-only attribute of :class:`HomeDirs`: the folder ``home / name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, dirs: None, owner: type) -> Self: ...
    @overload
    def __get__(self, dirs: HomeDirs, owner: type | None = None) -> Path: ...
    def __get__(self, dirs: HomeDirs | None, owner: type | None = None) -> Self | Path:
        return self if dirs is None else dirs.home / self.name


class HomeDirs:
    """The folders of a PROMPT_CAPTURE_HOME, derived from ``home`` (``tasks.layout`` draws the
    tree); shared by :class:`Settings` and ``tasks.layout.HomeLayout``. Nothing is created."""

    __slots__ = ()
    if TYPE_CHECKING:
        home: Path

    models_dir = _HomeFolder("models")
    data_dir = _HomeFolder("data")
    work_dir = _HomeFolder("work")
    exports_dir = _HomeFolder("exports")
    inbox_dir = _HomeFolder("inbox")
    reports_dir = _HomeFolder("reports")
    spool_dir = _HomeFolder("spool")

    @property
    def sqlite_url(self) -> str:
        """The default database: an SQLite file in the home (absolute path)."""
        return f"sqlite:///{(self.home / DATABASE_FILE).resolve()}"


class Settings(HomeDirs, BaseSettings):
    """Everything configurable, read once from the environment (and ``.env`` if present)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    home: Path = Field(
        default=Path(".prompt-capture"),
        description="Root for models, spool, exports, inbox and reports.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means an SQLite file under HOME.",
    )
    # Capture logger.
    durability: Durability = Field(
        default="buffered",
        description="buffered: memory queue, spooled on DB failure; spool: every row is appended "
        "to the spool file before process_message returns (survives SIGKILL); fsync: as spool "
        "and fsync'd (survives power loss).",
    )
    buffer_size: int = Field(default=100_000, ge=1, description="Rows held in memory at most.")
    batch_size: int = Field(default=5_000, ge=1, description="Rows per database write.")
    flush_interval_s: float = Field(default=0.05, gt=0, description="Longest wait before a write.")
    max_prompt_chars: int = Field(
        default=8_192, ge=16, description="Longer prompts are stored truncated to this length."
    )
    # Serving.
    onnx_threads: int = Field(
        default=1,
        ge=1,
        description="Serving threads: intra-op for one prompt, sub-batches side by side.",
    )
    reload_interval_s: float = Field(default=2.0, gt=0, description="How often to check `current`.")
    fast_path: bool = Field(
        default=False,
        description="The cascade (capture/fast_path.py): the weekly cycle builds a static-"
        "embedding fast path beside each exported model, and serving answers from it when it is "
        "confident, the ONNX model otherwise (bench/RESULTS.md, 'Fast path').",
    )
    review_confidence_threshold: float = Field(default=0.7, ge=0, le=1)
    # PostgreSQL: nlu_prompt_logs is partitioned by created_at (migration 0007).
    partition_interval: PartitionInterval = Field(
        default="day",
        description="Width of the nlu_prompt_logs partitions (UTC days, or ISO weeks from "
        "Monday) that migration 0007 and the retention flow create.",
    )
    # Monitoring.
    alert_webhook_url: str = Field(
        default="", description="Slack-compatible webhook the monitor flow posts alerts to."
    )

    @field_validator("database_url")
    @classmethod
    def _normalise(cls, value: str) -> str:
        url = normalise_database_url(value)
        problem = database_url_problem(url) if url else None
        if problem is not None:
            raise ValueError(
                f"{problem}: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE "
                "(or empty: an SQLite file under PROMPT_CAPTURE_HOME)"
            )
        return url

    @field_validator("home")
    @classmethod
    def _a_folder(cls, value: Path) -> Path:
        problem = home_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def for_run(self, home: Path, database_url: str) -> Settings:
        """A copy with ``home`` and ``database_url`` replaced (one flow run's home and database:
        the demo's fresh home, one simulator run). The environment is not touched."""
        return self.model_copy(
            update={"home": home, "database_url": normalise_database_url(database_url)}
        )

    @property
    def resolved_database_url(self) -> str:
        """The database URL in force: the configured one, or the SQLite default under home."""
        if self.database_url:
            return self.database_url
        return self.sqlite_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read on first use, never at import time); a variable they
    refuse raises :class:`SettingsError` (one message naming it)."""
    try:
        return Settings()
    except ValidationError as exc:
        raise _settings_error(exc) from None
