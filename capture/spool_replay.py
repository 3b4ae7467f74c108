"""Applying operations through a writer, the way the capture logger and ``prompt-capture spool
replay`` both do: one transaction per batch, bisecting a batch the database refuses so that only
the bad operations are rejected (logged and appended to ``HOME/rejected.jsonl``), and a
:class:`ConnectionLostError` for anything that means "the database is not there"; and the
logger's start-up replay of what stopped processes left (:func:`replay_orphans`), which applies
only the segments written for its own database."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from capture.copy_writer import Writer
from capture.db_identity import DatabaseIdentity
from capture.spool import SegmentInfo, inspect_segment
from capture.spool_format import C_ID, INSERT, Op, append_rejected, read_batches, wire_uuid
from capture.spool_segments import Spool

logger = logging.getLogger(__name__)

__all__ = ["ConnectionLostError", "OpApplier", "replay_orphans"]


class ConnectionLostError(RuntimeError):
    """The database could not be reached (or dropped the connection) during a write."""


class OpApplier:
    """Writes operations through ``backend``; counts and records the ones the database refuses.

    ``rejected_path``: the rejected-operations file (``HOME/rejected.jsonl``, 0600);
    ``batch_size``: operations per transaction when replaying a segment file.
    """

    def __init__(self, backend: Writer, rejected_path: Path, batch_size: int) -> None:
        self.backend = backend
        self.rejected_path = rejected_path
        self.batch_size = batch_size
        self.rejected = 0

    async def write(self, ops: list[Op], *, idempotent: bool) -> None:
        """Apply ``ops``; bisect on data errors (rejecting single bad ops); raise
        :class:`ConnectionLostError` on anything else."""
        try:
            unknown = await self.backend.apply(ops, idempotent=idempotent)
        except Exception as exc:
            kind = self.backend.classify(exc)
            if kind == "duplicate" and not idempotent:
                # A batch whose commit was acknowledged-lost, re-sent: insert what is missing.
                await self.write(ops, idempotent=True)
                return
            if kind == "connection":
                raise ConnectionLostError(f"{type(exc).__name__}: {exc}") from exc
            if len(ops) == 1:
                self.reject(ops[0], f"{type(exc).__name__}: {exc}".strip())
                return
            middle = len(ops) // 2
            await self.write(ops[:middle], idempotent=idempotent)
            await self.write(ops[middle:], idempotent=idempotent)
            return
        for op in unknown:
            log_id = op[2].log_id
            self.reject(op, f"unknown log id {log_id}: no prompt log row has this id")

    def reject(self, op: Op, reason: str) -> None:
        """Count ``op`` as rejected, log it and append it to the rejected-operations file."""
        self.rejected += 1
        kind, seq, data, _ = op
        log_id = wire_uuid(data[C_ID]) if kind == INSERT else data.log_id
        logger.error("capture writer: rejected %s %s (seq %d): %s", kind, log_id, seq, reason)
        append_rejected(self.rejected_path, reason, op=op)

    def reject_line(self, path: Path, number: int, raw: bytes) -> None:
        """Count and record a spool line that cannot be read."""
        self.rejected += 1
        append_rejected(self.rejected_path, f"unreadable spool line {path.name}:{number}", raw=raw)

    async def replay(self, path: Path) -> int:
        """Apply a segment file's operations idempotently, in order; returns how many were
        applied (rejected ones and unreadable lines not counted). Raises
        :class:`ConnectionLostError` (the caller keeps the file and retries)."""
        rejected_before = self.rejected
        total = 0
        for item in read_batches(path, self.batch_size):
            if isinstance(item, tuple):  # (line number, raw): an unreadable line
                self.reject_line(path, *item)
                rejected_before += 1
                continue
            await self.write(item, idempotent=True)
            total += len(item)
        return total - (self.rejected - rejected_before)


async def replay_orphans(
    spool: Spool,
    applier: OpApplier,
    identity: Callable[[], Awaitable[DatabaseIdentity]],
    replayed: Callable[[int], None],
) -> list[SegmentInfo]:
    """Replay the segments stopped processes left in ``spool`` that were written for the
    database ``identity()`` names (awaited when the first segment needs judging: it may connect),
    oldest first, removing each once applied (``replayed(count)`` after each).

    Segments of another database, or of an unknown one (no database line, spool format 1/2),
    are left in place and returned (with what they hold) for the caller's warning; segments
    holding no operation are removed. Raises :class:`ConnectionLostError` (the caller retries;
    what is not yet replayed stays).
    """
    foreign: list[SegmentInfo] = []
    for segment in spool.orphans():
        try:
            if not segment.has_ops:
                segment.delete()  # nothing but (part of) a database line
                continue
            current = await identity()
            if segment.identity is None or not segment.identity.matches(current):
                foreign.append(inspect_segment(segment.path, in_use=False))
                segment.release()
                continue
            count = await applier.replay(segment.path)
        except BaseException:
            segment.release()
            raise
        segment.delete()
        replayed(count)
        logger.info(
            "capture writer: replayed %d operations left by a stopped process (%s)",
            count,
            segment.path.name,
        )
    return foreign
