"""The statements the offline tasks run, next to the shared builders they reuse.

Who runs what (every statement only builds; the ``tasks`` modules execute them):

- ``tasks.report``: :func:`select_daily_counts` (plus the design note's three statistics in
  :mod:`capture.statements`);
- ``tasks.monitor``: :func:`select_intent_counts`, :func:`select_intent_traffic` (the monitor's
  own tables, hours checked and alerts sent, are :mod:`capture.monitor_statements`');
- ``tasks.review_export``: :func:`select_review_candidates`;
- ``tasks.corrections``: :func:`select_logs_by_id`, :func:`select_known_intents` (and
  :func:`capture.statements.update_correction`);
- ``tasks.retention``: :func:`delete_expired_logs`, :func:`insert_training_examples`,
  :func:`training_copy_sql`;
- ``tasks.training_data``: :func:`select_training_store` (and
  :func:`capture.statements.select_for_retraining`).

The per-window counts of the report and of the alerts are one set of aggregate columns
(:func:`count_columns`, read back as :class:`WindowCounts`).

Parameters a person types (``--days``, ``--limit``, a threshold) are checked here before any
statement is built, so a task refuses a mistake before it opens a connection: the ``check_*``
functions raise :class:`ParameterError`, a :class:`capture.errors.UserError` (and a
``ValueError``, which callers used to catch). Torch- and Prefect-free, like all of ``capture``.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import date, datetime
from typing import Any, Self

from sqlalchemy import (
    CompoundSelect,
    Date,
    Insert,
    case,
    delete,
    false,
    func,
    or_,
    select,
    union,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import ReturningDelete
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from capture.errors import UserError
from capture.models import TRAINING_EXAMPLES
from capture.statements import TABLE, AnySelect, C
from capture.types import check_confidence
from capture.values import MAX_WINDOW_DAYS, as_real, since_days, to_utc

logger = logging.getLogger(__name__)

EXAMPLES = TRAINING_EXAMPLES

#: Ids per ``IN (...)`` list of :func:`select_logs_by_id` (SQLite binds at most 32k variables).
ID_CHUNK = 500


class ParameterError(UserError, ValueError):
    """A parameter a person gave a task is out of range; the message names it and the fix."""


# --------------------------------------------------------------------------- parameter checks


def check_days(days: float | None, field: str = "days") -> float | None:
    """``days`` of a "last N days" window: a number in (0, ``MAX_WINDOW_DAYS``], or None (no
    window). Raises :class:`ParameterError`."""
    if days is None:
        return None
    if (
        isinstance(days, bool)
        or not isinstance(days, int | float)
        or math.isnan(days)
        or not 0 < days <= MAX_WINDOW_DAYS
    ):
        raise ParameterError(
            f"{field}: expected a number of days in (0, {MAX_WINDOW_DAYS}] or None, found "
            f"{days!r}; pass a positive number of days, or none for all time"
        )
    return days


def window_start(now: datetime, days: float | None, field: str = "days") -> datetime | None:
    """The start of the "last ``days`` days" window ending at ``now`` (None: no window), after
    :func:`check_days`. ``now`` must be timezone-aware (``ValueError`` otherwise)."""
    return since_days(now, check_days(days, field))


def check_count(value: int, field: str, *, minimum: int = 1) -> int:
    """A whole number >= ``minimum`` (a limit, a batch size). Raises :class:`ParameterError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"a whole number >= {minimum}"
        raise ParameterError(f"{field}: expected {wanted}, found {value!r}")
    return value


def check_positive(value: float, field: str) -> float:
    """A number > 0 (a number of days, a duration). Raises :class:`ParameterError`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ParameterError(f"{field}: expected a positive number, found {value!r}")
    return value


def check_fraction(value: float, field: str) -> float:
    """A number in [0, 1] (a confidence or a rate). Raises :class:`ParameterError`."""
    try:
        check_confidence(value, field)
    except ValueError as exc:
        raise ParameterError(str(exc)) from None
    return value


# --------------------------------------------------------------------------- per-window counts


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """Prompt counts of one group of rows (a UTC day, an intent, a whole window)."""

    total: int
    low_confidence: int  # confidence below the threshold the statement was built with
    corrections: int
    outcomes: int  # rows with a known workflow outcome
    failures: int

    @property
    def successes(self) -> int:
        return self.outcomes - self.failures

    @property
    def low_confidence_rate(self) -> float:
        return self.low_confidence / self.total if self.total else 0.0

    @property
    def correction_rate(self) -> float:
        return self.corrections / self.total if self.total else 0.0

    @property
    def success_rate(self) -> float | None:
        """Successes / known outcomes; None when no outcome is known."""
        return self.successes / self.outcomes if self.outcomes else None

    @classmethod
    def from_row(cls, row: Any) -> Self:
        """Read the :func:`count_columns` of a result row."""
        m = row._mapping
        return cls(**{f.name: int(m[f.name]) for f in fields(WindowCounts)})

    @classmethod
    def sum(cls, parts: Iterable[WindowCounts]) -> WindowCounts:
        """The counts of the union of disjoint groups."""
        items = list(parts)
        return WindowCounts(
            **{f.name: sum(getattr(p, f.name) for p in items) for f in fields(WindowCounts)}
        )


@dataclass(frozen=True, slots=True)
class DailyCounts(WindowCounts):
    """:class:`WindowCounts` of one UTC calendar day."""

    day: date

    @classmethod
    def from_row(cls, row: Any) -> Self:
        counts = WindowCounts.from_row(row)
        day = row._mapping["day"]
        return cls(
            **{f.name: getattr(counts, f.name) for f in fields(WindowCounts)},
            day=date.fromisoformat(day) if isinstance(day, str) else day,
        )


def count_columns(low_confidence_threshold: float) -> tuple[ColumnElement[Any], ...]:
    """The aggregates behind :class:`WindowCounts`: ``total``, ``low_confidence``
    (confidence below the threshold), ``corrections``, ``outcomes``, ``failures``."""
    # Compare with the float4 value of the threshold: a stored REAL 0.7 is not below 0.7.
    threshold = as_real(low_confidence_threshold)
    return (
        func.count().label("total"),
        func.count(case((C.confidence < threshold, 1))).label("low_confidence"),
        func.count(C.corrected_intent).label("corrections"),
        func.count(C.was_successful).label("outcomes"),
        func.count(case((C.was_successful == false(), 1))).label("failures"),
    )


class utc_date(FunctionElement[date]):  # SQL function style name
    """The UTC calendar day of a timestamp column, as a date, on both databases."""

    name = "utc_date"
    type = Date()
    inherit_cache = True


@compiles(utc_date)
def _utc_date_sqlite(element: utc_date, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite stores timestamps as naive UTC text.
    return f"date({compiler.process(element.clauses, **kw)})"


@compiles(utc_date, "postgresql")
def _utc_date_postgresql(element: utc_date, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(timezone('UTC', {compiler.process(element.clauses, **kw)}) AS DATE)"


def _after(
    since: datetime | None, until: datetime | None = None
) -> tuple[ColumnElement[bool], ...]:
    """``created_at`` in ``(since, until]`` (either end open when None)."""
    after = () if since is None else (C.created_at > to_utc(since, "since"),)
    return after + (() if until is None else (C.created_at <= to_utc(until, "until"),))


def _between(start: datetime, end: datetime) -> tuple[ColumnElement[bool], ...]:
    """``created_at`` in ``[start, end)``: aligned hours partition time with no row in two."""
    return (C.created_at >= to_utc(start, "start"), C.created_at < to_utc(end, "end"))


def select_daily_counts(
    *, since: datetime | None, low_confidence_threshold: float, until: datetime | None = None
) -> AnySelect:
    """:class:`DailyCounts` per UTC day of the rows created in ``(since, until]``, oldest day
    first."""
    day = utc_date(C.created_at).label("day")
    return (
        select(day, *count_columns(low_confidence_threshold))
        .where(*_after(since, until))
        .group_by(day)
        .order_by(day)
    )


def select_intent_counts(
    *, start: datetime, end: datetime, low_confidence_threshold: float
) -> AnySelect:
    """``predicted_intent`` and its :class:`WindowCounts` over ``created_at`` in [start, end)."""
    return (
        select(C.predicted_intent, *count_columns(low_confidence_threshold))
        .where(*_between(start, end))
        .group_by(C.predicted_intent)
    )


def select_intent_traffic(*, start: datetime, end: datetime) -> AnySelect:
    """``predicted_intent`` and ``total`` (prompts) over ``created_at`` in [start, end)."""
    return (
        select(C.predicted_intent, func.count().label("total"))
        .where(*_between(start, end))
        .group_by(C.predicted_intent)
    )


# --------------------------------------------------------------------------- review export


def select_review_candidates(
    *, confidence_below: float, since: datetime | None, until: datetime | None = None
) -> AnySelect:
    """Uncorrected prompts created in ``(since, until]`` with ``confidence < confidence_below``
    or a failed workflow, oldest first: ``id, prompt, predicted_intent, confidence,
    secondary_intents, was_successful, created_at``
    (``tasks.review_select.ReviewCandidate.from_row``)."""
    return (
        select(
            C.id,
            C.prompt,
            C.predicted_intent,
            C.confidence,
            C.secondary_intents,
            C.was_successful,
            C.created_at,
        )
        .where(C.corrected_intent.is_(None))
        .where(or_(C.confidence < confidence_below, C.was_successful.is_(False)))
        .where(*_after(since, until))
        .order_by(C.created_at, C.id)
    )


# --------------------------------------------------------------------------- corrections import


def select_logs_by_id(ids: Sequence[uuid.UUID]) -> AnySelect:
    """``id, prompt, predicted_intent, corrected_intent, correction_notes, corrected_at`` of the
    logs among ``ids`` (at most :data:`ID_CHUNK` of them per statement; the last four are what a
    correction's audit row records as before / prior)."""
    if len(ids) > ID_CHUNK:
        raise ValueError(f"ids: expected at most {ID_CHUNK} per statement, found {len(ids)}")
    return select(
        C.id,
        C.prompt,
        C.predicted_intent,
        C.corrected_intent,
        C.correction_notes,
        C.corrected_at,
    ).where(C.id.in_(list(ids)))


def select_known_intents() -> CompoundSelect:
    """Every distinct intent the logs hold, predicted or corrected (one ``intent`` column)."""
    return union(
        select(C.predicted_intent.label("intent")),
        select(C.corrected_intent.label("intent")).where(C.corrected_intent.is_not(None)),
    )


# --------------------------------------------------------------------------- retention


#: What :func:`delete_expired_logs` returns of each removed row.
EXPIRED_COLUMNS = (
    "id",
    "prompt",
    "predicted_intent",
    "corrected_intent",
    "confidence",
    "was_successful",
    "model_version",
    "created_at",
)


def delete_expired_logs(
    *, cutoff: datetime, batch_size: int, postgres: bool
) -> ReturningDelete[*tuple[Any, ...]]:
    """Delete the ``batch_size`` oldest logs created before ``cutoff``, returning
    :data:`EXPIRED_COLUMNS` of each. On PostgreSQL rows another retention run holds are skipped
    (``FOR UPDATE SKIP LOCKED``)."""
    oldest = (
        select(C.id)
        .where(C.created_at < to_utc(cutoff, "cutoff"))
        .order_by(C.created_at, C.id)
        .limit(check_count(batch_size, "batch_size"))
    )
    if postgres:
        oldest = oldest.with_for_update(skip_locked=True)
    return (
        delete(TABLE)
        .where(C.id.in_(oldest.scalar_subquery()))
        .returning(*(C[name] for name in EXPIRED_COLUMNS))
    )


def insert_training_examples(*, postgres: bool) -> Insert:
    """``INSERT`` into ``nlu_training_examples`` that skips a row whose ``source_key`` exists,
    returning the ``source_key`` of each row inserted (execute with a list of value dicts)."""
    dialect_insert = postgresql.insert if postgres else sqlite.insert
    return (
        dialect_insert(EXAMPLES)
        .on_conflict_do_nothing(index_elements=[EXAMPLES.c.source_key])
        .returning(EXAMPLES.c.source_key)
    )


#: The columns a retention copy writes (``nlu_training_examples.created_at`` is the default).
TRAINING_COLUMNS = (
    "id",
    "source_key",
    "prompt",
    "label",
    "source",
    "corrected",
    "confidence",
    "was_successful",
    "model_version",
    "week",
)
_TRAINING_STAGE = "pc_training_stage"


def training_copy_sql() -> tuple[str, str, str]:
    """PostgreSQL, for copying whole partitions: create the session's staging table (once),
    ``COPY`` :data:`TRAINING_COLUMNS` rows into it, then move them into
    ``nlu_training_examples`` skipping existing ``source_key`` s (its ``rowcount``: rows
    inserted). The stage empties at commit. ~10x the rows/s of a multi-row ``INSERT``."""
    columns = ", ".join(TRAINING_COLUMNS)
    return (
        f"CREATE TEMP TABLE IF NOT EXISTS {_TRAINING_STAGE} "
        f"(LIKE {EXAMPLES.name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
        f"COPY {_TRAINING_STAGE} ({columns}) FROM STDIN",
        f"INSERT INTO {EXAMPLES.name} ({columns}) SELECT {columns} FROM {_TRAINING_STAGE} "
        "ON CONFLICT (source_key) DO NOTHING",
    )


# --------------------------------------------------------------------------- training export


def select_training_store(*, since: datetime | None, until: datetime | None = None) -> AnySelect:
    """``prompt, label, confidence, source, corrected`` of the anonymised training store, oldest
    week first; with ``since``, the weeks starting on or after its (UTC) date; with ``until``,
    the weeks starting on or before its (UTC) date."""
    stmt = select(
        EXAMPLES.c.prompt,
        EXAMPLES.c.label,
        EXAMPLES.c.confidence,
        EXAMPLES.c.source,
        EXAMPLES.c.corrected,
    ).order_by(EXAMPLES.c.week, EXAMPLES.c.created_at, EXAMPLES.c.id)
    if since is not None:
        stmt = stmt.where(EXAMPLES.c.week >= to_utc(since, "since").date())
    if until is not None:
        stmt = stmt.where(EXAMPLES.c.week <= to_utc(until, "until").date())
    return stmt
