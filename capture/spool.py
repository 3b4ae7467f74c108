"""The capture logger's append-only spool: segment files under ``HOME/spool``, each for one
database, and the typed API behind ``prompt-capture spool`` (list, replay, discard).

A segment holds a contiguous, increasing range of operation sequence numbers of one logger
instance. Its file name is ``<instance>-<first seq, 12 digits>.jsonl`` where ``<instance>`` is a
UUIDv7 (time-ordered) plus the pid, so sorting names sorts segments into the order their
operations were made. The owner holds an exclusive ``fcntl.flock`` on every segment it has open;
another process replays a segment only when it can take that lock (the owner is gone), so a live
process's segment is never replayed by somebody else. The line format is
:mod:`capture.spool_format`'s (re-exported here).

The spool knows its database. The first line of every segment names the database it was
written for (a :class:`capture.db_identity.DatabaseIdentity`: a hash of the URL without
password; on PostgreSQL also ``system_identifier`` and ``current_database()``; on SQLite the
resolved file). A logger starting against a database replays, of the segments left by stopped
processes, only those written for that database; the others stay in place, and it logs ONE
warning naming what they hold (rows, time range, which database) and the commands below.

Segments without a database line (written by a version before spool format 3) belong to an
unknown database: they are never replayed automatically (that is how one database's rows
reached another, issue 13); ``prompt-capture spool replay unknown --database-url URL --force``
replays them once a person knows where they belong, ``spool discard unknown --yes`` drops them.

Typed API (the CLI module ``deployments/spool_commands.py`` is a thin layer over it):
:func:`list_spool` (segments grouped by database identity, :class:`SpoolGroup`),
:func:`replay_spool` (a group into an explicitly named database URL; refused unless the
identity matches or ``force=True``), :func:`discard_spool`. User mistakes raise
:class:`SpoolError` (a ``capture.errors.UserError``).

Files: the spool folder is 0700 and every segment 0600 whatever the umask (they hold raw
prompts), like ``HOME/rejected.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from capture import db
from capture.db_identity import DatabaseIdentity, fetch_identity
from capture.errors import UserError
from capture.spool_format import (
    C_CONVERSATION,
    C_CREATED,
    C_ID,
    C_SECONDARY,
    C_USER,
    CHANGE_TYPES,
    COPY_TYPES,
    CORRECTION,
    DATA,
    EMPTY_SECONDARY,
    FORMAT_VERSION,
    HEADER,
    INSERT,
    JSONB_VERSION,
    KIND,
    OUTCOME,
    READABLE_VERSIONS,
    REJECTED_FILE,
    ROW_COLUMNS,
    ROW_INDEX,
    ROW_LAYOUT,
    SEGMENT,
    SEQ,
    SUFFIX,
    Op,
    append_rejected,
    decode_header,
    decode_op,
    encode_header,
    encode_op,
    make_op,
    new_row,
    python_row,
    read_batches,
    read_header,
    read_ops,
    secondary_document,
    secondary_items,
    uuid_bytes,
    wire_row,
    wire_uuid,
)
from capture.spool_segments import Segment, Spool, lock_segment

logger = logging.getLogger(__name__)

__all__ = [
    "CHANGE_TYPES",
    "COPY_TYPES",
    "CORRECTION",
    "C_CONVERSATION",
    "C_CREATED",
    "C_ID",
    "C_SECONDARY",
    "C_USER",
    "DATA",
    "EMPTY_SECONDARY",
    "FORMAT_VERSION",
    "HEADER",
    "INSERT",
    "JSONB_VERSION",
    "KIND",
    "OUTCOME",
    "READABLE_VERSIONS",
    "REJECTED_FILE",
    "ROW_COLUMNS",
    "ROW_INDEX",
    "ROW_LAYOUT",
    "SEGMENT",
    "SEQ",
    "SUFFIX",
    "UNKNOWN_KEY",
    "Op",
    "Segment",
    "SegmentInfo",
    "Spool",
    "SpoolDiscard",
    "SpoolError",
    "SpoolGroup",
    "SpoolReplay",
    "append_rejected",
    "decode_header",
    "decode_op",
    "discard_spool",
    "encode_header",
    "encode_op",
    "foreign_spool_warning",
    "group_segments",
    "inspect_segment",
    "list_spool",
    "make_op",
    "new_row",
    "python_row",
    "read_batches",
    "read_header",
    "read_ops",
    "replay_spool",
    "secondary_document",
    "secondary_items",
    "uuid_bytes",
    "wire_row",
    "wire_uuid",
]

#: The group id of segments that do not name their database (spool format 1 and 2).
UNKNOWN_KEY = "unknown"


# --- what a spool holds -------------------------------------------------------------------


class SpoolError(UserError, ValueError):
    """A ``prompt-capture spool`` request that cannot be done as asked (no such group, a
    database that does not match, ...); the message says what to do instead."""


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """One segment file: its database (``None``: unknown, format 1/2), how many inserts
    (rows) and updates (outcomes, corrections) it holds, unreadable lines, the time range of
    its operations (``created_at`` of rows, ``at`` of updates; UTC) and whether a live process
    holds it (``in_use``: never replayed or discarded by anyone else)."""

    path: Path
    identity: DatabaseIdentity | None
    inserts: int
    updates: int
    unreadable: int
    first_at: datetime | None
    last_at: datetime | None
    in_use: bool


@dataclass(frozen=True, slots=True)
class SpoolGroup:
    """The segments written for one database (``key``: :attr:`DatabaseIdentity.key`, or
    :data:`UNKNOWN_KEY`), oldest first."""

    key: str
    identity: DatabaseIdentity | None
    segments: tuple[SegmentInfo, ...]

    @property
    def inserts(self) -> int:
        return sum(s.inserts for s in self.segments)

    @property
    def updates(self) -> int:
        return sum(s.updates for s in self.segments)

    @property
    def first_at(self) -> datetime | None:
        return min((s.first_at for s in self.segments if s.first_at), default=None)

    @property
    def last_at(self) -> datetime | None:
        return max((s.last_at for s in self.segments if s.last_at), default=None)

    @property
    def in_use(self) -> int:
        """Segments a live process holds."""
        return sum(s.in_use for s in self.segments)

    def database(self) -> str:
        """The database in words."""
        if self.identity is None:
            return "an unknown database (written before spools recorded their database)"
        return self.identity.describe()

    def summary(self) -> str:
        """``[key] 25000 rows and 300 updates in 3 segments, from ... to ..., for <database>``."""
        span = ""
        if self.first_at is not None and self.last_at is not None:
            span = f", from {_when(self.first_at)} to {_when(self.last_at)}"
        busy = f" ({self.in_use} held by a running process)" if self.in_use else ""
        return (
            f"[{self.key}] {self.inserts} rows and {self.updates} updates in "
            f"{len(self.segments)} segment(s){busy}{span}, for {self.database()}"
        )


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _segment_paths(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if not p.name.startswith("."))


def _held_elsewhere(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return not lock_segment(fd)
    finally:
        os.close(fd)


def inspect_segment(path: Path, *, in_use: bool | None = None) -> SegmentInfo:
    """Read ``path`` through and count what it holds (``in_use``: pass it when known, else
    it is found by trying the segment's lock)."""
    identity, _ = read_header(path)
    inserts = updates = unreadable = 0
    first: datetime | None = None
    last: datetime | None = None
    for _, item in read_ops(path):
        if isinstance(item, bytes):
            unreadable += 1
            continue
        kind, _, data, _ = item
        if kind == INSERT:
            inserts += 1
            at = data[C_CREATED]
        else:
            updates += 1
            at = data.at
        if isinstance(at, datetime):
            first = at if first is None or at < first else first
            last = at if last is None or at > last else last
    return SegmentInfo(
        path=path,
        identity=identity,
        inserts=inserts,
        updates=updates,
        unreadable=unreadable,
        first_at=first,
        last_at=last,
        in_use=_held_elsewhere(path) if in_use is None else in_use,
    )


def group_segments(infos: Iterable[SegmentInfo]) -> list[SpoolGroup]:
    """``infos`` grouped by database identity; groups ordered by their oldest operation."""
    groups: dict[str, list[SegmentInfo]] = {}
    identities: dict[str, DatabaseIdentity | None] = {}
    for info in infos:
        key = UNKNOWN_KEY if info.identity is None else info.identity.key
        groups.setdefault(key, []).append(info)
        identities[key] = info.identity
    made = [
        SpoolGroup(key, identities[key], tuple(sorted(found, key=lambda s: s.path.name)))
        for key, found in groups.items()
    ]
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(made, key=lambda g: (g.first_at or far, g.key))


def list_spool(directory: Path) -> list[SpoolGroup]:
    """Every segment under ``directory`` (``HOME/spool``), grouped by the database it was
    written for. Reads each segment through (to count rows and find the time range)."""
    infos = []
    for path in _segment_paths(directory):
        try:
            infos.append(inspect_segment(path))
        except FileNotFoundError:
            continue  # replayed and removed meanwhile
    return group_segments(infos)


def find_group(groups: list[SpoolGroup], key: str) -> SpoolGroup:
    """The group whose id is ``key`` or starts with it (at least 4 characters);
    :class:`SpoolError` listing the groups otherwise."""
    wanted = key.strip().lower()
    exact = [g for g in groups if g.key == wanted]
    found = exact or ([g for g in groups if g.key.startswith(wanted)] if len(wanted) >= 4 else [])
    if len(found) == 1:
        return found[0]
    known = ", ".join(g.key for g in groups) or "none: the spool is empty"
    problem = "matches several spool groups" if found else "is not a spool group id"
    raise SpoolError(
        f"{key!r} {problem} (groups: {known}); `prompt-capture spool list` shows each group's "
        "database"
    )


def foreign_spool_warning(
    directory: Path, groups: list[SpoolGroup], current: DatabaseIdentity
) -> str:
    """The one warning a logger logs at start for segments of other (or unknown) databases
    that it left in place: what they hold, for which database, and the commands."""
    held = "; ".join(g.summary() for g in groups)
    unknown = any(g.identity is None for g in groups)
    return (
        f"capture spool {directory} holds operations for another database, left in place and "
        f"NOT replayed into this one, {current.describe()}: {held}. To write a group into "
        "its own database run `prompt-capture spool replay ID --database-url URL` (or start "
        "the service against that database); to delete it, `prompt-capture spool discard ID "
        "--yes`; `prompt-capture spool list` shows the groups"
        + (
            ". Segments of an unknown database are replayed only with --force, once you know "
            "where they belong"
            if unknown
            else ""
        )
    )


# --- replay / discard ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpoolReplay:
    """What :func:`replay_spool` did: segments replayed and removed, operations applied and
    rejected (see ``HOME/rejected.jsonl``), segments skipped because a live process holds
    them."""

    key: str
    target: DatabaseIdentity
    segments: int
    applied: int
    rejected: int
    in_use: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class SpoolDiscard:
    """What :func:`discard_spool` deleted (and the segments a live process holds, kept)."""

    key: str
    segments: int
    inserts: int
    updates: int
    in_use: tuple[Path, ...]


@contextlib.contextmanager
def _locked(path: Path, busy: list[Path]) -> Iterator[bool]:
    """Hold ``path``'s segment lock for the block; yields False when a live process holds it
    (``path`` is then added to ``busy``) or the file is gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield False
        return
    try:
        mine = lock_segment(fd) and os.fstat(fd).st_nlink > 0
        if not mine and path.exists():
            busy.append(path)
        yield mine
    finally:
        os.close(fd)


async def replay_spool(
    directory: Path,
    key: str,
    url: str,
    *,
    force: bool = False,
    rejected_path: Path | None = None,
    batch_size: int = 5_000,
) -> SpoolReplay:
    """Replay the segments of group ``key`` (see :func:`list_spool`) into the database ``url``
    (named explicitly), idempotently, oldest first; each is removed once applied.

    Refused with :class:`SpoolError` unless the group's identity matches the database ``url``
    reaches (:meth:`DatabaseIdentity.matches`) or ``force`` is set; segments of an unknown
    database (``unknown``) always need ``force``. ``capture.db.DatabaseNotMigratedError`` when
    ``url`` is not migrated. Connection failures propagate (``psycopg.OperationalError``,
    ``OSError``, :class:`capture.spool_replay.ConnectionLostError`): segments not yet applied
    stay. Rejected operations go to ``rejected_path`` (default ``<directory>/../rejected.jsonl``).
    """
    from capture.copy_writer import make_writer
    from capture.spool_replay import OpApplier

    group = find_group(list_spool(directory), key)
    target_url = db.database_url(url)
    await asyncio.to_thread(db.require_migrated, target_url)
    target = await fetch_identity(target_url)
    if not force:
        if group.identity is None:
            raise SpoolError(
                f"spool group {group.key} was written before spools recorded their database, "
                f"so it cannot be checked against {target.describe()}; if you know its rows "
                "belong there, run the replay again with --force"
            )
        if not group.identity.matches(target):
            raise SpoolError(
                f"spool group {group.key} was written for {group.identity.describe()}, not "
                f"for {target.describe()}; pass that database's URL as --database-url (or "
                "--force to write the rows here anyway)"
            )
    backend = make_writer(target_url, f"prompt-capture-spool-replay-{os.getpid()}")
    applier = OpApplier(backend, rejected_path or directory.parent / REJECTED_FILE, batch_size)
    segments = applied = 0
    busy: list[Path] = []
    try:
        for info in group.segments:
            with _locked(info.path, busy) as mine:
                if not mine:
                    continue
                applied += await applier.replay(info.path)
                info.path.unlink()
                segments += 1
                logger.info("spool replay: %s applied to %s", info.path.name, target.url)
    finally:
        await backend.close()
    return SpoolReplay(group.key, target, segments, applied, applier.rejected, tuple(busy))


def discard_spool(directory: Path, key: str) -> SpoolDiscard:
    """Delete the segments of group ``key`` (their operations are lost); segments a live
    process holds are kept and reported. :class:`SpoolError` for an unknown ``key``."""
    group = find_group(list_spool(directory), key)
    segments = inserts = updates = 0
    busy: list[Path] = []
    for info in group.segments:
        with _locked(info.path, busy) as mine:
            if not mine:
                continue
            info.path.unlink()
        segments += 1
        inserts += info.inserts
        updates += info.updates
    logger.warning(
        "spool discard: deleted %d segment(s) of group %s (%d rows, %d updates) for %s",
        segments,
        group.key,
        inserts,
        updates,
        group.database(),
    )
    return SpoolDiscard(group.key, segments, inserts, updates, tuple(busy))
