"""SQL statement builders over ``nlu_prompt_logs`` and its rollup, shared by every caller.

The async repository (``capture.repository``), the capture logger and the synchronous Prefect
tasks (which use ``capture.db.get_sync_engine(url)`` and a ``Session``) build each statement
here, so there is one definition of every query; :mod:`capture.rows` maps its rows::

    with Session(get_sync_engine(url)) as session:
        stmt = statements.select_low_confidence(threshold=0.7, limit=100, since=since)
        found = [rows.map_prompt_log(row) for row in session.execute(stmt)]

Builders only build: nothing here executes. Inputs are validated when the statement is built
(``ValueError`` naming the field); time windows and values follow :mod:`capture.values`.

Outcomes and corrections have ONE update statement each (:func:`update_logs`), which the
repository runs for one row and the capture logger for a batch; :data:`OUTCOME_SET` and
:data:`CORRECTION_SET` say which columns they set.

The three monitoring statistics follow the design note's SQL and return identical results on
PostgreSQL and SQLite. Given a ``cover`` planned by :mod:`capture.stats_rollup` they read the
hourly/daily rollup plus the raw rows it does not hold, with the same result:

- confidence buckets: PostgreSQL runs ``ROUND(confidence::numeric, 1)`` literally. SQLite has no
  numeric type, so the same value is computed in integer arithmetic: the float4 value rounded to
  6 significant digits (what PostgreSQL's real→numeric cast does), then half away from zero to
  one decimal (:class:`capture.dialect_sql.confidence_tenths`).
- average confidence: ``AVG(confidence)``, rounded to 6 decimals by the mapper (the two engines
  add doubles in different orders; float4 inputs carry ~7 significant digits anyway).
- success rate: ``ROUND(100.0 * successes / total, 1)`` equals ``(2000 * s + t) // (2 * t)``
  tenths of a percent (exact half-up rounding of the rational), computed in integers on both.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import (
    BigInteger,
    Double,
    Insert,
    Integer,
    Select,
    Table,
    TextClause,
    Update,
    bindparam,
    case,
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
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.expression import ColumnElement

from capture.dialect_sql import confidence_tenths
from capture.models import (
    TENTHS,
    TENTHS_COLUMNS,
    PromptLog,
    PromptStatsDaily,
    PromptStatsDirty,
    PromptStatsHourly,
    PromptStatsState,
)
from capture.rows import Change, Correction, Outcome
from capture.types import check_confidence
from capture.values import (
    as_real,
    as_uuid,
    optional_uuid,
    to_utc,
)

if TYPE_CHECKING:
    from capture.stats_rollup import Span, StatsCover

logger = logging.getLogger(__name__)

TABLE = cast(Table, PromptLog.__table__)
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

#: The PostgreSQL setting the row-level-security policies compare ``user_id`` with.
USER_SCOPE_SETTING = "app.user_id"


#: A SELECT of any number of columns of any type.
AnySelect = Select[*tuple[Any, ...]]
_SelectT = TypeVar("_SelectT", bound=AnySelect)


def _window(stmt: _SelectT, since: datetime | None, until: datetime | None = None) -> _SelectT:
    """``created_at`` in ``(since, until]`` (either end open when None)."""
    if since is not None:
        stmt = stmt.where(C.created_at > to_utc(since, "since"))
    if until is not None:
        stmt = stmt.where(C.created_at <= to_utc(until, "until"))
    return stmt


def _check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit: expected a positive integer, found {limit!r}")
    return limit


def _check_fraction(value: float, field: str) -> float:
    """A validated confidence bound, rounded to float4 like the stored values, so that a row
    logged with 0.7 is not "below 0.7" (float4(0.7) < 0.7 as doubles)."""
    check_confidence(value, field)
    return as_real(float(value))


# --------------------------------------------------------------------------- prompt logs


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
    *, min_confidence: float = 0.9, since: datetime | None = None, until: datetime | None = None
) -> AnySelect:
    """Corrected prompts, plus uncorrected ones with ``confidence >= min_confidence`` whose
    workflow did not fail, created in ``(since, until]``; oldest first. Map rows with
    :func:`map_retraining_row`.

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
    return _window(stmt, since, until)


def select_confidence_distribution(
    *,
    since: datetime | None = None,
    cover: StatsCover | None = None,
    until: datetime | None = None,
) -> AnySelect:
    """Row counts per confidence rounded to one decimal, highest bucket first.

    With a ``cover`` (:func:`capture.stats_rollup.load_stats_cover`) the same rows come from the
    rollup plus the raw rows the rollup does not hold; without one, from the raw table.
    ``until`` (raw table only) ends the window: ``created_at <= until``.
    """
    if cover is not None:
        return _rollup_confidence_distribution(_checked_cover(cover, since))
    tenths = confidence_tenths(C.confidence).label("conf_tenths")
    stmt = select(tenths, func.count().label("count")).group_by(tenths)
    return _window(stmt, since, until).order_by(tenths.desc().nulls_last())


