"""The one base class of user-fixable errors.

A ``UserError`` is a mistake the person running the system can fix: a malformed file, a bad
command-line value, a database that was never migrated, a model directory that is not one.
Its message names what was expected, what was found (file, row, field) and the fix. The CLI turns
every ``UserError`` into one line on stderr and exit code 2; Prefect tasks never retry one
(``is_transient`` is the retry condition); anything else is a bug or an I/O failure and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or setup; the message says what to change."""


#: File-system errors that a retry cannot fix: the path itself is wrong (a file where a folder
#: must be, a folder where a file must be, an existing file, no permission).
PATH_MISTAKES = (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_transient(exc: BaseException) -> bool:
    """True when retrying could help: I/O and connection failures, never a ``UserError``.

    Used as the retry condition of the Prefect tasks that do I/O (``retry_condition_fn``).
    """
    if isinstance(exc, UserError | ValueError | TypeError | KeyError | LookupError):
        return False
    if isinstance(exc, PATH_MISTAKES):
        return False
    return isinstance(exc, OSError | ConnectionError | TimeoutError) or _is_db_disconnect(exc)


def _is_db_disconnect(exc: BaseException) -> bool:
    # Lazy: SQLAlchemy is a dependency of capture/, but this module must stay import-cheap.
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
