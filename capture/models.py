"""SQLAlchemy models. The schema itself changes only through Alembic (``migrations/``)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Float,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    Uuid,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Alembic naming conventions, so constraint names are stable across databases and migrations.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JsonB = JSON().with_variant(JSONB(), "postgresql")
Timestamp = DateTime(timezone=True)


def not_null(name: str, type_: Any, **kwargs: Any) -> Column[Any]:
    """A ``NOT NULL`` column of a Core table: ``Column(name, type_, nullable=False, **kwargs)``."""
    return Column(name, type_, nullable=False, **kwargs)


def in_values(column: str, values: Sequence[str]) -> str:
    """The condition of a CHECK constraint: ``column IN ('a', 'b', ...)``."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class PromptLog(Base):
    """One prompt that went through the NLU step: prediction, later outcome, later correction.

    On PostgreSQL the table is partitioned by ``created_at`` (migration 0007) and its primary
    key is ``(id, created_at)``; SQLite keeps the plain table with primary key ``id``. Ids are
    client-made UUIDv7s, unique in practice; statements look them up near their time
    (``capture.statements.id_time_window``)."""

    __tablename__ = "nlu_prompt_logs"
    __table_args__ = (
        CheckConstraint("confidence >= 0 AND confidence <= 1", name="confidence_range"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)

    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    predicted_intent: Mapped[str] = mapped_column(Text, nullable=False)
    confidence: Mapped[float | None] = mapped_column(Float(precision=24))
    secondary_intents: Mapped[list[Any]] = mapped_column(JsonB, server_default="[]", default=list)

    corrected_intent: Mapped[str | None] = mapped_column(Text)
    correction_notes: Mapped[str | None] = mapped_column(Text)
    corrected_at: Mapped[datetime | None] = mapped_column(Timestamp)

    was_successful: Mapped[bool | None] = mapped_column(Boolean)
    workflow_type: Mapped[str | None] = mapped_column(Text)
    execution_error: Mapped[str | None] = mapped_column(Text)

    conversation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    message_index: Mapped[int | None] = mapped_column(Integer)

    model_version: Mapped[str | None] = mapped_column(Text)

    created_at: Mapped[datetime] = mapped_column(
        Timestamp, nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        Timestamp, nullable=False, server_default=func.now(), onupdate=func.now()
    )


class TrainingExample(Base):
    """An anonymised training example: scrubbed prompt and label, no user or conversation id."""

    __tablename__ = "nlu_training_examples"
    __table_args__ = (
        CheckConstraint(
            "confidence IS NULL OR (confidence >= 0 AND confidence <= 1)",
            name="confidence_range",
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    source_key: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    label: Mapped[str] = mapped_column(Text, nullable=False)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    corrected: Mapped[bool] = mapped_column(Boolean, nullable=False)
    confidence: Mapped[float | None] = mapped_column(Float(precision=24))
    was_successful: Mapped[bool | None] = mapped_column(Boolean)
    model_version: Mapped[str | None] = mapped_column(Text)
    week: Mapped[date] = mapped_column(Date, nullable=False, index=True)
    created_at: Mapped[datetime] = mapped_column(
        Timestamp, nullable=False, server_default=func.now()
    )


#: The two tables as SQLAlchemy Core tables, for the statement builders and the tasks' queries.
PROMPT_LOGS = cast(Table, PromptLog.__table__)
TRAINING_EXAMPLES = cast(Table, TrainingExample.__table__)


# --------------------------------------------------------------------------- monitoring rollup
# Migration 0004; filled by ``capture.stats_rollup.refresh_prompt_stats``, read by the statistics.

Count = BigInteger


class _StatsMeasures:
    """Per period and predicted intent: what the three monitoring statistics need, exactly."""

    predicted_intent: Mapped[str] = mapped_column(Text, primary_key=True)
    prompts: Mapped[int] = mapped_column(Count, nullable=False)  # COUNT(*)
    confidence_count: Mapped[int] = mapped_column(Count, nullable=False)  # COUNT(confidence)
    confidence_sum: Mapped[float] = mapped_column(Float(precision=53), nullable=False)
    corrections: Mapped[int] = mapped_column(Count, nullable=False)  # COUNT(corrected_intent)
    outcomes: Mapped[int] = mapped_column(Count, nullable=False)  # COUNT(was_successful)
    successes: Mapped[int] = mapped_column(Count, nullable=False)


#: The confidence buckets: ``confidence_tenths(confidence)`` = 0 .. 10.
TENTHS = tuple(range(11))
#: Rows per confidence bucket (``tenths_<k>``), and with NULL confidence (``tenths_null``).
TENTHS_COLUMNS = (*(f"tenths_{k}" for k in TENTHS), "tenths_null")
for _column in TENTHS_COLUMNS:  # BIGINT NOT NULL each, after the measures above
    setattr(_StatsMeasures, _column, mapped_column(Count, nullable=False))


class PromptStatsHourly(_StatsMeasures, Base):
    """The rows of one UTC hour (``hour`` <= created_at < ``hour`` + 1 h) per predicted intent."""

    __tablename__ = "nlu_prompt_stats_hourly"

    hour: Mapped[datetime] = mapped_column(Timestamp, primary_key=True)


class PromptStatsDaily(_StatsMeasures, Base):
    """The sum of a closed UTC day's hourly rows per predicted intent."""

    __tablename__ = "nlu_prompt_stats_daily"

    day: Mapped[datetime] = mapped_column(Timestamp, primary_key=True)


class PromptStatsState(Base):
    """One row: hours before ``watermark`` are rolled up (NULL: never refreshed)."""

    __tablename__ = "nlu_prompt_stats_state"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    watermark: Mapped[datetime | None] = mapped_column(Timestamp)
    late_after_seconds: Mapped[int] = mapped_column(Integer, nullable=False)
    refreshed_at: Mapped[datetime | None] = mapped_column(Timestamp)


class PromptStatsDirty(Base):
    """An hour whose rows changed after it may have been rolled up (set by triggers)."""

    __tablename__ = "nlu_prompt_stats_dirty"

    hour: Mapped[datetime] = mapped_column(Timestamp, primary_key=True)
    txid: Mapped[int] = mapped_column(BigInteger, primary_key=True)
