"""The ONE lock of the model registry: runs that change it, or what serves, run one at a time.

Who takes it (each through :func:`registry_lock`, which is re-entrant within one thread):

* ``tasks.registry``: ``publish`` (reserving and filling a version), ``deploy`` and ``rollback``
  (the ``current`` switch and ``history.jsonl``), whoever calls them: a flow, a task, the CLI
  (``prompt-capture rollback``), a script;
* the flows that read the registry and then change it on what they read: the weekly cycle
  (held from the inbox to the deploy, so "challenger N" is reserved, trained, gated against the
  champion serving at that time, published and deployed with nobody in between), ``retrain``
  (next version -> train -> score -> gate -> publish) and ``deploy`` (choose -> ONNX export ->
  switch). Any later run that changes what serves (the A/B candidate pointer) takes it too.

Prefect 3 runs a sync subflow and a sync task in the caller's thread, so the weekly cycle's
``retrain`` and ``deploy`` subflows re-enter the lock it holds (tests/test_registry_lock.py
checks this). A second run anywhere else (another process, another host on the same file
system, another thread) waits: it logs once whom it waits for (pid, host, run, since) and again
every :data:`WAIT_LOG_INTERVAL_S`, and after ``timeout`` seconds fails with
:class:`RegistryBusyError` (a ``UserError``: never retried, one line in the CLI).

Never hold it while a run waits for a person (``pause_flow_run`` / ``suspend_flow_run`` / an
input form): review happens before the weekly cycle, never inside one of these runs.

The lock never creates the registry: when ``models_dir`` is not a folder it raises
:class:`NoRegistryError` (only ``prompt-capture init``, the demo and the simulator create one, by
``tasks.layout.HomeLayout.create_registry``), so a command run against the wrong or an unset
home fails instead of leaving a new, empty ``models/`` that later commands would accept.

The lock is ``models_dir/.registry.lock``, an ``flock`` by :mod:`filelock` (the kernel releases it
when its process dies, so a crash never leaves it held). While held, the file holds the holder
as JSON; it is left in place (empty) on release so every waiter locks the same file.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from capture.errors import UserError

logger = logging.getLogger(__name__)
# The "waiting for the registry" lines outside a flow run: progress the CLI keeps off the
# console unless --verbose (deployments.cli_support.QUIET_LOGGERS).
wait_logger = logging.getLogger(f"{__name__}.wait")

LOCK_FILE = ".registry.lock"
#: How long a run waits for another one to finish by default (a weekly retrain takes minutes
#: to an hour on CPU); past this the waiting run fails with :class:`RegistryBusyError`.
DEFAULT_LOCK_TIMEOUT_S = 6 * 3600.0
#: How often a waiting run says again that it is still waiting, and for whom.
WAIT_LOG_INTERVAL_S = 60.0

_locks: dict[tuple[int, str], FileLock] = {}  # by (pid, path): a forked child makes its own
_locks_guard = threading.Lock()
_pending = threading.local()  # the holder record the next physical acquire writes


class RegistryBusyError(UserError, RuntimeError):
    """Another run held the registry lock for longer than this run would wait; the message
    names the holder (pid, host, run, since) and the fix."""


class NoRegistryError(UserError, FileNotFoundError):
    """The registry folder does not exist: the home is not set up, or is the wrong one; the
    message names the folder and the fix (nothing is created)."""


def require_registry_dir(models_dir: Path, action: str | None = None) -> Path:
    """``models_dir`` when it is a folder; else raise :class:`NoRegistryError`, its message
    prefixed with ``action`` (the command, e.g. ``deploy``) when given."""
    models_dir = Path(models_dir)
    if models_dir.is_dir():
        return models_dir
    prefix = f"{action}: " if action else ""
    raise NoRegistryError(
        f"{prefix}there is no registry at {models_dir}; point PROMPT_CAPTURE_HOME at the home "
        "that holds the models (`prompt-capture models` lists them), or set up a new home "
        "with `prompt-capture init`"
    )


def lock_path(models_dir: Path) -> Path:
    """Where the registry lock of ``models_dir`` lives."""
    return Path(models_dir) / LOCK_FILE


def _lock_for(models_dir: Path) -> FileLock:
    path = lock_path(require_registry_dir(models_dir))  # never creates the registry
    resolved = str(path.resolve())
    key = (os.getpid(), resolved)
    with _locks_guard:
        lock = _locks.get(key)
        if lock is None:
            # thread_local: holds are per thread (a subflow in the caller's thread re-enters;
            # another thread of this process waits like another process would).
            lock = FileLock(resolved, thread_local=True, on_acquired=_write_holder)
            _locks[key] = lock
        return lock


def _write_holder(fd: int) -> None:
    """``on_acquired`` callback: record who holds the lock in the lock file itself."""
    record = getattr(_pending, "record", None) or {}
    data = json.dumps(record, sort_keys=True).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _run_name() -> str:
    """The Prefect flow run (``flow/run-name (id)``), or the command line outside a run."""
    try:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
    except Exception:  # Prefect missing or misconfigured: say what the process is instead
        context = None
    if context is not None and context.flow_run is not None:
        flow_name = context.flow.name if context.flow is not None else "flow"
        return f"{flow_name}/{context.flow_run.name} ({context.flow_run.id})"
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    command = " ".join(argv)
    return "command: " + (command if len(command) <= 160 else command[:157] + "...")


def holder_record(run: str | None = None) -> dict[str, Any]:
    """Who this process is, as the lock file records it: pid, host, run, since (ISO 8601)."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "run": run or _run_name(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def read_holder(models_dir: Path) -> dict[str, Any] | None:
    """The holder recorded in the lock file, or None (no lock file, released, or unreadable).
    Advisory: read without the lock, it may be a moment out of date."""
    try:
        raw = lock_path(models_dir).read_text(encoding="utf-8")
        data = json.loads(raw) if raw.strip() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data else None


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``pid 123 on host h (run 'weekly-cycle/x'), since 2026-...`` or an unknown holder."""
    if not holder:
        return "another run (not recorded yet)"
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"(run {holder.get('run', '?')!r}), since {holder.get('since', '?')}"
    )


def _say(level: int, message: str, *args: object) -> None:
    """Log to the Prefect run's log when in a run (so the UI shows it), else to this module's."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            get_run_logger().log(level, message, *args)
            return
    except Exception:  # no usable run context: the module's wait logger says it
        pass
    wait_logger.log(level, message, *args)


