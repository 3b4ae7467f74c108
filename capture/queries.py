"""SQL statement builders and row mappers over ``nlu_prompt_logs``, shared by every caller.

The async repository (``capture.repository``) and the synchronous Prefect tasks (which use
``capture.db.get_sync_engine(url)`` and a ``Session``) build each query here, so there is one
definition of every query and of how its rows become typed values::

    with Session(get_sync_engine(url)) as session:
        stmt = queries.select_low_confidence(threshold=0.7, limit=100, since=since)
        rows = [queries.map_prompt_log(row) for row in session.execute(stmt)]

Conventions:

- Time windows are a ``since: datetime | None`` parameter (``created_at > since``), computed by
  the caller from an injectable clock with :func:`since_days` ("last N days" = ``now - N days``).
  ``since`` must be timezone-aware; it is converted to UTC before binding, because SQLite stores
  timestamps as naive UTC strings and compares them as text.
- Datetimes returned by the mappers are always timezone-aware UTC, on both databases.
- ``confidence`` is a PostgreSQL ``REAL`` (float4). :func:`as_real` rounds a value to float4 the
  same way, and every writer should store ``as_real(confidence)`` so that SQLite holds exactly the
  value PostgreSQL holds (and the statistics agree bit for bit). Reads return
  :func:`from_real` (the shortest decimal of the float4: 0.92, as PostgreSQL prints it).
- ``secondary_intents`` is a JSON list of ``{"intent": str, "confidence": float}`` objects, best
  first (:func:`secondary_intents_json` builds it; :func:`parse_secondary_intents` reads it back).

The three monitoring statistics follow the design note's SQL and return identical results on
PostgreSQL and SQLite:

- confidence buckets: PostgreSQL runs ``ROUND(confidence::numeric, 1)`` literally. SQLite has no
  numeric type, so the same value is computed in integer arithmetic: the float4 value rounded to
  6 significant digits (what PostgreSQL's real→numeric cast does), then half away from zero to
  one decimal.
- average confidence: ``AVG(confidence)``, rounded to 6 decimals by the mapper (the two engines
  add doubles in different orders; float4 inputs carry ~7 significant digits anyway).
- success rate: ``ROUND(100.0 * successes / total, 1)`` equals ``(2000 * s + t) // (2 * t)``
  tenths of a percent (exact half-up rounding of the rational), computed in integers on both.
"""

from __future__ import annotations

import logging
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Double,
    Insert,
    Integer,
    Select,
    Table,
    TextClause,
    Update,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from capture.models import (
    PromptLog,
    PromptStatsDaily,
    PromptStatsDirty,
    PromptStatsHourly,
    PromptStatsState,
)
from capture.types import check_confidence

logger = logging.getLogger(__name__)

TABLE = cast(Table, PromptLog.__table__)
C = TABLE.c

#: The longest window a ``days`` parameter may ask for (100 years; ``None`` means no window).
MAX_WINDOW_DAYS = 36_500

#: The PostgreSQL setting the row-level-security policies compare ``user_id`` with.
USER_SCOPE_SETTING = "app.user_id"


# --------------------------------------------------------------------------- time helpers


def utc_now() -> datetime:
    """The default clock: the current time, timezone-aware UTC."""
    return datetime.now(UTC)


def to_utc(value: datetime, field: str = "datetime") -> datetime:
    """``value`` converted to UTC; naive datetimes are refused (their zone is unknown)."""
    if not isinstance(value, datetime):
        raise ValueError(f"{field}: expected a timezone-aware datetime, found {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{field}: expected a timezone-aware datetime, found the naive {value.isoformat()}; "
            "pass e.g. datetime.now(UTC)"
        )
    return value.astimezone(UTC)


def since_days(now: datetime, days: float | None) -> datetime | None:
    """The start of a "last ``days`` days" window ending at ``now`` (``None``: no window)."""
    if days is None:
        return None
    if (
        isinstance(days, bool)
        or not isinstance(days, int | float)
        or not 0 < days <= MAX_WINDOW_DAYS
    ):
        raise ValueError(
            f"days: expected a number of days in (0, {MAX_WINDOW_DAYS}] or None, found {days!r}"
        )
    return to_utc(now, "now") - timedelta(days=days)


def from_db_datetime(value: datetime | str | None) -> datetime | None:
    """A datetime read back from either database, as timezone-aware UTC.

    SQLite returns naive datetimes holding UTC; PostgreSQL returns aware ones in the session's
    time zone. Strings (raw SQLite text from ``text()`` queries) are parsed as naive UTC.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# --------------------------------------------------------------------------- value helpers


def as_real(value: float) -> float:
    """``value`` rounded to float4, exactly as PostgreSQL stores a ``REAL``."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


def from_real(value: float) -> float:
    """The shortest decimal that rounds to the same float4 as ``value``.

    This is how PostgreSQL prints a ``REAL`` (and what psycopg returns); SQLite returns the exact
    binary value (0.9200000166893005 for 0.92), so reads from both go through this.
    """
    target = as_real(value)
    for digits in range(1, 10):
        candidate = float(f"{target:.{digits}g}")
        if as_real(candidate) == target:
            return candidate
    return target


