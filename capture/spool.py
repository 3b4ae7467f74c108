"""The capture logger's append-only spool: segment files of JSON lines under ``HOME/spool``.

A segment holds a contiguous, increasing range of operation sequence numbers of one logger
instance. Its file name is ``<instance>-<first seq, 12 digits>.jsonl`` where ``<instance>`` is a
UUIDv7 (time-ordered) plus the pid, so sorting names sorts segments into the order their
operations were made. The owner holds an exclusive ``fcntl.flock`` on every segment it has open;
another process replays a segment only when it can take that lock (the owner is gone), so a live
process's segment is never replayed by somebody else.

Line format (one operation per line, UTF-8 JSON, ``v`` is the format version)::

    {"v": 2, "op": "insert", "seq": 7, "row": [<the ROW_COLUMNS values, in order>]}
    {"v": 2, "op": "outcome", "seq": 8, "id": "...", "was_successful": true,
     "workflow_type": "...", "execution_error": null, "at": "<iso8601>"}
    {"v": 2, "op": "correction", "seq": 9, "id": "...", "corrected_intent": "...",
     "correction_notes": null, "at": "<iso8601>"}

UUIDs are strings, timestamps ISO 8601 with offset, ``secondary_intents`` the stored JSON list of
``{"intent", "confidence"}`` objects (version 1 wrote ``[intent, confidence]`` pairs; both are
read). A line that does not end in a newline is a write that was cut short by a crash before
``process_message`` returned; replay ignores it.

In memory an insert's row is a *wire row* (:func:`wire_row`): a tuple in ``ROW_COLUMNS`` order
holding exactly what binary ``COPY`` sends, so the writer passes it to ``write_row`` untouched:
UUID columns as their 16 bytes, ``secondary_intents`` as a binary ``jsonb`` value (a version
byte, then the JSON text), timestamps as aware datetimes. A tuple of such atomic values is also
invisible to the cyclic garbage collector after its first pass (a queue of them costs no GC
time), unlike lists, dicts and ``uuid.UUID`` objects.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TypeAlias

import orjson

from capture.ids import uuid7
from capture.rows import Change, Correction, Outcome
from capture.values import as_uuid, utc_now

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SUFFIX = ".jsonl"

# THE column table of an insert row: (column, PostgreSQL type of its binary COPY value), in the
# order the logger keeps a row, COPY sends it and the spool writes it (a change here is a new
# spool FORMAT_VERSION). ROW_COLUMNS, the COPY types, the C_* indexes and the UUID/timestamp
# columns derive from it.
ROW_LAYOUT: tuple[tuple[str, str], ...] = (
    ("id", "uuid"),
    ("user_id", "uuid"),
    ("prompt", "text"),
    ("predicted_intent", "text"),
    ("confidence", "float4"),
    ("secondary_intents", "jsonb"),
    ("corrected_intent", "text"),
    ("correction_notes", "text"),
    ("corrected_at", "timestamptz"),
    ("was_successful", "bool"),
    ("workflow_type", "text"),
    ("execution_error", "text"),
    ("conversation_id", "uuid"),
    ("message_index", "int4"),
    ("model_version", "text"),
    ("created_at", "timestamptz"),
    ("updated_at", "timestamptz"),
)
ROW_COLUMNS: tuple[str, ...] = tuple(name for name, _ in ROW_LAYOUT)
#: The binary COPY types of the columns (``copy.set_types``), in ``ROW_COLUMNS`` order.
COPY_TYPES: tuple[str, ...] = tuple(pg_type for _, pg_type in ROW_LAYOUT)
#: Column name -> its index in a row.
ROW_INDEX: Mapping[str, int] = {name: index for index, name in enumerate(ROW_COLUMNS)}
C_ID = ROW_INDEX["id"]
C_USER = ROW_INDEX["user_id"]
C_SECONDARY = ROW_INDEX["secondary_intents"]
C_CONVERSATION = ROW_INDEX["conversation_id"]
C_CREATED = ROW_INDEX["created_at"]
_UUID_COLUMNS = tuple(i for i, (_, pg_type) in enumerate(ROW_LAYOUT) if pg_type == "uuid")
_TIME_COLUMNS = tuple(i for i, (_, pg_type) in enumerate(ROW_LAYOUT) if pg_type == "timestamptz")


def new_row(
    *,
    log_id: Any,
    user_id: Any,
    prompt: str,
    predicted_intent: str,
    confidence: float,
    secondary_intents: Any,
    conversation_id: Any,
    message_index: int | None,
    model_version: str | None,
    created_at: datetime,
) -> tuple[Any, ...]:
    """A new prompt's row in ``ROW_COLUMNS`` order: no correction or outcome yet,
    ``updated_at = created_at``. Values pass through as given (wire values from the service,
    Python values for :func:`wire_row`); ``tests/test_spool_format.py`` checks the order."""
    return (
        log_id,
        user_id,
        prompt,
        predicted_intent,
        confidence,
        secondary_intents,
        None,  # corrected_intent
        None,  # correction_notes
        None,  # corrected_at
        None,  # was_successful
        None,  # workflow_type
        None,  # execution_error
        conversation_id,
        message_index,
        model_version,
        created_at,
        created_at,  # updated_at
    )


INSERT, OUTCOME, CORRECTION = "insert", "outcome", "correction"


# One logged operation: a plain ``(kind, seq, data, segment)`` tuple, indexed with KIND, SEQ,
# DATA, SEGMENT (or unpacked). A plain tuple (not a class instance, not even a NamedTuple)
# because the garbage collector stops tracking an exact tuple of atomic values: a queue of 100k
# buffered inserts then adds nothing to the full collections, which otherwise cost microseconds
# per row. ``data`` is the wire row (insert, see :func:`wire_row`) or the update with named
# fields (:class:`capture.rows.Outcome` / :class:`capture.rows.Correction`).
# ``segment`` is the journal segment holding the op (spool/fsync modes), else ``None``.
Op: TypeAlias = "tuple[str, int, Any, Segment | None]"
KIND: Final = 0
SEQ: Final = 1
DATA: Final = 2
SEGMENT: Final = 3
#: The update kinds and the type of their ``data``.
CHANGE_TYPES: Mapping[str, type[Change]] = {OUTCOME: Outcome, CORRECTION: Correction}


def make_op(kind: str, seq: int, data: Any, segment: Segment | None = None) -> Op:
    """An :data:`Op` tuple."""
    return (kind, seq, data, segment)


# --- wire rows ----------------------------------------------------------------------------

JSONB_VERSION = b"\x01"  # binary jsonb: this version byte, then the JSON text
EMPTY_SECONDARY = JSONB_VERSION + b"[]"


def secondary_document(pairs: Iterable[tuple[str, float]]) -> bytes:
    """``secondary_intents`` as binary COPY sends it: the stored JSON list of
    ``{"intent", "confidence"}`` objects behind the jsonb version byte."""
    items = [{"intent": name, "confidence": conf} for name, conf in pairs]
    return JSONB_VERSION + orjson.dumps(items) if items else EMPTY_SECONDARY


def secondary_items(document: bytes) -> list[dict[str, Any]]:
    """The JSON list inside a :func:`secondary_document`."""
    items: list[dict[str, Any]] = orjson.loads(document[1:])
    return items


def uuid_bytes(value: object, field: str = "uuid") -> bytes | None:
    """A UUID column's wire value: its 16 bytes (from a UUID, its text, or the bytes; ``None``
    stays ``None``); anything else is a ``ValueError`` naming ``field``."""
    if value is None or type(value) is bytes:
        return value
    if type(value) is uuid.UUID:
        return value.int.to_bytes(16, "big")
    return as_uuid(value, field).bytes


def wire_uuid(value: uuid.UUID | bytes | None) -> uuid.UUID | None:
    """The UUID of a wire (or already Python) UUID column value."""
    if value is None or isinstance(value, uuid.UUID):
        return value
    return uuid.UUID(bytes=value)


def wire_row(values: Sequence[Any]) -> tuple[Any, ...]:
    """``values`` (``ROW_COLUMNS`` order; UUIDs as ``uuid.UUID``/text/bytes, secondary intents
    as ``(intent, confidence)`` pairs or an encoded document) as the logger keeps it."""
    if len(values) != len(ROW_COLUMNS):
        raise ValueError(f"insert row has {len(values)} values, expected {len(ROW_COLUMNS)}")
    row = list(values)
    for col in _UUID_COLUMNS:
        row[col] = uuid_bytes(row[col])
    secondary = row[C_SECONDARY]
    if type(secondary) is not bytes:
        row[C_SECONDARY] = secondary_document(secondary or ())
    return tuple(row)


def python_row(row: Sequence[Any]) -> dict[str, Any]:
    """A wire row as column name -> Python value (UUIDs, ``secondary_intents`` as stored)."""
    values = dict(zip(ROW_COLUMNS, row, strict=True))
    for col in _UUID_COLUMNS:
        values[ROW_COLUMNS[col]] = wire_uuid(row[col])
    values["secondary_intents"] = secondary_items(row[C_SECONDARY])
    return values


def _uuid_text(value: bytes) -> str:
    h = value.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --- (de)serialisation --------------------------------------------------------------------


def encode_op(op: Op) -> bytes:
    """The spool line (with trailing newline) of ``op`` (orjson: UUIDs and aware datetimes
    serialise natively, as strings and ISO 8601; wire bytes are converted here)."""
    kind, seq, data, _ = op
    record: dict[str, Any]
    if kind == INSERT:
        row = list(data)
        for col in _UUID_COLUMNS:
            value = row[col]
            if type(value) is bytes:
                row[col] = _uuid_text(value)
        secondary = row[C_SECONDARY]
        if type(secondary) is bytes:
            row[C_SECONDARY] = orjson.Fragment(secondary[1:])
        record = {"v": FORMAT_VERSION, "op": INSERT, "seq": seq, "row": row}
    else:
        # {"id": log_id, <the other fields by name>}: the keys of format version 2.
        record = {"v": FORMAT_VERSION, "op": kind, "seq": seq, "id": data.log_id}
        record.update(zip(data._fields[1:], data[1:], strict=True))
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def decode_op(line: bytes) -> Op:
    """Parse one spool line; raises ``ValueError`` (naming what is wrong) for a bad line."""
    record = orjson.loads(line)
    if not isinstance(record, dict) or record.get("v") not in READABLE_VERSIONS:
        raise ValueError(
            f"expected a spool record of version {READABLE_VERSIONS}, found {line[:80]!r}"
        )
    kind = str(record.get("op"))
    seq = int(record["seq"])
    if kind == INSERT:
        row = list(record["row"])
        if len(row) != len(ROW_COLUMNS):
            raise ValueError(f"insert row has {len(row)} values, expected {len(ROW_COLUMNS)}")
        for col in _UUID_COLUMNS:
            row[col] = None if row[col] is None else uuid.UUID(row[col]).bytes
        for col in _TIME_COLUMNS:
            row[col] = _time(row[col])
        row[C_SECONDARY] = secondary_document(
            (str(item["intent"]), float(item["confidence"]))
            if isinstance(item, dict)
            else (str(item[0]), float(item[1]))
            for item in row[C_SECONDARY] or ()
        )
        return (INSERT, seq, tuple(row), None)
    change = CHANGE_TYPES.get(kind)
    if change is not None:
        fields = change._fields  # log_id, <named fields>, at
        values = [record[field] for field in fields[1:-1]]
        data = change._make([uuid.UUID(record["id"]), *values, _time(record["at"])])
        return (kind, seq, data, None)
    raise ValueError(f"unknown spool op {kind!r}; expected insert, outcome or correction")


# --- rejected operations ------------------------------------------------------------------

REJECTED_FILE = "rejected.jsonl"


def append_rejected(
    path: Path, reason: str, *, op: Op | None = None, raw: bytes | None = None
) -> None:
    """Append one JSON line to the rejected-operations file (``HOME/rejected.jsonl``):
    ``{"at", "reason", "op": <the spool record>}`` for an operation the database refused, or
    ``{"at", "reason", "raw": <the text>}`` for a spool line that could not be read."""
    record: dict[str, Any] = {"at": utc_now().isoformat(), "reason": reason}
    if op is not None:
        record["op"] = json.loads(encode_op(op))
    if raw is not None:
        record["raw"] = raw.decode("utf-8", "replace")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")


# --- segments -----------------------------------------------------------------------------


@dataclass(eq=False)
class Segment:
    """One spool file. ``fd`` is open (and flock'ed) while this process owns it."""

    path: Path
    first_seq: int
    fd: int | None = None
    last_seq: int = -1
    appended: int = 0
    committed: int = 0
    closed: bool = False
    fsync: bool = False

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


def read_ops(path: Path) -> Iterator[tuple[int, bytes | Op]]:
    """Yield ``(line number, Op)`` for each good line of a segment, ``(line number, raw)`` for a
    line that cannot be parsed (the caller rejects it). A last line without a newline (a write cut
    short by a crash) is skipped with a warning."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith(b"\n"):
                logger.warning(
                    "spool %s line %d is incomplete (a crash during the write); skipped",
                    path,
                    number,
                )
                return
            try:
                yield number, decode_op(line)
            except (ValueError, KeyError, TypeError) as exc:  # orjson.JSONDecodeError too
                logger.error("spool %s line %d is unreadable: %s", path, number, exc)
                yield number, line


def read_batches(path: Path, size: int) -> Iterator[list[Op] | tuple[int, bytes]]:
    """The operations of a segment (:func:`read_ops`) in order, in lists of at most ``size``;
    an unreadable line comes as ``(line number, raw)`` when it is reached."""
    batch: list[Op] = []
    for number, item in read_ops(path):
        if isinstance(item, bytes):
            yield number, item
            continue
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class Spool:
    """This logger instance's segments plus access to segments left by dead processes."""

    def __init__(self, directory: Path, *, fsync: bool = False) -> None:
        self.directory = directory
        self.fsync = fsync
        self.instance = f"{uuid7().hex}-{os.getpid()}"
        self.current: Segment | None = None
        # Closed segments whose operations must be replayed, ordered by first_seq.
        self.pending: list[Segment] = []
        # Journal segments (spool/fsync modes) whose operations are also in memory.
        self.covered: list[Segment] = []

    def _ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def new_segment(self, first_seq: int) -> Segment:
        """Create, lock and name a new segment (locked before it becomes visible)."""
        self._ensure_dir()
        name = f"{self.instance}-{first_seq:012d}{SUFFIX}"
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, self.directory / name)
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
        data = b"".join(encode_op(op) for op in ops)
        view = memoryview(data)
        assert segment.fd is not None
        while view:
            view = view[os.write(segment.fd, view) :]
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
        (the caller deletes it after replay, or releases it)."""
        if not self.directory.is_dir():
            return
        own = self.own_paths()
        for tmp in self.directory.glob(f".*{SUFFIX}.tmp"):
            # A segment whose creator died between creating and naming it (it is empty).
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(tmp, os.O_RDONLY)
                if _lock(fd):
                    tmp.unlink(missing_ok=True)
                os.close(fd)
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path in own or path.name.startswith("."):
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            if not _lock(fd):
                os.close(fd)  # a live process owns it
                continue
            if os.fstat(fd).st_nlink == 0:  # replayed and removed by someone else meanwhile
                os.close(fd)
                continue
            first = path.stem.rsplit("-", 1)[-1]
            segment = Segment(path, int(first) if first.isdigit() else 0, fd=fd, closed=True)
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
