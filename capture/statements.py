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
:data:`CORRECTION_SET` say which columns they set. Lookups by id can be made "near the id's
time" (``near_id_time=True``, :func:`id_time_window`), which on PostgreSQL (partitioned by
``created_at``, migration 0007) reads one partition instead of probing all of them.

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
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import (
    Insert,
    Select,
    TextClause,
    Update,
    bindparam,
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
from sqlalchemy.dialects.postgresql import ARRAY

from capture import rollup_statements as _rollup
from capture.dialect_sql import confidence_tenths
from capture.ids import uuid7_time_ms
from capture.models import PROMPT_LOGS
from capture.rollup_statements import (
    checked_cover,
    rollup_confidence_distribution,
    rollup_intent_distribution,
    rollup_success_rate_by_intent,
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
    from capture.stats_rollup import StatsCover

logger = logging.getLogger(__name__)

TABLE = PROMPT_LOGS
C = TABLE.c
#: The monitoring rollup's tables and measures (:mod:`capture.rollup_statements`).
HOURLY, DAILY, STATS_STATE, DIRTY = (
    _rollup.HOURLY,
    _rollup.DAILY,
    _rollup.STATS_STATE,
    _rollup.DIRTY,
)
MEASURES = _rollup.MEASURES
spans_clause = _rollup.spans_clause

#: The PostgreSQL setting the row-level-security policies compare ``user_id`` with.
USER_SCOPE_SETTING = "app.user_id"


#: A SELECT of any number of columns of any type.
AnySelect = Select[*tuple[Any, ...]]
_SelectT = TypeVar("_SelectT", bound=AnySelect)
_StmtT = TypeVar("_StmtT", AnySelect, Update)
_ChangeT = TypeVar("_ChangeT", bound=Change)


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


# --------------------------------------------------------------------------- lookups by id
#
# On PostgreSQL the table is partitioned by created_at (migration 0007) and its primary key is
# (id, created_at): a lookup by id alone probes the primary-key index of every partition. A
# UUIDv7 carries the millisecond it was made, and every writer of this project takes the id and
# created_at from one clock reading, so a lookup first searches created_at within ID_TIME_SLACK
# of the id's time ("near the id's time": the planner prunes to the one partition, two near a
# boundary). Nothing guarantees that pairing (a caller may pass its own id or created_at), so
# callers look again without the range when the first lookup finds nothing: the repository, the
# capture writer's batch updates.

#: How far from a UUIDv7's time a lookup near the id's time searches ``created_at``.
ID_TIME_SLACK = timedelta(minutes=5)


def id_time_window(log_id: uuid.UUID) -> tuple[datetime, datetime] | None:
    """``(from, to)``: the ``created_at`` range a lookup near the id's time searches
    (``from <= created_at < to``), or None when ``log_id`` is not a UUIDv7."""
    if log_id.version != 7:
        return None
    try:
        made = datetime.fromtimestamp(uuid7_time_ms(log_id) / 1000, UTC)
        return made - ID_TIME_SLACK, made + ID_TIME_SLACK
    except (OverflowError, ValueError, OSError):
        return None  # a time no datetime holds: not one of ours


def _near(stmt: _StmtT, window: tuple[datetime, datetime] | None) -> _StmtT:
    if window is None:
        return stmt
    return stmt.where(C.created_at >= window[0], C.created_at < window[1])


def select_prompt_log(log_id: uuid.UUID | str, *, near_id_time: bool = False) -> AnySelect:
    """The row with this id. ``near_id_time``: only if its ``created_at`` is near the id's time
    (:func:`id_time_window`; the same as without it for an id that is not a UUIDv7), which on
    PostgreSQL reads one partition; look again without it when that finds nothing."""
    uid = as_uuid(log_id, "log_id")
    stmt = select(TABLE).where(C.id == uid)
    return _near(stmt, id_time_window(uid)) if near_id_time else stmt


def select_log_id(log_id: uuid.UUID | str, *, near_id_time: bool = False) -> AnySelect:
    """The id, if a row has it (``near_id_time``: as :func:`select_prompt_log`)."""
    uid = as_uuid(log_id, "log_id")
    stmt = select(C.id).where(C.id == uid)
    return _near(stmt, id_time_window(uid)) if near_id_time else stmt


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
        return rollup_confidence_distribution(checked_cover(cover, since))
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
        return rollup_intent_distribution(checked_cover(cover, since))
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
        return rollup_success_rate_by_intent(checked_cover(cover, since))
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


def update_logs(
    kind: type[Change],
    *,
    user_scoped: bool = False,
    batch: bool = False,
    near_id_time: bool = False,
) -> Update:
    """THE update statement of ``kind`` (:class:`capture.rows.Outcome` or ``Correction``).

    Default form: binds ``b_<field>`` (:func:`change_params`); execute it with one parameter
    dict or a list of them (executemany). ``rowcount`` 0: no such row (or not the user's:
    ``user_scoped`` adds ``AND user_id = :b_user_id``).

    ``batch=True`` (PostgreSQL): one statement for many updates of distinct rows, fed from
    ``unnest`` of ``a_<field>`` arrays (:func:`batch_params`), ``RETURNING`` the ids found.

    ``near_id_time``: only rows whose ``created_at`` is near the id's time: ``created_from <=
    created_at < created_to`` (one row: :func:`id_time_window`; a batch: the span of its rows'
    windows, see :func:`near_id_time_groups`), which PostgreSQL prunes to the partition(s) of
    that span when it plans the statement. Pass the parameters with the same flag, and update
    the ids it did not find again without it.
    """
    sets = change_set(kind)
    if batch:
        arrays = [
            bindparam(f"a_{f}", type_=ARRAY(C[_FIELD_COLUMN.get(f, f)].type)) for f in kind._fields
        ]
        source = func.unnest(*arrays).table_valued(*kind._fields).render_derived(name="u")
        stmt = update(TABLE).where(C.id == source.c.log_id)
        if near_id_time:
            stmt = stmt.where(
                C.created_at >= bindparam("created_from", type_=C.created_at.type),
                C.created_at < bindparam("created_to", type_=C.created_at.type),
            )
        return stmt.values({column: source.c[field] for column, field in sets.items()}).returning(
            C.id
        )
    return _update_row(sets, user_scoped, None, near_id_time)


def near_id_time_groups(changes: Sequence[_ChangeT]) -> tuple[list[list[_ChangeT]], list[_ChangeT]]:
    """``changes`` split for batch updates near the id's time: groups whose ids were made on
    the same UTC day (each group's span then lies in one or two partitions), and the changes
    whose id is not a UUIDv7 (no time to look near)."""
    groups: dict[datetime, list[_ChangeT]] = {}
    others: list[_ChangeT] = []
    for change in changes:
        window = id_time_window(change.log_id)
        if window is None:
            others.append(change)
        else:
            day = (window[0] + ID_TIME_SLACK).replace(hour=0, minute=0, second=0, microsecond=0)
            groups.setdefault(day, []).append(change)
    return [groups[day] for day in sorted(groups)], others


def _update_row(
    sets: Mapping[str, str],
    user_scoped: bool,
    bound: Mapping[str, Any] | None,
    near_id_time: bool = False,
) -> Update:
    def param(name: str) -> Any:
        return bindparam(name) if bound is None else bindparam(name, bound[name])

    stmt = update(TABLE).where(C.id == param("b_log_id"))
    if user_scoped:
        stmt = stmt.where(C.user_id == param("b_user_id"))
    if near_id_time:
        stmt = stmt.where(
            C.created_at >= param("b_created_from"), C.created_at < param("b_created_to")
        )
    return stmt.values({column: param(f"b_{field}") for column, field in sets.items()})


def _window_of(log_id: uuid.UUID) -> tuple[datetime, datetime]:
    window = id_time_window(log_id)
    if window is None:
        raise ValueError(
            f"log_id: {log_id} is not a UUIDv7, so it has no time to look near; "
            "use the form without near_id_time"
        )
    return window


def change_params(
    change: Change, user_id: uuid.UUID | None = None, *, near_id_time: bool = False
) -> dict[str, Any]:
    """The parameters of :func:`update_logs` for one update (``user_id``: user-scoped form;
    ``near_id_time``: that form, ``ValueError`` unless the id is a UUIDv7)."""
    params = {f"b_{field}": value for field, value in zip(change._fields, change, strict=True)}
    if user_id is not None:
        params["b_user_id"] = user_id
    if near_id_time:
        params["b_created_from"], params["b_created_to"] = _window_of(change.log_id)
    return params


def batch_params(changes: Sequence[Change], *, near_id_time: bool = False) -> dict[str, Any]:
    """The parameters of ``update_logs(kind, batch=True)`` for updates of one kind
    (``near_id_time``: that form, whose range spans the windows of every id; each must be a
    UUIDv7, see :func:`id_time_window`; group them with :func:`near_id_time_groups`)."""
    fields = type(changes[0])._fields
    params: dict[str, Any] = {f"a_{f}": [getattr(c, f) for c in changes] for f in fields}
    if near_id_time:
        windows = [_window_of(c.log_id) for c in changes]
        params["created_from"] = min(w[0] for w in windows)
        params["created_to"] = max(w[1] for w in windows)
    return params


def update_correction(
    log_id: uuid.UUID | str,
    *,
    corrected_intent: str,
    correction_notes: str | None = None,
    corrected_at: datetime,
    user_id: uuid.UUID | str | None = None,
    near_id_time: bool = False,
) -> Update:
    """:func:`update_logs` for one validated correction (``rowcount`` 0: no such row, or not
    the user's; ``near_id_time``: as :func:`update_change`)."""
    change = Correction.checked(
        log_id,
        corrected_intent=corrected_intent,
        correction_notes=correction_notes,
        at=corrected_at,
    )
    return update_change(change, user_id=user_id, near_id_time=near_id_time)


def update_change(
    change: Change, *, user_id: uuid.UUID | str | None = None, near_id_time: bool = False
) -> Update:
    """:func:`update_logs` for one update, its values bound (``user_id``: only that user's row;
    ``rowcount`` 0: no such row, or not the user's). ``near_id_time``: only a row whose
    ``created_at`` is near the id's time (one partition on PostgreSQL; the same as without it
    for an id that is not a UUIDv7): update again without it when it finds nothing."""
    uid = optional_uuid(user_id, "user_id")
    near = near_id_time and id_time_window(change.log_id) is not None
    return _update_row(
        change_set(type(change)),
        uid is not None,
        change_params(change, uid, near_id_time=near),
        near,
    )


def set_user_scope(user_id: uuid.UUID | str) -> TextClause:
    """PostgreSQL only: make ``user_id`` the row-level-security scope until the transaction ends."""
    uid = as_uuid(user_id, "user_id")
    return text("SELECT set_config(:setting, :uid, true)").bindparams(
        setting=USER_SCOPE_SETTING, uid=str(uid)
    )
