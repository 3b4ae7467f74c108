"""The spool's file format: the column table, wire rows, and the lines of a segment file.

A segment file (see :mod:`capture.spool`) is UTF-8 JSON lines, ``v`` being the format version.
Since version 3 its first line names the database the segment was written for (a
:class:`capture.db_identity.DatabaseIdentity`, see :func:`encode_header`); every other line is
one operation::

    {"v": 3, "op": "database", "database": {"backend": "postgresql", "url": "...",
     "url_hash": "...", "system_identifier": "...", "database": "...", "path": null},
     "pid": 1234, "at": "<iso8601>"}
    {"v": 3, "op": "insert", "seq": 7, "row": [<the ROW_COLUMNS values, in order>]}
    {"v": 3, "op": "outcome", "seq": 8, "id": "...", "was_successful": true,
     "workflow_type": "...", "execution_error": null, "at": "<iso8601>"}
    {"v": 3, "op": "correction", "seq": 9, "id": "...", "corrected_intent": "...",
     "correction_notes": null, "at": "<iso8601>"}

UUIDs are strings, timestamps ISO 8601 with offset, ``secondary_intents`` the stored JSON list of
``{"intent", "confidence"}`` objects (version 1 wrote ``[intent, confidence]`` pairs; both are
read). Operation lines of versions 1 and 2 are read as well; a segment of those versions has no
database line (its database is unknown: see :mod:`capture.spool` for what is done with it). A
line that does not end in a newline is a write that was cut short by a crash before
``process_message`` returned; replay ignores it.

In memory an insert's row is a *wire row* (:func:`wire_row`): a tuple in ``ROW_COLUMNS`` order
holding exactly what binary ``COPY`` sends, so the writer passes it to ``write_row`` untouched:
UUID columns as their 16 bytes, ``secondary_intents`` as a binary ``jsonb`` value (a version
byte, then the JSON text), timestamps as aware datetimes. A tuple of such atomic values is also
invisible to the cyclic garbage collector after its first pass (a queue of them costs no GC
time), unlike lists, dicts and ``uuid.UUID`` objects.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import orjson

from capture.db_identity import DatabaseIdentity
from capture.files import PRIVATE_FILE_MODE
from capture.rows import Change, Correction, Outcome
from capture.values import as_uuid, utc_now

if TYPE_CHECKING:
    from capture.spool import Segment

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
HEADER = "database"  # the op name of a segment's first line (version 3)
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


# --- the database line --------------------------------------------------------------------


def encode_header(identity: DatabaseIdentity) -> bytes:
    """A segment's first line: the database it is written for (with a trailing newline)."""
    record = {
        "v": FORMAT_VERSION,
        "op": HEADER,
        "database": identity.as_record(),
        "pid": os.getpid(),
        "at": utc_now().isoformat(),
    }
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def decode_header(line: bytes) -> DatabaseIdentity | None:
    """The identity on a database line, or ``None`` when ``line`` is not one (an operation: a
    segment of format 1 or 2). ``ValueError`` for a database line that cannot be read."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or record.get("op") != HEADER:
        return None
    return DatabaseIdentity.from_record(record.get("database"))


def read_header(path: Path) -> tuple[DatabaseIdentity | None, bool]:
    """``(identity, has_operations)`` of a segment file: the identity on its database line
    (``None`` for a segment without one: format 1/2, or a database line that cannot be read,
    logged), and whether any complete line follows it."""
    with path.open("rb") as handle:
        first = handle.readline()
        if not first.endswith(b"\n"):
            return None, False  # empty, or one line cut short by a crash
        try:
            identity = decode_header(first)
        except ValueError as exc:
            logger.error("spool %s: its database line is unreadable (%s)", path, exc)
            return None, True
        if identity is None:
            return None, True  # format 1/2: the first line is an operation
        return identity, handle.readline().endswith(b"\n")


# --- rejected operations ------------------------------------------------------------------

REJECTED_FILE = "rejected.jsonl"


def append_rejected(
    path: Path, reason: str, *, op: Op | None = None, raw: bytes | None = None
) -> None:
    """Append one JSON line to the rejected-operations file (``HOME/rejected.jsonl``):
    ``{"at", "reason", "op": <the spool record>}`` for an operation the database refused, or
    ``{"at", "reason", "raw": <the text>}`` for a spool line that could not be read. The file
    holds raw prompts: it is created 0600 (and made 0600 if an older version left it wider)."""
    record: dict[str, Any] = {"at": utc_now().isoformat(), "reason": reason}
    if op is not None:
        record["op"] = json.loads(encode_op(op))
    if raw is not None:
        record["raw"] = raw.decode("utf-8", "replace")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE)
    try:
        if os.fstat(fd).st_mode & 0o777 != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


# --- reading segments ---------------------------------------------------------------------


def read_ops(path: Path) -> Iterator[tuple[int, bytes | Op]]:
    """Yield ``(line number, Op)`` for each good operation line of a segment (the database line
    is skipped), ``(line number, raw)`` for a line that cannot be parsed (the caller rejects
    it). A last line without a newline (a write cut short by a crash) is skipped with a
    warning."""
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
                if number == 1 and decode_header(line) is not None:
                    continue  # the database line
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