def as_uuid(value: uuid.UUID | str, field: str) -> uuid.UUID:
    """``value`` as a UUID, or ``ValueError`` naming ``field``."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{field}: expected a UUID, found {value!r}")


def _optional_uuid(value: uuid.UUID | str | None, field: str) -> uuid.UUID | None:
    return None if value is None else as_uuid(value, field)


def _non_empty_text(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field}: expected a non-empty string, found {value!r}")
    return value


def _optional_text(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{field}: expected a string or None, found {value!r}")
    return value


SecondaryIntents = Iterable[tuple[str, float] | Mapping[str, Any]]


def secondary_intents_json(secondary: SecondaryIntents) -> list[dict[str, Any]]:
    """The stored JSON shape of the runners-up: ``[{"intent": str, "confidence": float}, ...]``.

    Accepts ``(intent, confidence)`` pairs (as in ``Prediction.secondary_intents``) or mappings
    with those two keys; confidences are validated and stored as the shortest decimal of their
    float4 (:func:`from_real`).
    """
    out: list[dict[str, Any]] = []
    if isinstance(secondary, str | bytes):
        raise ValueError(
            f"secondary_intents: expected a list of (intent, confidence) pairs, found {secondary!r}"
        )
    for rank, item in enumerate(secondary):
        where = f"secondary_intents[{rank}]"
        name: Any
        conf: Any
        if isinstance(item, Mapping):
            name, conf = item.get("intent"), item.get("confidence")
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            name, conf = item
        else:
            raise ValueError(f"{where}: expected an (intent, confidence) pair, found {item!r}")
        _non_empty_text(name, f"{where}.intent")
        check_confidence(conf, f"{where}.confidence")
        out.append({"intent": name, "confidence": from_real(float(conf))})
    return out


def parse_secondary_intents(value: object) -> tuple[tuple[str, float], ...]:
    """The stored JSON list read back as ranked ``(intent, confidence)`` pairs."""
    if value is None:
        return ()
    if isinstance(value, str | bytes):
        import json

        value = json.loads(value)
    pairs: list[tuple[str, float]] = []
    for item in value if isinstance(value, list) else ():
        if isinstance(item, Mapping):
            pairs.append((str(item["intent"]), from_real(float(item["confidence"]))))
        else:
            name, conf = item
            pairs.append((str(name), from_real(float(conf))))
    return tuple(pairs)


def prompt_log_values(
    *,
    log_id: uuid.UUID,
    prompt: str,
    predicted_intent: str,
    confidence: float,
    secondary_intents: SecondaryIntents = (),
    user_id: uuid.UUID | str | None = None,
    conversation_id: uuid.UUID | str | None = None,
    message_index: int | None = None,
    model_version: str | None = None,
    created_at: datetime,
) -> dict[str, Any]:
    """A validated row for :func:`insert_prompt_logs`; ``ValueError`` names the bad field."""
    _non_empty_text(prompt, "prompt")
    _non_empty_text(predicted_intent, "predicted_intent")
    check_confidence(confidence, "confidence")
    if message_index is not None and (
        isinstance(message_index, bool) or not isinstance(message_index, int) or message_index < 0
    ):
        raise ValueError(
            f"message_index: expected a non-negative integer or None, found {message_index!r}"
        )
    created = to_utc(created_at, "created_at")
    return {
        "id": as_uuid(log_id, "log_id"),
        "user_id": _optional_uuid(user_id, "user_id"),
        "prompt": prompt,
        "predicted_intent": predicted_intent,
        "confidence": as_real(float(confidence)),
        "secondary_intents": secondary_intents_json(secondary_intents),
        "conversation_id": _optional_uuid(conversation_id, "conversation_id"),
        "message_index": message_index,
        "model_version": _optional_text(model_version, "model_version"),
        "created_at": created,
        "updated_at": created,
    }


# --------------------------------------------------------------------------- typed rows


@dataclass(frozen=True, slots=True)
class PromptLogRow:
    """One ``nlu_prompt_logs`` row, every column; datetimes are timezone-aware UTC."""

    id: uuid.UUID
    user_id: uuid.UUID | None
    prompt: str
    predicted_intent: str
    confidence: float | None
    secondary_intents: tuple[tuple[str, float], ...]
    corrected_intent: str | None
    correction_notes: str | None
    corrected_at: datetime | None
    was_successful: bool | None
    workflow_type: str | None
    execution_error: str | None
    conversation_id: uuid.UUID | None
    message_index: int | None
    model_version: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class RetrainingRow:
    """A prompt selected for retraining: ``label`` is the correction, else the prediction."""

    id: uuid.UUID
    prompt: str
    label: str
    predicted_intent: str
    confidence: float | None
    corrected: bool
    was_successful: bool | None
    model_version: str | None
    created_at: datetime

    def as_export_record(self) -> dict[str, Any]:
        """The design note's retraining JSONL record."""
        return {
            "text": self.prompt,
            "label": self.label,
            "confidence": self.confidence,
            "source": "production",
            "corrected": self.corrected,
        }


@dataclass(frozen=True, slots=True)
class ConfidenceBucket:
    """Rows whose confidence rounds to ``bucket`` (one decimal; ``None`` for NULL confidence)."""

    bucket: float | None
    count: int


@dataclass(frozen=True, slots=True)
class IntentStats:
    predicted_intent: str
    count: int
    avg_confidence: float | None
    corrections: int


@dataclass(frozen=True, slots=True)
class IntentSuccessRate:
    """``success_rate`` is a percentage with one decimal (rounded half up)."""

    predicted_intent: str
    total: int
    successes: int
    success_rate: float


def map_prompt_log(row: Any) -> PromptLogRow:
    m = row._mapping
    created_at = from_db_datetime(m["created_at"])
    updated_at = from_db_datetime(m["updated_at"])
    assert created_at is not None and updated_at is not None  # NOT NULL columns
    return PromptLogRow(
        id=m["id"],
        user_id=m["user_id"],
        prompt=m["prompt"],
        predicted_intent=m["predicted_intent"],
        confidence=None if m["confidence"] is None else from_real(m["confidence"]),
        secondary_intents=parse_secondary_intents(m["secondary_intents"]),
        corrected_intent=m["corrected_intent"],
        correction_notes=m["correction_notes"],
        corrected_at=from_db_datetime(m["corrected_at"]),
        was_successful=m["was_successful"],
        workflow_type=m["workflow_type"],
        execution_error=m["execution_error"],
        conversation_id=m["conversation_id"],
        message_index=m["message_index"],
        model_version=m["model_version"],
        created_at=created_at,
        updated_at=updated_at,
    )


def map_retraining_row(row: Any) -> RetrainingRow:
    m = row._mapping
    created_at = from_db_datetime(m["created_at"])
    assert created_at is not None
    corrected = m["corrected_intent"]
    return RetrainingRow(
        id=m["id"],
        prompt=m["prompt"],
        label=corrected if corrected is not None else m["predicted_intent"],
        predicted_intent=m["predicted_intent"],
        confidence=None if m["confidence"] is None else from_real(m["confidence"]),
        corrected=corrected is not None,
        was_successful=m["was_successful"],
        model_version=m["model_version"],
        created_at=created_at,
    )


def map_confidence_bucket(row: Any) -> ConfidenceBucket:
    tenths, count = row._mapping["conf_tenths"], row._mapping["count"]
    return ConfidenceBucket(bucket=None if tenths is None else int(tenths) / 10, count=int(count))


