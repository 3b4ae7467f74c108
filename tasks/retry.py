"""The retry rule of the Prefect tasks: retry I/O failures, never a user's mistake.

A task retried on failure uses ``retry_condition_fn=retry_on_io``: a task whose exception
``capture.errors.is_transient`` calls transient (file system, connection, a dropped database
connection) is retried; a ``UserError`` (a bad file, a bad value) fails at once, so the person
sees the message once instead of after two pointless retries.

:func:`io_task` is THE declaration of such a task (no cache, ``retries`` retries
``retry_delay_seconds`` apart, only on I/O failures), as a decorator or a call::

    @io_task(name="write-training-summary", retry_delay_seconds=1)
    def write_summary(export: TrainingDataExport) -> Path: ...

    export_review_task = io_task(export_review, name="export-review")

The result keeps the function's signature for mypy (``Task[P, R]``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, overload

from prefect import Task, task
from prefect.cache_policies import NO_CACHE

from capture.errors import is_transient

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_RETRIES", "DEFAULT_RETRY_DELAY_SECONDS", "io_task", "retry_on_io"]

P = ParamSpec("P")
R = TypeVar("R")

#: Retries of an :func:`io_task` (after the first attempt).
DEFAULT_RETRIES = 2
#: Seconds between two attempts of an :func:`io_task`.
DEFAULT_RETRY_DELAY_SECONDS = 2.0


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: True when the failed state's exception is transient."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # a result that cannot be read: do not retry blindly
            logger.debug("retry_on_io: could not read the failed state's exception")
            return False
    return isinstance(exc, BaseException) and is_transient(exc)


@overload
def io_task(
    fn: Callable[P, R],
    *,
    name: str,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY_SECONDS,
) -> Task[P, R]: ...


@overload
def io_task(
    fn: None = None,
    *,
    name: str,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY_SECONDS,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def io_task(
    fn: Callable[P, R] | None = None,
    *,
    name: str,
    retries: int = DEFAULT_RETRIES,
    retry_delay_seconds: float = DEFAULT_RETRY_DELAY_SECONDS,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """``fn`` as a Prefect task named ``name``, without a result cache, retried ``retries``
    times ``retry_delay_seconds`` apart on I/O failures only (:func:`retry_on_io`).

    ``io_task(fn, name=...)`` returns the task; ``io_task(name=...)`` returns a decorator.
    ``retries`` must be >= 0 and ``retry_delay_seconds`` >= 0 (``ValueError`` otherwise: a
    programming mistake, found at import time).
    """
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"io_task {name!r}: retries must be an integer >= 0, not {retries!r}")
    if not retry_delay_seconds >= 0:
        raise ValueError(
            f"io_task {name!r}: retry_delay_seconds must be >= 0, not {retry_delay_seconds!r}"
        )

    def wrap(function: Callable[P, R]) -> Task[P, R]:
        return task(
            name=name,
            cache_policy=NO_CACHE,
            retries=retries,
            retry_delay_seconds=retry_delay_seconds,
            retry_condition_fn=retry_on_io,
        )(function)

    return wrap if fn is None else wrap(fn)
