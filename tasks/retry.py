"""The retry rule of the Prefect tasks: retry I/O failures, never a user's mistake.

``@task(retries=2, retry_condition_fn=retry_on_io)`` retries a task whose exception
``capture.errors.is_transient`` calls transient (file system, connection, a dropped database
connection); a ``UserError`` (a bad file, a bad value) fails at once, so the person sees the
message once instead of after two pointless retries.
"""

from __future__ import annotations

import logging
from typing import Any

from capture.errors import is_transient

logger = logging.getLogger(__name__)


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