def map_intent_stats(row: Any) -> IntentStats:
    m = row._mapping
    avg = m["avg_conf"]
    return IntentStats(
        predicted_intent=m["predicted_intent"],
        count=int(m["count"]),
        avg_confidence=None if avg is None else round(float(avg), 6),
        corrections=int(m["corrections"]),
    )


def map_success_rate(row: Any) -> IntentSuccessRate:
    m = row._mapping
    return IntentSuccessRate(
        predicted_intent=m["predicted_intent"],
        total=int(m["total"]),
        successes=int(m["successes"]),
        success_rate=int(m["success_rate_tenths"]) / 10,
    )


# --------------------------------------------------------------------------- SQL constructs


class confidence_tenths(FunctionElement[int]):
    """``ROUND(confidence::numeric, 1) * 10`` as an integer, identical on every database.

    PostgreSQL's real→numeric cast prints the float4 with 6 significant digits and ROUND goes
    half away from zero. The same value in double arithmetic (5x cheaper on PostgreSQL than the
    numeric cast, and possible on SQLite): round to 6 decimals (7 below 0.1, where 6 significant
    digits are 7 decimals), then to tenths, both half up in integers. Exact for float4 inputs:
    no float4 lies on a 6-decimal half-step that decides a tenth, and the products are exact to
    far less than the distance to one. tests/test_repository.py checks it against ROUND.
    Migration 0003 keeps planner statistics on this exact PostgreSQL expression.
    """

    name = "confidence_tenths"
    type = Integer()
    inherit_cache = True


def _tenths_sql(c: str, to_int: str) -> str:
    micro = to_int.format(f"{c} * 1000000 + 0.5")
    decimicro = to_int.format(f"{c} * 10000000 + 0.5")
    return (
        f"(CASE WHEN {c} >= 0.1 THEN ({micro} + 50000) / 100000"
        f" ELSE ({decimicro} + 500000) / 1000000 END)"
    )


