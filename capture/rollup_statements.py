"""The monitoring statistics read through the rollup (migration 0004): the statements of
:mod:`capture.statements` take a ``cover`` (:func:`capture.stats_rollup.load_stats_cover`) and
build these, which add the hourly and daily rows of the cover to the raw rows it does not hold
(``UNION ALL``, then ``SUM``), with exactly the raw statements' result. Builders only build.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import (
    BigInteger,
    Double,
    Integer,
    Select,
    Table,
    case,
    func,
    literal,
    null,
    or_,
    select,
    true,
    union_all,
)
from sqlalchemy.sql.expression import ColumnElement

from capture.dialect_sql import confidence_tenths
from capture.models import (
    PROMPT_LOGS,
    TENTHS,
    TENTHS_COLUMNS,
    PromptStatsDaily,
    PromptStatsDirty,
    PromptStatsHourly,
    PromptStatsState,
)
from capture.values import to_utc

if TYPE_CHECKING:
    from capture.stats_rollup import Span, StatsCover

logger = logging.getLogger(__name__)

TABLE = PROMPT_LOGS
C = TABLE.c
#: The monitoring rollup (migration 0004), filled by :mod:`capture.stats_rollup`.
HOURLY = cast(Table, PromptStatsHourly.__table__)
DAILY = cast(Table, PromptStatsDaily.__table__)
STATS_STATE = cast(Table, PromptStatsState.__table__)
DIRTY = cast(Table, PromptStatsDirty.__table__)
MEASURES = (
    "prompts",
    "confidence_count",
    "confidence_sum",
    "corrections",
    "outcomes",
    "successes",
    *TENTHS_COLUMNS,
)

AnySelect = Select[*tuple[Any, ...]]
_SelectT = TypeVar("_SelectT", bound=AnySelect)


def spans_clause(column: Any, spans: Sequence[Span]) -> ColumnElement[bool]:
    """``column`` inside any of ``spans`` (see :class:`capture.stats_rollup.Span`)."""
    return or_(*(span.clause(column) for span in spans))


def checked_cover(cover: StatsCover, since: datetime | None) -> StatsCover:
    expected = None if since is None else to_utc(since, "since")
    if cover.since != expected:
        raise ValueError(
            f"cover: planned for since={cover.since}, used with since={expected}; "
            "plan it with stats_rollup.load_stats_cover(session, since) for this window"
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
            spans_clause(table.c[key], spans)
        )
        if excluded:
            stmt = stmt.where(table.c[key].not_in(excluded))
        if where is not None:
            stmt = stmt.where(where(table))
        parts.append(stmt)
    return parts


def _raw(cover: StatsCover, stmt: _SelectT) -> _SelectT:
    return stmt.where(spans_clause(C.created_at, cover.raw))


def rollup_confidence_distribution(cover: StatsCover) -> AnySelect:
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


def rollup_intent_distribution(cover: StatsCover) -> AnySelect:
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


def rollup_success_rate_by_intent(cover: StatsCover) -> AnySelect:
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
