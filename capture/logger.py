"""The capture logger: a non-blocking, batched, lossless writer of prompt-log operations.

``submit_*`` never waits on the database: an operation (insert / outcome / correction) gets a
sequence number and goes to a bounded in-memory queue; a background asyncio task (the writer)
drains the queue in batches, one transaction per batch, through :mod:`capture.copy_writer`
(PostgreSQL: binary ``COPY`` of the queued wire rows, see :func:`capture.spool.wire_row`, plus
the shared update statement over ``unnest(...)``; SQLite: ``executemany``). Queued updates are
:class:`capture.rows.Outcome` / :class:`capture.rows.Correction` (named fields).

Order: the writer applies operations strictly in sequence order, whether they come from memory
or from the spool, so an outcome is never applied before its insert. In ``buffered`` mode an
outcome or correction for a row that is still queued is merged into its insert.

Failures: a connection error sends the batch (and everything queued) to the spool
(:mod:`capture.spool`); new operations go to the spool until the writer has replayed it,
idempotently (ids are client-made: ``INSERT ... ON CONFLICT (id, created_at) DO NOTHING`` on
PostgreSQL, whose partitioned table has that primary key; ``(id)`` on SQLite), after a
reconnect with exponential backoff. A data error bisects the batch; the rows the database refuses
are counted as rejected, logged, and appended to ``HOME/rejected.jsonl``. The writer never dies.

The spool knows its database (:mod:`capture.spool`): segments name the database they were
written for (first by URL; by the server's identity once the writer has reached it), and at
start the writer replays, of the segments left by stopped processes, only those written for its
database. The others stay where they are and ONE warning says what they hold and how to replay
or discard them (``prompt-capture spool``).

Durability modes (``settings.durability``): see ``docs/CAPTURE.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from capture import db
from capture.copy_writer import SqliteWriter, Writer, make_writer
from capture.db_identity import DatabaseIdentity, fetch_identity, identity_from_url
from capture.rows import Change, Correction, Outcome
from capture.settings import Settings, get_settings
from capture.spool import (
    C_ID,
    CORRECTION,
    DATA,
    INSERT,
    KIND,
    OUTCOME,
    REJECTED_FILE,
    ROW_INDEX,
    SEGMENT,
    SEQ,
    Op,
    Segment,
    Spool,
    SpoolGroup,
    foreign_spool_warning,
    group_segments,
    wire_row,
)
from capture.spool_replay import ConnectionLostError, OpApplier, replay_orphans
from capture.statements import change_set

logger = logging.getLogger(__name__)

SEGMENT_MAX_OPS = 100_000
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CaptureStats:
    """Counters of one logger since it started.

    queued: operations accepted (inserts, outcomes, corrections; merged ones included);
    written: operations committed from memory (an insert that carries merged updates counts once);
    merged: outcomes/corrections folded into a still-queued insert;
    spooled: operations sent to the spool because the database failed or the queue was full;
    journaled: operations appended to the spool before returning (spool/fsync modes);
    replayed: operations applied from spool segments (own or left by a dead process);
    rejected: operations the database refused (bad data, unknown log id), see rejected.jsonl;
    truncated: prompts stored truncated to ``max_prompt_chars``;
    pending: operations not yet committed; connection_errors: database failures seen.
    """

    queued: int
    written: int
    merged: int
    spooled: int
    journaled: int
    replayed: int
    rejected: int
    truncated: int
    pending: int
    connection_errors: int


def _merged(op: Op, take: Callable[[bytes, None], tuple[Any, ...] | None]) -> Op:
    """``op``, or for a queued insert into which updates were merged, the insert with its latest
    row (``take``: get or pop of the queued inserts by id)."""
    if op[KIND] != INSERT:
        return op
    row = take(op[DATA][C_ID], None)
    return op if row is None or row is op[DATA] else (INSERT, op[SEQ], row, op[SEGMENT])


# --- the logger ---------------------------------------------------------------------------


class CaptureLogger:
    """Owns the queue, the spool and the writer task for one database URL."""

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        sleep: Sleep | None = None,
        application_name: str | None = None,
        backoff: tuple[float, float] = (0.05, 5.0),
    ) -> None:
        self.settings = settings or get_settings()
        self.url = db.database_url(url) if url else self.settings.resolved_database_url
        self.durability = self.settings.durability
        self._journal = self.durability != "buffered"
        self._batch_size = self.settings.batch_size
        self._max_buffer = self.settings.buffer_size
        self._flush_interval = self.settings.flush_interval_s
        self._sleep: Sleep = sleep or asyncio.sleep
        self._backoff = backoff
        self.application_name = application_name or f"prompt-capture-writer-{os.getpid()}"
        self._backend: Writer = make_writer(self.url, self.application_name)
        # The database this logger writes to; made complete (server facts) by the writer's
        # first connection, before any spool segment of a stopped process is replayed.
        self.identity: DatabaseIdentity = identity_from_url(self.url)
        self.spool = Spool(
            self.settings.spool_dir, identity=self.identity, fsync=self.durability == "fsync"
        )
        self.rejected_path: Path = self.settings.home / REJECTED_FILE
        self._applier = OpApplier(self._backend, self.rejected_path, self._batch_size)
        #: Segments of other (or unknown) databases found at start and left in place.
        self.foreign_spool: list[SpoolGroup] = []

        self._buffer: deque[Op] = deque()
        # Buffered mode: id bytes -> the row as it is to be written (a merged outcome or
        # correction replaces it; the queued op picks up the latest row when it is taken).
        self._queued_inserts: dict[bytes, tuple[Any, ...]] = {}
        self._inflight: list[Op] | None = None
        self._seq = 0
        self._done_seq = 0
        self._spool_active = False
        self._closing = False
        self._closed = False
        self._orphans_done = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()

        self.queued = 0
        self.written = 0
        self.merged = 0
        self.spooled = 0
        self.journaled = 0
        self.replayed = 0
        self.truncated = 0
        self.connection_errors = 0

    @property
    def rejected(self) -> int:
        """Operations the database refused and unreadable spool lines (see rejected.jsonl)."""
        return self._applier.rejected

    @property
    def pending(self) -> int:
        """Operations accepted and not yet committed."""
        return self._seq - self._done_seq

    # --- request side (synchronous, never waits) -------------------------------------------

    def stats(self) -> CaptureStats:
        """The counters now: each field of :class:`CaptureStats` is this logger's attribute of
        the same name."""
        return CaptureStats(**{f.name: getattr(self, f.name) for f in fields(CaptureStats)})

    def start(self) -> None:
        """Start the writer (needs a running event loop); called by the first submit."""
        if self._task is None:
            if self._closed:
                raise RuntimeError("the capture logger is closed")
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"capture-writer:{self.application_name}"
            )

    def submit_insert(self, row: Sequence[Any]) -> None:
        """Queue a new row (``ROW_COLUMNS`` order, already validated by the caller); UUIDs and
        secondary intents may be Python values (see :func:`capture.spool.wire_row`)."""
        self.submit_wire_row(wire_row(row))

    def submit_wire_row(self, row: tuple[Any, ...]) -> None:
        """Queue a new row already in wire form (what the service builds on the request path)."""
        if self._task is None:
            self.start()
        self._seq = seq = self._seq + 1
        op: Op = (INSERT, seq, row, None)
        buffer = self._buffer
        if self._journal or self._spool_active or len(buffer) >= self._max_buffer:
            if self._enqueue(op) and not self._journal:
                self._queued_inserts[row[C_ID]] = row
            return
        # The common case (buffered mode, healthy database), inlined: it is the request path.
        self.queued += 1
        buffer.append(op)
        self._queued_inserts[row[C_ID]] = row
        if len(buffer) >= self._batch_size:
            self._wake.set()

    def submit_outcome(
        self,
        log_id: uuid.UUID,
        was_successful: bool,
        workflow_type: str | None,
        execution_error: str | None,
        at: datetime,
    ) -> bool:
        """Queue an outcome (already validated by the caller); returns True when it was merged
        into a still-queued insert."""
        return self._submit_update(
            OUTCOME, Outcome(log_id, was_successful, workflow_type, execution_error, at)
        )

    def submit_correction(
        self, log_id: uuid.UUID, corrected_intent: str, correction_notes: str | None, at: datetime
    ) -> bool:
        """Queue a correction (already validated); True when merged into a queued insert."""
        return self._submit_update(
            CORRECTION, Correction(log_id, corrected_intent, correction_notes, at)
        )

    @property
    def copy_mode(self) -> str:
        """How inserts reach PostgreSQL: ``direct`` COPY, or ``staged`` (COPY into a temp table,
        then INSERT; used when row-level security applies to the writer's role); ``executemany``
        on SQLite."""
        if isinstance(self._backend, SqliteWriter):
            return "executemany"
        return "staged" if self._backend.rls_active else "direct"

    @property
    def orphans_replayed(self) -> bool:
        """False until the spool segments of stopped processes have been replayed."""
        return self._orphans_done

    @property
    def spooling(self) -> bool:
        """True while operations wait in this logger's spool (the database was down)."""
        return self._spool_active or bool(self.spool.pending)

    async def wait_orphans_replayed(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for the start-up replay; returns whether it is done."""
        self.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self._orphans_done:
                    self._progress.clear()
                    await self._progress.wait()
        return self._orphans_done

    def is_queued(self, log_id: uuid.UUID) -> bool:
        return log_id.bytes in self._queued_inserts

    def _submit_update(self, kind: str, change: Change) -> bool:
        if self._task is None:
            self.start()
        key = change.log_id.bytes
        queued = self._queued_inserts.get(key)
        if queued is not None:
            # Merge into the queued insert: the columns the update statement would set.
            row = list(queued)
            for column, field in change_set(type(change)).items():
                row[ROW_INDEX[column]] = getattr(change, field)
            self._queued_inserts[key] = tuple(row)
            self.queued += 1
            self.merged += 1
            return True
        self._seq += 1
        self._enqueue((kind, self._seq, change, None))
        return False

    def _with_merges(self, ops: Iterable[Op]) -> list[Op]:
        """``ops`` with each queued insert carrying its latest row (merged updates)."""
        get = self._queued_inserts.get
        return [_merged(op, get) for op in ops] if self._queued_inserts else list(ops)

    def _enqueue(self, op: Op) -> bool:
        """Put ``op`` in memory (True) or in the spool (False), journaling it in spool modes."""
        self.queued += 1
        if not self._spool_active and len(self._buffer) >= self._max_buffer:
            logger.warning(
                "capture queue full (%d operations): new operations go to the spool %s until "
                "the writer catches up",
                self._max_buffer,
                self.spool.directory,
            )
            self._spool_active = True
            if self._journal:
                self.spool.rotate(to_pending=False)
        try:
            if self._spool_active:
                segment = self.spool.append(op)
                if self._journal:
                    self.journaled += 1
                else:
                    self.spooled += 1
                self._maybe_rotate(segment, to_pending=True)
                return False
            if self._journal:
                journal = self.spool.append(op)
                op = (op[KIND], op[SEQ], op[DATA], journal)
                self.journaled += 1
                self._maybe_rotate(journal, to_pending=False)
        except OSError:
            # The spool is unwritable (disk full, permissions): keep the operation in memory
            # rather than fail the request; the writer still commits it.
            logger.exception("capture spool %s is not writable", self.spool.directory)
            op = (op[KIND], op[SEQ], op[DATA], None)
        self._buffer.append(op)
        if len(self._buffer) >= self._batch_size:
            self._wake.set()
        return True

    def _maybe_rotate(self, segment: Segment, *, to_pending: bool) -> None:
        if segment.appended >= SEGMENT_MAX_OPS:
            self.spool.rotate(to_pending=to_pending)

    # --- flush / close -------------------------------------------------------------------

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every operation submitted so far is committed (or rejected).

        Waits while the database is down (the writer keeps retrying); pass ``timeout`` to bound
        the wait (raises ``TimeoutError``; nothing is lost: the operations stay queued/spooled).
        """
        self.start()
        target = self._seq
        async with asyncio.timeout(timeout):
            while self._done_seq < target or not self._orphans_done:
                if self._task is not None and self._task.done():
                    raise RuntimeError("the capture writer has stopped") from (
                        self._task.exception() if not self._task.cancelled() else None
                    )
                self._progress.clear()
                self._wake.set()
                await self._progress.wait()

    async def aclose(self, timeout: float = 30.0) -> None:
        """Write everything (or, if the database stays unreachable for ``timeout`` seconds,
        leave it in the spool for the next start), then stop the writer."""
        if self._closed:
            return
        self._closing = True
        if self._task is not None:
            try:
                await self.flush(timeout=timeout)
            except TimeoutError:
                logger.error(
                    "capture logger: database unreachable for %.0f s at close; "
                    "moving the unwritten operations to the spool",
                    timeout,
                )
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._closed = True
        leftover = [*(self._inflight or []), *self._with_merges(self._buffer)]
        self._inflight = None
        self._buffer.clear()
        self._queued_inserts.clear()
        if leftover and not self._journal:
            self.spool.write_segment(leftover)
            self.spooled += len(leftover)
        left = self.spool.close()
        await self._backend.close()
        if left:
            logger.warning(
                "capture logger closed; %d spool segment(s) left in %s (not yet committed); "
                "the next start replays them: %s",
                len(left),
                self.spool.directory,
                ", ".join(p.name for p in left),
            )
        else:
            logger.info("capture logger closed; all %d operations written", self.queued)

    # --- the writer ----------------------------------------------------------------------

    def _notify(self) -> None:
        self._progress.set()

    async def _run(self) -> None:
        delay = self._backoff[0]
        while not self._orphans_done:
            try:
                await self._replay_orphans()
                self._orphans_done = True
            except ConnectionLostError as exc:
                delay = await self._after_failure(exc, delay)
        with contextlib.suppress(ConnectionLostError):  # one try: segments name the server
            await self._current_identity()
        self._notify()
        delay = self._backoff[0]
        while True:
            try:
                progressed = await self._step()
            except ConnectionLostError as exc:
                delay = await self._after_failure(exc, delay)
                continue
            except Exception:
                # A bug or an unexpected environment error (e.g. an unreadable spool file): log
                # it, keep the batch, retry later. The writer must not die.
                logger.exception("capture writer: unexpected error; retrying in %.2f s", delay)
                if self._inflight is not None:
                    self._buffer.extendleft(reversed(self._inflight))
                    self._inflight = None
                await self._sleep(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            if progressed:
                self._notify()
                continue
            self._notify()
            if self._closing:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_interval)

    async def _after_failure(self, exc: BaseException, delay: float) -> float:
        self.connection_errors += 1
        logger.warning(
            "capture writer: database unavailable (%s); operations go to the spool %s; "
            "retrying in %.2f s",
            exc,
            self.spool.directory,
            delay,
        )
        self._notify()
        await self._sleep(delay)
        return min(delay * 2, self._backoff[1])

    async def _step(self) -> bool:
        pending = self.spool.pending
        if pending and (not self._buffer or pending[0].first_seq < self._buffer[0][SEQ]):
            await self._replay_own(pending[0])
            return True
        if self._buffer:
            await self._write_memory_batch()
            return True
        if self._spool_active:
            # Memory and older segments are done: the open spool segment is the newest data.
            self.spool.rotate(to_pending=True)
            self._spool_active = False
            logger.info("capture writer: spool replayed; back to the memory path")
            return bool(self.spool.pending)
        return False

    def _take_batch(self) -> list[Op]:
        buffer = self._buffer
        count = min(len(buffer), self._batch_size)
        pending = self.spool.pending
        if pending:
            bound = pending[0].first_seq
            batch: list[Op] = []
            while buffer and len(batch) < count and buffer[0][SEQ] < bound:
                batch.append(buffer.popleft())
        else:
            batch = [buffer.popleft() for _ in range(count)]
        if self._queued_inserts:
            pop = self._queued_inserts.pop
            batch = [_merged(op, pop) for op in batch]
        return batch

    async def _write_memory_batch(self) -> None:
        batch = self._take_batch()
        self._inflight = batch  # if the writer is cancelled mid-write, aclose() spools it
        rejected_before = self.rejected
        try:
            await self._applier.write(batch, idempotent=False)  # bisects bad rows
        except ConnectionLostError:
            self._inflight = None
            self._divert(batch)
            raise
        self._inflight = None
        self.written += len(batch) - (self.rejected - rejected_before)
        if self._journal:
            counts: dict[Segment, int] = {}
            for op in batch:
                journal = op[SEGMENT]
                if journal is not None:
                    counts[journal] = counts.get(journal, 0) + 1
            for segment, count in counts.items():
                self.spool.mark_committed(segment, count)
        self._done_seq = batch[-1][SEQ]

    def _divert(self, batch: list[Op]) -> None:
        """The database failed: from now on the spool holds everything not yet committed."""
        self._spool_active = True
        ops = [*batch, *self._with_merges(self._buffer)]
        self._buffer.clear()
        self._queued_inserts.clear()
        if self._journal:
            # Every queued operation is already in a journal segment: replay those instead.
            self.spool.all_uncovered()
            ops = [op for op in ops if op[SEGMENT] is None]  # journal write had failed
        if not ops:
            return
        try:
            self.spool.write_segment(ops)
        except OSError:
            logger.exception(
                "capture spool %s is not writable; keeping %d operations in memory",
                self.spool.directory,
                len(ops),
            )
            self._buffer.extendleft(reversed(ops))
            self._spool_active = False
            return
        self.spooled += len(ops)

    async def _current_identity(self) -> DatabaseIdentity:
        """This logger's database with the server's facts (PostgreSQL: system identifier and
        database name, fetched once); new segments record it from then on."""
        if not self.identity.server_known:
            try:
                self.identity = self.spool.identity = await fetch_identity(self.url)
            except Exception as exc:  # not reachable (or not yet): the start-up loop retries
                raise ConnectionLostError(f"{type(exc).__name__}: {exc}") from exc
        return self.identity

    async def _replay_own(self, segment: Segment) -> None:
        count = await self._applier.replay(segment.path)
        self.spool.pending.remove(segment)
        segment.delete()
        self.replayed += count
        self._done_seq = max(self._done_seq, segment.last_seq)
        logger.info("capture writer: replayed %d operations from %s", count, segment.path.name)

    async def _replay_orphans(self) -> None:
        """Replay the segments stopped processes left for this database; leave (and report
        once, :func:`capture.spool.foreign_spool_warning`) those of other databases."""
        foreign = await replay_orphans(
            self.spool, self._applier, self._current_identity, self._count_replayed
        )
        if foreign and not self.foreign_spool:
            self.foreign_spool = group_segments(foreign)
            warning = foreign_spool_warning(self.spool.directory, self.foreign_spool, self.identity)
            logger.warning("%s", warning)

    def _count_replayed(self, count: int) -> None:
        self.replayed += count