@compiles(confidence_tenths)
def _tenths_default(element: confidence_tenths, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite: REAL is a double; CAST(x AS INTEGER) truncates, which is floor for x >= 0.
    return _tenths_sql(compiler.process(element.clauses, **kw), "CAST({} AS INTEGER)")


@compiles(confidence_tenths, "postgresql")
def _tenths_postgresql(element: confidence_tenths, compiler: SQLCompiler, **kw: Any) -> str:
    # Widen the float4 first (real * integer is float4 arithmetic); a float→int cast rounds here.
    c = f"CAST({compiler.process(element.clauses, **kw)} AS DOUBLE PRECISION)"
    return _tenths_sql(c, "CAST(floor({}) AS BIGINT)")


#: A SELECT of any number of columns of any type.
AnySelect = Select[*tuple[Any, ...]]
_SelectT = TypeVar("_SelectT", bound=AnySelect)


def _window(stmt: _SelectT, since: datetime | None) -> _SelectT:
    if since is None:
        return stmt
    return stmt.where(C.created_at > to_utc(since, "since"))


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit: expected a positive integer, found {limit!r}")
    return limit


def _check_fraction(value: float, field: str) -> float:
    """A validated confidence bound, rounded to float4 like the stored values, so that a row
    logged with 0.7 is not "below 0.7" (float4(0.7) < 0.7 as doubles)."""
    check_confidence(value, field)
    return as_real(float(value))


# --------------------------------------------------------------------------- statements


def insert_prompt_logs() -> Insert:
    """``INSERT`` for rows from :func:`prompt_log_values` (execute with one dict or a list)."""
    return insert(TABLE)


def select_prompt_log(log_id: uuid.UUID | str) -> AnySelect:
    return select(TABLE).where(C.id == as_uuid(log_id, "log_id"))


def select_user_prompts(user_id: uuid.UUID | str, *, limit: int = 50) -> AnySelect:
    """A user's prompts, newest first."""
    return (
        select(TABLE)
        .where(C.user_id == as_uuid(user_id, "user_id"))
        .order_by(C.created_at.desc(), C.id.desc())
        .limit(_check_limit(limit))
    )


def select_low_confidence(
    *, threshold: float = 0.7, limit: int = 100, since: datetime | None = None
) -> AnySelect:
    """Uncorrected prompts with ``confidence < threshold``, lowest confidence first."""
    stmt = (
        select(TABLE)
        .where(
            C.confidence < _check_fraction(threshold, "threshold"),
            C.corrected_intent.is_(None),
        )
        .order_by(C.confidence.asc(), C.created_at.asc(), C.id.asc())
        .limit(_check_limit(limit))
    )
    return _window(stmt, since)


def select_failed_workflows(*, limit: int = 100, since: datetime | None = None) -> AnySelect:
    """Prompts whose workflow failed, newest first."""
    stmt = (
        select(TABLE)
        .where(C.was_successful == false())
        .order_by(C.created_at.desc(), C.id.desc())
        .limit(_check_limit(limit))
    )
    return _window(stmt, since)


def select_for_retraining(
    *, min_confidence: float = 0.9, since: datetime | None = None
) -> AnySelect:
    """Corrected prompts, plus uncorrected ones with ``confidence >= min_confidence`` whose
    workflow did not fail; oldest first. Map rows with :func:`map_retraining_row`.

    Large: sync callers should stream it (``execution_options(yield_per=5000)``).
    """
    stmt = (
        select(
            C.id,
            C.prompt,
            C.predicted_intent,
            C.corrected_intent,
            C.confidence,
            C.was_successful,
            C.model_version,
            C.created_at,
        )
        .where(
            or_(
                C.corrected_intent.is_not(None),
                (C.confidence >= _check_fraction(min_confidence, "min_confidence"))
                & or_(C.was_successful.is_(None), C.was_successful == true()),
            )
        )
        .order_by(C.created_at.asc(), C.id.asc())
    )
    return _window(stmt, since)


def select_confidence_distribution(
    *, since: datetime | None = None, cover: StatsCover | None = None
) -> AnySelect:
    """Row counts per confidence rounded to one decimal, highest bucket first.

    With a ``cover`` (:func:`load_stats_cover`) the same rows come from the rollup plus the raw
    rows the rollup does not hold; without one, from the raw table.
    """
    if cover is not None:
        return _rollup_confidence_distribution(_checked_cover(cover, since))
    tenths = confidence_tenths(C.confidence).label("conf_tenths")
    stmt = select(tenths, func.count().label("count")).group_by(tenths)
    return _window(stmt, since).order_by(tenths.desc().nulls_last())


def select_intent_distribution(
    *, since: datetime | None = None, cover: StatsCover | None = None
) -> AnySelect:
    """Per predicted intent: rows, average confidence, corrections; most frequent first.
    ``cover``: read the rollup where it can (as :func:`select_confidence_distribution`).

    The design note's single GROUP BY, split in two so PostgreSQL can answer each part from an
    index: counts and averages from the covering ``created_at`` index (index-only), corrections
    from the small partial index on corrected rows (instead of reading every row of the window
    from the heap for ``COUNT(corrected_intent)``).
    """
    if cover is not None:
        return _rollup_intent_distribution(_checked_cover(cover, since))
    totals = _window(
        select(
            C.predicted_intent,
            func.count().label("count"),
            func.avg(C.confidence).label("avg_conf"),
        ).group_by(C.predicted_intent),
        since,
    ).subquery("totals")
    corrections = _window(
        select(C.predicted_intent, func.count().label("corrections"))
        .where(C.corrected_intent.is_not(None))
        .group_by(C.predicted_intent),
        since,
    ).subquery("corrections")
    return (
        select(
            totals.c.predicted_intent,
            totals.c.count,
            totals.c.avg_conf,
            func.coalesce(corrections.c.corrections, 0).label("corrections"),
        )
        .select_from(
            totals.outerjoin(
                corrections, corrections.c.predicted_intent == totals.c.predicted_intent
            )
        )
        .order_by(totals.c.count.desc(), totals.c.predicted_intent.asc())
    )


def select_success_rate_by_intent(
    *, since: datetime | None = None, cover: StatsCover | None = None
) -> AnySelect:
    """Per predicted intent with a known outcome: total, successes, success rate (tenths of a
    percent, half up); lowest rate first. ``cover``: as :func:`select_confidence_distribution`."""
    if cover is not None:
        return _rollup_success_rate_by_intent(_checked_cover(cover, since))
    total = func.count()
    successes = func.count(case((C.was_successful == true(), 1)))
    rate_tenths = ((successes * 2000 + total) // (total * 2)).label("success_rate_tenths")
    stmt = (
        select(
            C.predicted_intent,
            total.label("total"),
            successes.label("successes"),
            rate_tenths,
        )
        .where(C.was_successful.is_not(None))
        .group_by(C.predicted_intent)
    )
    return _window(stmt, since).order_by(rate_tenths.asc(), C.predicted_intent.asc())


def _by_id(log_id: uuid.UUID | str, user_id: uuid.UUID | str | None) -> list[ColumnElement[bool]]:
    clauses = [C.id == as_uuid(log_id, "log_id")]
    if user_id is not None:
        clauses.append(C.user_id == as_uuid(user_id, "user_id"))
    return clauses


def update_outcome(
    log_id: uuid.UUID | str,
    *,
    was_successful: bool,
    workflow_type: str | None,
    execution_error: str | None = None,
    user_id: uuid.UUID | str | None = None,
) -> Update:
    """Record a workflow outcome (``rowcount`` 0: no such row, or not the user's)."""
    if not isinstance(was_successful, bool):
        raise ValueError(f"was_successful: expected True or False, found {was_successful!r}")
    return (
        update(TABLE)
        .where(*_by_id(log_id, user_id))
        .values(
            was_successful=was_successful,
            workflow_type=_optional_text(workflow_type, "workflow_type"),
            execution_error=_optional_text(execution_error, "execution_error"),
        )
    )


def update_correction(
    log_id: uuid.UUID | str,
    *,
    corrected_intent: str,
    correction_notes: str | None = None,
    corrected_at: datetime,
    user_id: uuid.UUID | str | None = None,
) -> Update:
    """Record a human correction (``rowcount`` 0: no such row, or not the user's)."""
    return (
        update(TABLE)
        .where(*_by_id(log_id, user_id))
        .values(
            corrected_intent=_non_empty_text(corrected_intent, "corrected_intent"),
            correction_notes=_optional_text(correction_notes, "correction_notes"),
            corrected_at=to_utc(corrected_at, "corrected_at"),
        )
    )


def set_user_scope(user_id: uuid.UUID | str) -> TextClause:
    """PostgreSQL only: make ``user_id`` the row-level-security scope until the transaction ends."""
    uid = as_uuid(user_id, "user_id")
    return text("SELECT set_config(:setting, :uid, true)").bindparams(
        setting=USER_SCOPE_SETTING, uid=str(uid)
    )


# --------------------------------------------------------------------------- monitoring rollup
#
# Migration 0004 keeps per-hour and per-day aggregates (``nlu_prompt_stats_hourly`` / ``_daily``)
# of the columns the three statistics read. A statistic over ``created_at > since`` is the sum
# of: daily rows for whole UTC days, hourly rows for the other whole hours, both only before the
# watermark and never for an hour marked dirty; and the raw rows of everything else (the part of
# the first hour after ``since``, dirty hours, and the tail since the watermark). The parts are
# disjoint and cover the window exactly, so the result equals the raw query's.
#
# Dirty hours are marked by triggers (migration 0004) whenever a row of an hour that may already
# be rolled up is inserted, changes a statistics column, or is deleted; refresh_prompt_stats()
# recomputes them and advances the watermark.

HOURLY = cast(Table, PromptStatsHourly.__table__)
DAILY = cast(Table, PromptStatsDaily.__table__)
STATS_STATE = cast(Table, PromptStatsState.__table__)
DIRTY = cast(Table, PromptStatsDirty.__table__)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
TENTHS = tuple(range(11))
TENTHS_COLUMNS = (*(f"tenths_{k}" for k in TENTHS), "tenths_null")
MEASURES = (
    "prompts",
    "confidence_count",
    "confidence_sum",
    "corrections",
    "outcomes",
    "successes",
    *TENTHS_COLUMNS,
)
#: A cover with more raw ranges than this (many dirty hours) is not worth it: read the raw table.
MAX_COVER_SPANS = 512
#: Time ranges per DELETE/INSERT statement of a refresh.
REFRESH_SPANS_PER_STATEMENT = 64

_Timestamp = DateTime(timezone=True)


def floor_hour(value: datetime) -> datetime:
    """The start of the UTC hour ``value`` falls in."""
    return to_utc(value, "datetime").replace(minute=0, second=0, microsecond=0)


def floor_day(value: datetime) -> datetime:
    """The start of the UTC day ``value`` falls in."""
    return floor_hour(value).replace(hour=0)


class utc_hour(FunctionElement[datetime]):
    """The start of the UTC hour of a timestamp column, as the rollup stores it."""

    name = "utc_hour"
    type = _Timestamp
    inherit_cache = True


class utc_day(FunctionElement[datetime]):
    """The start of the UTC day of a timestamp column."""

    name = "utc_day"
    type = _Timestamp
    inherit_cache = True


@compiles(utc_hour)
def _utc_hour_default(element: utc_hour, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite text timestamps; the same expression as migration 0004's triggers.
    return f"strftime('%Y-%m-%d %H:00:00.000000', {compiler.process(element.clauses, **kw)})"


# PostgreSQL >= 14: date_bin from a UTC midnight is plain integer arithmetic (date_trunc with a
# time zone looks the zone up for every row: ~30% slower in a full refresh); both give the
# UTC hour / day. Migration 0004's trigger uses date_trunc(..., 'UTC') (PostgreSQL >= 12).
_UTC_ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"


def _postgres_bin(unit: str, compiler: SQLCompiler, column: str) -> str:
    version = compiler.dialect.server_version_info
    if version is not None and version < (14,):
        return f"date_trunc('{unit}', {column}, 'UTC')"
    return f"date_bin('1 {unit}', {column}, {_UTC_ORIGIN})"


@compiles(utc_hour, "postgresql")
def _utc_hour_postgresql(element: utc_hour, compiler: SQLCompiler, **kw: Any) -> str:
    return _postgres_bin("hour", compiler, compiler.process(element.clauses, **kw))


@compiles(utc_day)
def _utc_day_default(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strftime('%Y-%m-%d 00:00:00.000000', {compiler.process(element.clauses, **kw)})"


@compiles(utc_day, "postgresql")
def _utc_day_postgresql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return _postgres_bin("day", compiler, compiler.process(element.clauses, **kw))


class rollup_readable(FunctionElement[bool]):
    """Whether this connection may answer the statistics from the rollup: it can read the
    rollup tables, and it sees every raw row (no user scope set; the application role, which
    row-level security scopes, has no grant on the rollup and keeps reading the raw table)."""

    name = "rollup_readable"
    type = Boolean()
    inherit_cache = True


@compiles(rollup_readable)
def _rollup_readable_default(element: rollup_readable, compiler: SQLCompiler, **kw: Any) -> str:
    return "1"  # SQLite: no roles, no row-level security


@compiles(rollup_readable, "postgresql")
def _rollup_readable_postgresql(element: rollup_readable, compiler: SQLCompiler, **kw: Any) -> str:
    return (
        f"(has_table_privilege('{HOURLY.name}', 'SELECT')"
        f" AND has_table_privilege('{DAILY.name}', 'SELECT')"
        f" AND NULLIF(current_setting('{USER_SCOPE_SETTING}', true), '') IS NULL)"
    )


@dataclass(frozen=True, slots=True)
class Span:
    """The time range ``start <= t < end`` (``start < t`` when ``open_start``); ``None``: no
    bound on that side."""

    start: datetime | None
    end: datetime | None
    open_start: bool = False

    def clause(self, column: Any) -> ColumnElement[bool]:
        parts: list[ColumnElement[bool]] = []
        if self.start is not None:
            parts.append(column > self.start if self.open_start else column >= self.start)
        if self.end is not None:
            parts.append(column < self.end)
        return and_(*parts) if parts else true()


def _spans_clause(column: Any, spans: Sequence[Span]) -> ColumnElement[bool]:
    return or_(*(span.clause(column) for span in spans))


def _merge(spans: Iterable[Span]) -> list[Span]:
    """Sorted, adjacent or overlapping spans joined (a ``None`` start sorts first)."""
    ordered = sorted(
        spans, key=lambda s: (s.start is not None, s.start or datetime.min.replace(tzinfo=UTC))
    )
    out: list[Span] = []
    for span in ordered:
        if span.end is not None and span.start is not None and span.end <= span.start:
            continue
        last = out[-1] if out else None
        if (
            last is not None
            and last.end is not None
            and span.start is not None
            and span.start <= last.end
        ):
            end = None if span.end is None else max(last.end, span.end)
            out[-1] = Span(last.start, end, last.open_start)
        else:
            out.append(span)
    return out


@dataclass(frozen=True, slots=True)
class StatsCover:
    """Where each part of the window ``created_at > since`` is read from: the raw table (the
    ``raw`` spans), the hourly rollup (hours in ``hourly`` except ``dirty_hours``) and the daily
    rollup (days in ``daily`` except ``dirty_days``). The three parts are disjoint and together
    cover the window."""

    since: datetime | None
    watermark: datetime
    raw: tuple[Span, ...]
    hourly: tuple[Span, ...]
    daily: tuple[Span, ...]
    dirty_hours: tuple[datetime, ...] = ()
    dirty_days: tuple[datetime, ...] = ()


def plan_stats_cover(
    watermark: datetime | None, dirty_hours: Iterable[datetime], since: datetime | None
) -> StatsCover | None:
    """The cover of ``created_at > since`` given the rollup's state; ``None``: read the raw
    table (never refreshed, the window lies after the watermark, or too many dirty hours)."""
    if watermark is None:
        return None
    mark = floor_hour(watermark)
    since = None if since is None else to_utc(since, "since")
    # The first whole hour inside the window (an hour starting at ``since`` itself is not: a row
    # at exactly ``since`` is outside the window).
    first = None if since is None else floor_hour(since) + HOUR
    if first is not None and first >= mark:
        return None
    dirty = sorted(
        {h for h in map(floor_hour, dirty_hours) if (first is None or h >= first) and h < mark}
    )
    raw = [Span(h, h + HOUR) for h in dirty] + [Span(mark, None)]
    if since is not None:
        raw.insert(0, Span(since, first, open_start=True))
    raw_spans = _merge(raw)
    if len(raw_spans) > MAX_COVER_SPANS:
        logger.info(
            "statistics: %d dirty hours before the watermark %s; reading the raw table "
            "(run `prompt-capture db refresh-stats`)",
            len(dirty),
            mark.isoformat(),
        )
        return None

    last_day = floor_day(mark)  # days before it are closed
    first_day = None if first is None else floor_day(first - timedelta(microseconds=1)) + DAY
    dirty_days = sorted({floor_day(h) for h in dirty})
    hour_spans: list[Span] = []
    day_spans: list[Span] = []
    if first_day is not None and first_day >= last_day:
        hour_spans.append(Span(first, mark))
    else:
        day_spans.append(Span(first_day, last_day))
        if first is not None and first_day is not None and first < first_day:
            hour_spans.append(Span(first, first_day))
        # Closed days with a dirty hour: their other hours from the hourly rows.
        hour_spans += [
            Span(d, d + DAY)
            for d in dirty_days
            if (first_day is None or d >= first_day) and d < last_day
        ]
        hour_spans.append(Span(last_day, mark))
    return StatsCover(
        since,
        mark,
        tuple(raw_spans),
        tuple(_merge(hour_spans)),
        tuple(day_spans),
        tuple(dirty),
        tuple(d for d in dirty_days if (first_day is None or d >= first_day) and d < last_day),
    )


def select_stats_cover_state() -> AnySelect:
    """The rollup's watermark, whether this connection may read it, and the dirty hours before
    the watermark (one row each; a single row with ``hour`` NULL when there are none)."""
    dirty = select(DIRTY.c.hour).distinct().subquery("dirty")
    return select(
        STATS_STATE.c.watermark, rollup_readable().label("readable"), dirty.c.hour
    ).select_from(STATS_STATE.outerjoin(dirty, dirty.c.hour < STATS_STATE.c.watermark))


def stats_cover_from_rows(rows: Iterable[Any], since: datetime | None) -> StatsCover | None:
    """:func:`plan_stats_cover` from the rows of :func:`select_stats_cover_state`."""
    rows = list(rows)
    if not rows:
        raise RuntimeError(
            f"{STATS_STATE.name} has no row: the database is not at the head schema revision; "
            "run `prompt-capture db upgrade`"
        )
    first = rows[0]._mapping
    if not first["readable"]:
        return None
    dirty = [from_db_datetime(r._mapping["hour"]) for r in rows if r._mapping["hour"] is not None]
    return plan_stats_cover(
        from_db_datetime(first["watermark"]), [h for h in dirty if h is not None], since
    )


def load_stats_cover(session: Session, since: datetime | None) -> StatsCover | None:
    """The cover for a synchronous caller (the async repository runs the same two steps)."""
    return stats_cover_from_rows(session.execute(select_stats_cover_state()), since)


def _checked_cover(cover: StatsCover, since: datetime | None) -> StatsCover:
    expected = None if since is None else to_utc(since, "since")
    if cover.since != expected:
        raise ValueError(
            f"cover: planned for since={cover.since}, used with since={expected}; "
            "plan it with load_stats_cover(session, since) for this window"
        )
    return cover


def _rolled(cover: StatsCover, *labels: tuple[str, str], where: Any = None) -> list[AnySelect]:
    """SELECTs of ``(column, label)`` pairs from the hourly and daily rows of the cover."""
    parts: list[AnySelect] = []
    for table, key, spans, excluded in (
        (HOURLY, "hour", cover.hourly, cover.dirty_hours),
        (DAILY, "day", cover.daily, cover.dirty_days),
    ):
        if not spans:
            continue
        stmt = select(*(table.c[column].label(label) for column, label in labels)).where(
            _spans_clause(table.c[key], spans)
        )
        if excluded:
            stmt = stmt.where(table.c[key].not_in(excluded))
        if where is not None:
            stmt = stmt.where(where(table))
        parts.append(stmt)
    return parts


def _raw(cover: StatsCover, stmt: _SelectT) -> _SelectT:
    return stmt.where(_spans_clause(C.created_at, cover.raw))


def _rollup_confidence_distribution(cover: StatsCover) -> AnySelect:
    rolled = union_all(*_rolled(cover, *((c, c) for c in TENTHS_COLUMNS))).subquery("rolled")
    sums = select(*(func.sum(rolled.c[c]).label(c) for c in TENTHS_COLUMNS)).cte("rolled_sums")
    buckets: list[AnySelect] = [
        select(literal(k, Integer).label("conf_tenths"), sums.c[f"tenths_{k}"].label("count"))
        for k in TENTHS
    ]
    buckets.append(
        select(null().label("conf_tenths"), sums.c.tenths_null.label("count")),
    )
    tenths = confidence_tenths(C.confidence)
    buckets.append(
        _raw(cover, select(tenths.label("conf_tenths"), func.count().label("count"))).group_by(
            tenths
        )
    )
    parts = union_all(*buckets).subquery("buckets")
    total = cast(Any, func.sum(parts.c.count))
    return (
        select(parts.c.conf_tenths, total.label("count"))
        .group_by(parts.c.conf_tenths)
        .having(total > 0)
        .order_by(parts.c.conf_tenths.desc().nulls_last())
    )


def _rollup_intent_distribution(cover: StatsCover) -> AnySelect:
    columns = ("prompts", "confidence_count", "confidence_sum", "corrections")
    raw = _raw(
        cover,
        select(
            C.predicted_intent,
            func.count().label("prompts"),
            func.count(C.confidence).label("confidence_count"),
            func.sum(C.confidence.cast(Double)).label("confidence_sum"),
            func.count(C.corrected_intent).label("corrections"),
        ),
    ).group_by(C.predicted_intent)
    parts = union_all(
        *_rolled(cover, ("predicted_intent", "predicted_intent"), *((c, c) for c in columns)),
        raw,
    ).subquery("parts")
    count = func.sum(parts.c.prompts).cast(BigInteger).label("count")
    n_conf = func.sum(parts.c.confidence_count).cast(Double)
    avg = (func.sum(parts.c.confidence_sum) / func.nullif(n_conf, 0)).label("avg_conf")
    corrections = func.sum(parts.c.corrections).cast(BigInteger).label("corrections")
    return (
        select(parts.c.predicted_intent, count, avg, corrections)
        .group_by(parts.c.predicted_intent)
        .order_by(count.desc(), parts.c.predicted_intent.asc())
    )


def _rollup_success_rate_by_intent(cover: StatsCover) -> AnySelect:
    raw = _raw(
        cover,
        select(
            C.predicted_intent,
            func.count().label("total"),
            func.count(case((C.was_successful == true(), 1))).label("successes"),
        ).where(C.was_successful.is_not(None)),
    ).group_by(C.predicted_intent)
    parts = union_all(
        *_rolled(
            cover,
            ("predicted_intent", "predicted_intent"),
            ("outcomes", "total"),
            ("successes", "successes"),
            where=lambda table: table.c.outcomes > 0,
        ),
        raw,
    ).subquery("parts")
    total = func.sum(parts.c.total).cast(BigInteger)
    successes = func.sum(parts.c.successes).cast(BigInteger)
    rate_tenths = ((successes * 2000 + total) // (total * 2)).label("success_rate_tenths")
    return (
        select(
            parts.c.predicted_intent,
            total.label("total"),
            successes.label("successes"),
            rate_tenths,
        )
        .group_by(parts.c.predicted_intent)
        .having(total > 0)
        .order_by(rate_tenths.asc(), parts.c.predicted_intent.asc())
    )


# --------------------------------------------------------------------------- refresh


@dataclass(frozen=True, slots=True)
class RefreshStart:
    """The first step of a refresh (:func:`refresh_begin`): the state row is locked."""

    previous: datetime | None  # the watermark before this refresh
    candidate: datetime  # the newest watermark this refresh may set
    writers: tuple[str, ...]  # PostgreSQL: transactions writing the raw table at the start
    dialect: str


@dataclass(frozen=True, slots=True)
class StatsRefresh:
    """What :func:`refresh_prompt_stats` did."""

    previous_watermark: datetime | None
    watermark: datetime | None  # hours before it are rolled up
    dirty_hours: int  # marked hours recomputed
    hourly_rows: int  # rollup rows written
    daily_rows: int
    writers_waited_for: int  # transactions that were writing the raw table at the start
    writers_left: int  # of those, still writing when the wait ended (then no advance)

    @property
    def full(self) -> bool:
        """Whether every hour before the watermark was recomputed (the first refresh)."""
        return self.previous_watermark is None and self.watermark is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "previous_watermark": _iso(self.previous_watermark),
            "watermark": _iso(self.watermark),
            "full": self.full,
            "dirty_hours": self.dirty_hours,
            "hourly_rows": self.hourly_rows,
            "daily_rows": self.daily_rows,
            "writers_waited_for": self.writers_waited_for,
            "writers_left": self.writers_left,
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# The transactions (other than this one) holding the lock every INSERT, UPDATE, DELETE and COPY
# of the raw table takes until they end. pg_locks is readable by every role.
_WRITERS_SQL = (
    "SELECT DISTINCT l.virtualtransaction FROM pg_locks AS l"
    " WHERE l.locktype = 'relation' AND l.mode = 'RowExclusiveLock'"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND l.relation = CAST(:table_name AS regclass)"
    " AND l.pid IS DISTINCT FROM pg_backend_pid()"
)


def select_raw_writers() -> TextClause:
    """PostgreSQL: the virtual transaction ids now writing ``nlu_prompt_logs``."""
    return text(_WRITERS_SQL).bindparams(table_name=TABLE.name)


def select_raw_writers_left(writers: Sequence[str]) -> TextClause:
    """PostgreSQL: which of ``writers`` are still writing ``nlu_prompt_logs``."""
    return text(_WRITERS_SQL + " AND l.virtualtransaction IN :writers").bindparams(
        bindparam("writers", expanding=True), table_name=TABLE.name, writers=list(writers)
    )


def lock_stats_state() -> Update:
    """Lock the rollup's state row for this transaction (serialises refreshes; on SQLite it also
    takes the write lock first, so no writer commits between reading and recomputing)."""
    return (
        update(STATS_STATE)
        .where(STATS_STATE.c.id == 1)
        .values(refreshed_at=STATS_STATE.c.refreshed_at)
        .returning(STATS_STATE.c.watermark, STATS_STATE.c.late_after_seconds)
    )


def refresh_begin(session: Session) -> RefreshStart:
    """Step 1 of a refresh: lock the state, pick the newest hour it may close, and (PostgreSQL)
    list the transactions writing the raw table, which step 2 waits for.

    Why the wait makes the rollup exact on PostgreSQL: the triggers mark a change to a row whose
    ``created_at`` is older than ``late_after_seconds`` at the time of the change. A change they
    did not mark, to a row this refresh rolls up (``created_at`` < the candidate watermark <=
    ``now - late_after_seconds``), therefore happened before ``now``: its transaction already
    held the table lock listed here, so once it has ended the recompute sees the change.
    """
    dialect = session.get_bind().dialect.name
    row = session.execute(lock_stats_state()).first()
    if row is None:
        raise RuntimeError(
            f"{STATS_STATE.name} has no row: the database is not at the head schema revision; "
            "run `prompt-capture db upgrade`"
        )
    previous = from_db_datetime(row.watermark)
    if dialect != "postgresql":
        # SQLite: writers are serialised and the triggers compare with the watermark itself.
        return RefreshStart(previous, floor_hour(utc_now()), (), dialect)
    isolation = session.execute(text("SHOW transaction_isolation")).scalar_one()
    if isolation != "read committed":
        raise ValueError(
            f"refresh_prompt_stats: needs a READ COMMITTED transaction, found {isolation!r}; "
            "run it in a session with the default isolation level"
        )
    now = session.execute(select(func.clock_timestamp())).scalar_one()
    candidate = floor_hour(now - timedelta(seconds=int(row.late_after_seconds)))
    writers = tuple(session.execute(select_raw_writers()).scalars())
    return RefreshStart(previous, candidate, writers, dialect)


def refresh_finish(
    session: Session,
    start: RefreshStart,
    *,
    writers_left: Sequence[str] = (),
    until: datetime | None = None,
) -> StatsRefresh:
    """Step 3 of a refresh: consume the dirty marks before the new watermark, recompute those
    hours and the hours up to the new watermark, their closed days, and store the watermark.

    The watermark advances to ``start.candidate`` (at most ``floor_hour(until)``) only when no
    writer of step 1 is left; it never moves back.
    """
    previous = start.previous
    target: datetime | None = start.candidate if not writers_left else previous
    if target is not None and until is not None:
        target = min(target, floor_hour(until))
    if previous is not None and (target is None or target < previous):
        target = previous
    if target is None:
        return StatsRefresh(None, None, 0, 0, 0, len(start.writers), len(writers_left))
    if writers_left:
        logger.warning(
            "statistics refresh: %d transaction(s) still writing %s (virtual xids %s); "
            "the watermark stays at %s",
            len(writers_left),
            TABLE.name,
            ", ".join(writers_left),
            _iso(previous),
        )

    consumed = {
        floor_hour(h)
        for h in (
            from_db_datetime(v)
            for v in session.execute(
                delete(DIRTY).where(DIRTY.c.hour < target).returning(DIRTY.c.hour)
            ).scalars()
        )
        if h is not None
    }
    if previous is None:
        hour_spans = [Span(None, target)]
        day_spans = [Span(None, floor_day(target))]
    else:
        late = sorted(h for h in consumed if h < previous)
        hour_spans = _merge(
            [Span(h, h + HOUR) for h in late]
            + ([Span(previous, target)] if target > previous else [])
        )
        days = {floor_day(h) for h in late}
        day = floor_day(previous)
        while day < target:
            days.add(day)
            day += DAY
        day_spans = _merge(Span(d, d + DAY) for d in sorted(days) if d + DAY <= target)

    hourly_rows = daily_rows = 0
    for chunk in _chunks(hour_spans):
        session.execute(delete(HOURLY).where(_spans_clause(HOURLY.c.hour, chunk)))
        hourly_rows += _rowcount(session.execute(insert_hourly_from_logs(chunk)))
    for chunk in _chunks(day_spans):
        session.execute(delete(DAILY).where(_spans_clause(DAILY.c.day, chunk)))
        daily_rows += _rowcount(session.execute(insert_daily_from_hourly(chunk)))
    session.execute(
        update(STATS_STATE)
        .where(STATS_STATE.c.id == 1)
        .values(watermark=target, refreshed_at=utc_now())
    )
    return StatsRefresh(
        previous,
        target,
        len(consumed),
        hourly_rows,
        daily_rows,
        len(start.writers),
        len(writers_left),
    )


def _rowcount(result: Any) -> int:
    return max(int(result.rowcount), 0)


def _chunks(spans: Sequence[Span]) -> Iterable[Sequence[Span]]:
    for i in range(0, len(spans), REFRESH_SPANS_PER_STATEMENT):
        yield spans[i : i + REFRESH_SPANS_PER_STATEMENT]


def insert_hourly_from_logs(spans: Sequence[Span]) -> Insert:
    """Hourly rollup rows of the raw rows in ``spans`` (whole UTC hours).

    The bucket of each row is computed once in a subquery (``OFFSET 0`` keeps PostgreSQL from
    inlining it into the twelve bucket counts: ~40% less CPU in a full refresh).
    """
    rows = (
        select(
            utc_hour(C.created_at).label("hour"),
            C.predicted_intent,
            C.confidence,
            C.corrected_intent,
            C.was_successful,
            confidence_tenths(C.confidence).label("tenths"),
        )
        .where(_spans_clause(C.created_at, spans))
        .offset(0)
        .subquery("rows")
    )
    r = rows.c
    source = select(
        r.hour,
        r.predicted_intent,
        func.count().label("prompts"),
        func.count(r.confidence).label("confidence_count"),
        func.coalesce(func.sum(r.confidence.cast(Double)), 0.0).label("confidence_sum"),
        func.count(r.corrected_intent).label("corrections"),
        func.count(r.was_successful).label("outcomes"),
        func.count(case((r.was_successful == true(), 1))).label("successes"),
        *(func.count(case((r.tenths == k, 1))).label(f"tenths_{k}") for k in TENTHS),
        func.count(case((r.confidence.is_(None), 1))).label("tenths_null"),
    ).group_by(r.hour, r.predicted_intent)
    return (
        insert(HOURLY)
        .from_select(["hour", "predicted_intent", *MEASURES], source)
        .execution_options(preserve_rowcount=True)
    )


def insert_daily_from_hourly(spans: Sequence[Span]) -> Insert:
    """Daily rollup rows from the hourly rows in ``spans`` (whole UTC days)."""
    day = utc_day(HOURLY.c.hour)
    source = (
        select(
            day.label("day"),
            HOURLY.c.predicted_intent,
            *(func.sum(HOURLY.c[m]).label(m) for m in MEASURES),
        )
        .where(_spans_clause(HOURLY.c.hour, spans))
        .group_by(day, HOURLY.c.predicted_intent)
    )
    return (
        insert(DAILY)
        .from_select(["day", "predicted_intent", *MEASURES], source)
        .execution_options(preserve_rowcount=True)
    )


def reset_prompt_stats(session: Session) -> None:
    """Empty the rollup and forget the watermark: the statistics read the raw table until the
    next refresh, which then recomputes every hour (``prompt-capture db refresh-stats --rebuild``).
    """
    session.execute(lock_stats_state())
    for table in (HOURLY, DAILY, DIRTY):
        session.execute(delete(table))
    session.execute(update(STATS_STATE).where(STATS_STATE.c.id == 1).values(watermark=None))


def refresh_prompt_stats(
    *,
    session: Session,
    until: datetime | None = None,
    wait_timeout: float = 30.0,
    poll_interval: float = 0.05,
    sleep: Callable[[float], None] = time.sleep,
) -> StatsRefresh:
    """Bring the monitoring rollup up to date (synchronous; the caller owns the transaction and
    commits it). Idempotent: a second call right after the first recomputes nothing new.

    Recomputes the hours marked dirty (late outcomes, corrections, replayed or deleted rows) and
    every hour from the previous watermark up to the newest closed hour (PostgreSQL: ending at
    least ``late_after_seconds`` ago; SQLite: the current hour's start), at most ``until``.
    PostgreSQL waits up to ``wait_timeout`` seconds for transactions that were writing the raw
    table when it started; if some are still running it recomputes the dirty hours only.
    """
    start = refresh_begin(session)
    left = start.writers
    deadline = time.monotonic() + wait_timeout
    while left and time.monotonic() < deadline:
        sleep(poll_interval)
        left = tuple(session.execute(select_raw_writers_left(left)).scalars())
    return refresh_finish(session, start, writers_left=left, until=until)
