"""The one settings object of the project (environment prefix ``PROMPT_CAPTURE_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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


#: The default SQLite database's file name under the home.
DATABASE_FILE = "prompt_capture.db"


class HomeDirs:
    """The folders of a PROMPT_CAPTURE_HOME, derived from ``home`` (``tasks.layout`` draws the
    tree); shared by :class:`Settings` and ``tasks.layout.HomeLayout``. Nothing is created."""

    __slots__ = ()
    if TYPE_CHECKING:
        home: Path

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def work_dir(self) -> Path:
        return self.home / "work"

    @property
    def exports_dir(self) -> Path:
        return self.home / "exports"

    @property
    def inbox_dir(self) -> Path:
        return self.home / "inbox"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def sqlite_url(self) -> str:
        """The default database: an SQLite file in the home (absolute path)."""
        return f"sqlite:///{(self.home / DATABASE_FILE).resolve()}"


class Settings(HomeDirs, BaseSettings):
    """Everything configurable, read once from the environment (and ``.env`` if present)."""

    model_config = SettingsConfigDict(env_prefix="PROMPT_CAPTURE_", env_file=".env", extra="ignore")

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
        return normalise_database_url(value)

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
    """The process-wide settings (read on first use, never at import time)."""
    return Settings()