def holds_registry_lock(models_dir: Path) -> bool:
    """Whether this thread holds the registry lock of ``models_dir`` (False: no registry)."""
    if not Path(models_dir).is_dir():
        return False
    return _lock_for(models_dir).is_locked


@contextmanager
def registry_lock(
    models_dir: Path, *, timeout: float = DEFAULT_LOCK_TIMEOUT_S, run: str | None = None
) -> Iterator[dict[str, Any]]:
    """Hold the registry lock of ``models_dir`` for the ``with`` block; yields the holder
    record (this run's, or the outer one's when re-entered).

    Re-entrant in one thread (a flow, its sync subflows and tasks). When another run holds it,
    waits up to ``timeout`` seconds (logging whom it waits for), then raises
    :class:`RegistryBusyError`. ``run`` names this run in the holder record (default: the
    Prefect flow run, or the command line). Never wait for a person inside the block.
    Raises :class:`NoRegistryError` when ``models_dir`` is not a folder (never created here).
    """
    models_dir = Path(models_dir)
    lock = _lock_for(models_dir)
    if lock.is_locked:  # this thread holds it already: re-enter
        with lock.acquire(timeout=0):
            yield read_holder(models_dir) or {}
        return
    record = holder_record(run)
    _pending.record = record
    try:
        _acquire(lock, models_dir, timeout)
    finally:
        _pending.record = None
    try:
        logger.debug("registry lock of %s taken by %s", models_dir, describe_holder(record))
        yield record
    finally:
        _release(lock, models_dir)


def _acquire(lock: FileLock, models_dir: Path, timeout: float) -> None:
    started = time.monotonic()
    try:
        lock.acquire(blocking=False)
        return
    except Timeout:
        pass
    holder = read_holder(models_dir)
    _say(
        logging.WARNING,
        "the model registry at %s is busy: waiting (up to %s) for %s to finish",
        models_dir,
        _duration(timeout),
        describe_holder(holder),
    )
    while True:
        remaining = started + timeout - time.monotonic()
        if remaining <= 0:
            holder = read_holder(models_dir)
            raise RegistryBusyError(
                f"{lock_path(models_dir)}: the model registry is still locked after "
                f"{time.monotonic() - started:.0f} s by {describe_holder(holder)}; "
                "another run that changes the registry (weekly cycle, retrain, deploy or "
                "rollback) is in progress. Wait for it to finish (see its run in the Prefect UI, "
                "or the process on that host) and run this again"
            )
        try:
            lock.acquire(timeout=min(WAIT_LOG_INTERVAL_S, remaining))
        except Timeout:
            _say(
                logging.INFO,
                "still waiting for the model registry at %s (%.0f s so far): held by %s",
                models_dir,
                time.monotonic() - started,
                describe_holder(read_holder(models_dir)),
            )
            continue
        _say(
            logging.INFO,
            "the model registry at %s is free after %.0f s of waiting",
            models_dir,
            time.monotonic() - started,
        )
        return


def _duration(seconds: float) -> str:
    """``0.3 s``, ``90 s``, ``15 min``, ``6 h``: a timeout as a person reads it."""
    if seconds < 120:
        return f"{seconds:g} s"
    if seconds < 7200:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"


def _release(lock: FileLock, models_dir: Path) -> None:
    """Empty the holder record (still holding the lock), then release it."""
    try:
        with lock_path(models_dir).open("r+b") as handle:
            handle.truncate(0)
    except OSError as exc:  # the record is advisory; the release below is what matters
        logger.warning("could not clear the holder record of %s: %s", lock_path(models_dir), exc)
    finally:
        lock.release()