def select_intent_distribution(
    *,
    since: datetime | None = None,
    cover: StatsCover | None = None,
    until: datetime | None = None,
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
        until,
    ).subquery("totals")
    corrections = _window(
        select(C.predicted_intent, func.count().label("corrections"))
        .where(C.corrected_intent.is_not(None))
        .group_by(C.predicted_intent),
        since,
        until,
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
    *,
    since: datetime | None = None,
    cover: StatsCover | None = None,
    until: datetime | None = None,
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
    return _window(stmt, since, until).order_by(rate_tenths.asc(), C.predicted_intent.asc())


# --------------------------------------------------------------------------- updates
#
# An outcome and a correction are each ONE statement: the repository runs it for one row, the
# capture logger for a batch (SQLite: executemany; PostgreSQL: the same SET clause fed from
# ``unnest`` arrays, one statement per batch). What each sets is defined once, below, and the
# logger merges an update into a still-queued insert with the same mapping.

#: The columns an :class:`capture.rows.Outcome` sets: column -> field.
OUTCOME_SET: Mapping[str, str] = {
    "was_successful": "was_successful",
    "workflow_type": "workflow_type",
    "execution_error": "execution_error",
    "updated_at": "at",
}
#: The columns a :class:`capture.rows.Correction` sets: column -> field.
CORRECTION_SET: Mapping[str, str] = {
    "corrected_intent": "corrected_intent",
    "correction_notes": "correction_notes",
    "corrected_at": "at",
    "updated_at": "at",
}
_FIELD_COLUMN = {"log_id": "id", "at": "updated_at"}  # fields not named after a column


def change_set(kind: type[Change]) -> Mapping[str, str]:
    """What an update of type ``kind`` (``Outcome`` or ``Correction``) sets: column -> field."""
    return OUTCOME_SET if kind is Outcome else CORRECTION_SET


def update_logs(kind: type[Change], *, user_scoped: bool = False, batch: bool = False) -> Update:
    """THE update statement of ``kind`` (:class:`capture.rows.Outcome` or ``Correction``).

    Default form: binds ``b_<field>`` (:func:`change_params`); execute it with one parameter
    dict or a list of them (executemany). ``rowcount`` 0: no such row (or not the user's:
    ``user_scoped`` adds ``AND user_id = :b_user_id``).

    ``batch=True`` (PostgreSQL): one statement for many updates of distinct rows, fed from
    ``unnest`` of ``a_<field>`` arrays (:func:`batch_params`), ``RETURNING`` the ids found.
    """
    sets = change_set(kind)
    if batch:
        arrays = [
            bindparam(f"a_{f}", type_=ARRAY(C[_FIELD_COLUMN.get(f, f)].type)) for f in kind._fields
        ]
        source = func.unnest(*arrays).table_valued(*kind._fields).render_derived(name="u")
        return (
            update(TABLE)
            .where(C.id == source.c.log_id)
            .values({column: source.c[field] for column, field in sets.items()})
            .returning(C.id)
        )
    return _update_row(sets, user_scoped, None)


def _update_row(
    sets: Mapping[str, str], user_scoped: bool, bound: Mapping[str, Any] | None
) -> Update:
    def param(name: str) -> Any:
        return bindparam(name) if bound is None else bindparam(name, bound[name])

    stmt = update(TABLE).where(C.id == param("b_log_id"))
    if user_scoped:
        stmt = stmt.where(C.user_id == param("b_user_id"))
    return stmt.values({column: param(f"b_{field}") for column, field in sets.items()})


def change_params(change: Change, user_id: uuid.UUID | None = None) -> dict[str, Any]:
    """The parameters of :func:`update_logs` for one update (``user_id``: user-scoped form)."""
    params = {f"b_{field}": value for field, value in zip(change._fields, change, strict=True)}
    if user_id is not None:
        params["b_user_id"] = user_id
    return params


def batch_params(changes: Sequence[Change]) -> dict[str, list[Any]]:
    """The parameters of ``update_logs(kind, batch=True)`` for updates of one kind."""
    fields = type(changes[0])._fields
    return {f"a_{field}": [getattr(c, field) for c in changes] for field in fields}


def update_correction(
    log_id: uuid.UUID | str,
    *,
    corrected_intent: str,
    correction_notes: str | None = None,
    corrected_at: datetime,
    user_id: uuid.UUID | str | None = None,
) -> Update:
    """:func:`update_logs` for one validated correction (``rowcount`` 0: no such row, or not
    the user's)."""
    change = Correction.checked(
        log_id,
        corrected_intent=corrected_intent,
        correction_notes=correction_notes,
        at=corrected_at,
    )
    return update_change(change, user_id=user_id)


def update_change(change: Change, *, user_id: uuid.UUID | str | None = None) -> Update:
    """:func:`update_logs` for one update, its values bound (``user_id``: only that user's row;
    ``rowcount`` 0: no such row, or not the user's)."""
    uid = optional_uuid(user_id, "user_id")
    return _update_row(change_set(type(change)), uid is not None, change_params(change, uid))


def set_user_scope(user_id: uuid.UUID | str) -> TextClause:
    """PostgreSQL only: make ``user_id`` the row-level-security scope until the transaction ends."""
    uid = as_uuid(user_id, "user_id")
    return text("SELECT set_config(:setting, :uid, true)").bindparams(
        setting=USER_SCOPE_SETTING, uid=str(uid)
    )


def spans_clause(column: Any, spans: Sequence[Span]) -> ColumnElement[bool]:
    """``column`` inside any of ``spans`` (see :class:`capture.stats_rollup.Span`)."""
    return or_(*(span.clause(column) for span in spans))


def _checked_cover(cover: StatsCover, since: datetime | None) -> StatsCover:
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
