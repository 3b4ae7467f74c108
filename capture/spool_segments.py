"""The spool's segment files and the per-logger :class:`Spool` that writes them (see
:mod:`capture.spool` for what a spool is; the line format is :mod:`capture.spool_format`'s).

Files are private whatever the umask: the folder is made 0700 (``capture.files.
make_private_dir``) and each segment is created and ``fchmod``-ed 0600, then locked, then its
database line is written, and only then is it renamed into view.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from capture.db_identity import DatabaseIdentity
from capture.files import PRIVATE_FILE_MODE, make_private_dir
from capture.ids import uuid7
from capture.spool_format import SEQ, SUFFIX, Op, encode_header, encode_op, read_header

logger = logging.getLogger(__name__)

__all__ = ["Segment", "Spool", "lock_segment"]


@dataclass(eq=False)
class Segment:
    """One spool file. ``fd`` is open (and flock'ed) while this process owns it.

    ``identity``/``has_ops``: what its database line says and whether an operation follows it
    (filled in for the segments of stopped processes, see :meth:`Spool.orphans`)."""

    path: Path
    first_seq: int
    fd: int | None = None
    last_seq: int = -1
    appended: int = 0
    committed: int = 0
    closed: bool = False
    fsync: bool = False
    identity: DatabaseIdentity | None = None
    has_ops: bool = True

    def append(self, line: bytes, seq: int) -> None:
        """Append one line with a single ``write`` (and ``fsync`` in fsync mode)."""
        assert self.fd is not None and not self.closed
        view = memoryview(line)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(self.fd)
        self.appended += 1
        self.last_seq = seq

    def close_for_append(self) -> None:
        self.closed = True

    def release(self) -> None:
        """Close the file descriptor (which drops the lock)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def delete(self) -> None:
        """Remove the file (all its operations are committed), then drop the lock."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            logger.debug("spool segment %s was already removed", self.path)
        self.release()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def lock_segment(fd: int) -> bool:
    """Try to take a segment's exclusive lock (non-blocking); False when a live process
    holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class Spool:
    """This logger instance's segments plus access to segments left by dead processes.

    ``identity``: the database new segments are written for (their first line); the logger
    replaces it with the server's full identity once it has reached the database.
    """

    def __init__(self, directory: Path, *, identity: DatabaseIdentity, fsync: bool = False) -> None:
        self.directory = directory
        self.identity = identity
        self.fsync = fsync
        self.instance = f"{uuid7().hex}-{os.getpid()}"
        self.current: Segment | None = None
        # Closed segments whose operations must be replayed, ordered by first_seq.
        self.pending: list[Segment] = []
        # Journal segments (spool/fsync modes) whose operations are also in memory.
        self.covered: list[Segment] = []

    def _ensure_dir(self) -> None:
        make_private_dir(self.directory)  # 0700: segments hold raw prompts

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def new_segment(self, first_seq: int) -> Segment:
        """Create, lock and name a new segment (locked before it becomes visible): a 0600 file
        whose first line names :attr:`identity`."""
        self._ensure_dir()
        name = f"{self.instance}-{first_seq:012d}{SUFFIX}"
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, PRIVATE_FILE_MODE)
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)  # whatever the umask
            fcntl.flock(fd, fcntl.LOCK_EX)
            _write_all(fd, encode_header(self.identity))
            os.rename(tmp, self.directory / name)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            self._fsync_dir()
        return Segment(self.directory / name, first_seq, fd=fd, fsync=self.fsync)

    def append(self, op: Op, line: bytes | None = None) -> Segment:
        """Append ``op`` to the current segment (created on demand); returns that segment."""
        segment = self.current
        if segment is None:
            segment = self.current = self.new_segment(op[SEQ])
        segment.append(encode_op(op) if line is None else line, op[SEQ])
        return segment

    def rotate(self, *, to_pending: bool) -> Segment | None:
        """Close the current segment for appends; file it as pending (replay) or covered."""
        segment, self.current = self.current, None
        if segment is None:
            return None
        segment.close_for_append()
        if segment.appended == 0:
            segment.delete()
            return None
        if to_pending:
            self.add_pending(segment)
        elif segment.committed >= segment.appended:
            segment.delete()
        else:
            self.covered.append(segment)
        return segment

    def add_pending(self, segment: Segment) -> None:
        self.pending.append(segment)
        self.pending.sort(key=lambda s: s.first_seq)

    def write_segment(self, ops: list[Op]) -> Segment:
        """Write ``ops`` (contiguous seqs, oldest first) to a new closed, pending segment."""
        segment = self.new_segment(ops[0][SEQ])
        assert segment.fd is not None
        _write_all(segment.fd, b"".join(encode_op(op) for op in ops))
        if self.fsync:
            os.fsync(segment.fd)
        segment.appended = len(ops)
        segment.last_seq = ops[-1][SEQ]
        segment.close_for_append()
        self.add_pending(segment)
        return segment

    def mark_committed(self, segment: Segment, count: int = 1) -> None:
        """Count committed operations of a journal segment; delete it once all are committed."""
        segment.committed += count
        if segment.closed and segment.committed >= segment.appended and segment in self.covered:
            self.covered.remove(segment)
            segment.delete()

    def all_uncovered(self) -> None:
        """The memory copy is gone (database failure in journal mode): replay every segment."""
        self.rotate(to_pending=True)
        for segment in self.covered:
            self.add_pending(segment)
        self.covered.clear()

    def own_paths(self) -> set[Path]:
        segments = [*self.pending, *self.covered]
        if self.current is not None:
            segments.append(self.current)
        return {s.path for s in segments}

    def orphans(self) -> Iterator[Segment]:
        """Segments of dead processes, oldest first, each locked for this process while yielded
        with its ``identity`` and ``has_ops`` read (the caller deletes it after replay, or
        releases it: a segment for another database stays)."""
        if not self.directory.is_dir():
            return
        own = self.own_paths()
        for tmp in self.directory.glob(f".*{SUFFIX}.tmp"):
            # A segment whose creator died between creating and naming it (it is empty).
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(tmp, os.O_RDONLY)
                if lock_segment(fd):
                    tmp.unlink(missing_ok=True)
                os.close(fd)
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path in own or path.name.startswith("."):
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            if not lock_segment(fd):
                os.close(fd)  # a live process owns it
                continue
            if os.fstat(fd).st_nlink == 0:  # replayed and removed by someone else meanwhile
                os.close(fd)
                continue
            first = path.stem.rsplit("-", 1)[-1]
            segment = Segment(path, int(first) if first.isdigit() else 0, fd=fd, closed=True)
            try:
                segment.identity, segment.has_ops = read_header(path)
            except OSError:
                segment.release()
                raise
            yield segment

    def close(self) -> list[Path]:
        """Release every segment; delete the fully committed ones. Returns the files left."""
        self.rotate(to_pending=False)
        left: list[Path] = []
        for segment in [*self.covered, *self.pending]:
            if segment in self.covered and segment.committed >= segment.appended:
                segment.delete()
            else:
                left.append(segment.path)
                segment.release()
        self.covered.clear()
        self.pending.clear()
        return left
