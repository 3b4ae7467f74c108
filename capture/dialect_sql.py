"""SQL functions compiled per dialect, so that one statement gives the same result on
PostgreSQL and SQLite (SQLAlchemy ``@compiles``): build nothing, execute nothing.

- :class:`confidence_tenths`: ``ROUND(confidence::numeric, 1) * 10`` as an integer (the
  monitoring statistics' confidence buckets, the rollup's ``tenths_<k>`` columns);
- :class:`utc_hour` / :class:`utc_day`: the start of a timestamp's UTC hour / day (the rollup's
  keys; migration 0004's triggers compute the same values).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Integer
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import FunctionElement

logger = logging.getLogger(__name__)


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


_Timestamp = DateTime(timezone=True)


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
