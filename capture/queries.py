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
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Insert,
    Integer,
    Select,
    Table,
    TextClause,
    Update,
    case,
    false,
    func,
    insert,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from capture.models import PromptLog
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


def select_confidence_distribution(*, since: datetime | None = None) -> AnySelect:
    """Row counts per confidence rounded to one decimal, highest bucket first."""
    tenths = confidence_tenths(C.confidence).label("conf_tenths")
    stmt = select(tenths, func.count().label("count")).group_by(tenths)
    return _window(stmt, since).order_by(tenths.desc().nulls_last())


def select_intent_distribution(*, since: datetime | None = None) -> AnySelect:
    """Per predicted intent: rows, average confidence, corrections; most frequent first.

    The design note's single GROUP BY, split in two so PostgreSQL can answer each part from an
    index: counts and averages from the covering ``created_at`` index (index-only), corrections
    from the small partial index on corrected rows (instead of reading every row of the window
    from the heap for ``COUNT(corrected_intent)``).
    """
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


def select_success_rate_by_intent(*, since: datetime | None = None) -> AnySelect:
    """Per predicted intent with a known outcome: total, successes, success rate (tenths of a
    percent, half up); lowest rate first."""
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
