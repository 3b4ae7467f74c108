"""Wire rows (the logger's in-memory rows) and the spool line format, versions 1 to 3."""

from __future__ import annotations

import gc
import inspect
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from capture.models import PromptLog
from capture.rows import Outcome
from capture.spool import (
    C_ID,
    C_SECONDARY,
    C_USER,
    COPY_TYPES,
    EMPTY_SECONDARY,
    FORMAT_VERSION,
    INSERT,
    OUTCOME,
    ROW_COLUMNS,
    decode_op,
    encode_op,
    make_op,
    new_row,
    python_row,
    wire_row,
)

AT = datetime(2026, 11, 20, 9, 30, 0, 1000, tzinfo=UTC)
LOG_ID = uuid.UUID("01a21899-2305-70aa-9787-cc827d6a997e")
USER = uuid.UUID("6f1c2d0e-8a4b-4c3d-9e2f-0a1b2c3d4e5f")


def python_values() -> list[object]:
    return list(
        new_row(
            log_id=LOG_ID,
            user_id=str(USER),
            prompt="remind me to call mom",
            predicted_intent="reminders",
            confidence=0.75,
            secondary_intents=(("calendar_event", 0.125), ("weather", 0.0625)),
            conversation_id=None,
            message_index=4,
            model_version="v1",
            created_at=AT,
        )
    )


def test_the_column_table_is_the_table_s_columns_and_new_row_follows_it() -> None:
    assert sorted(ROW_COLUMNS) == sorted(PromptLog.__table__.columns.keys())
    assert len(COPY_TYPES) == len(ROW_COLUMNS)
    # Each argument of new_row lands in the column of its name (log_id: id; created_at also in
    # updated_at); every other column is empty.
    names = list(inspect.signature(new_row).parameters)
    arguments: dict[str, Any] = {name: name for name in names}
    row = dict(zip(ROW_COLUMNS, new_row(**arguments), strict=True))
    expected = {column: column if column in names else None for column in ROW_COLUMNS}
    expected |= {"id": "log_id", "updated_at": "created_at"}
    assert row == expected


def test_wire_row_holds_what_binary_copy_sends() -> None:
    row = wire_row(python_values())
    assert type(row) is tuple and len(row) == len(ROW_COLUMNS)
    assert row[C_ID] == LOG_ID.bytes and row[C_USER] == USER.bytes
    assert row[12] is None  # conversation_id
    assert row[C_SECONDARY][:1] == b"\x01"  # binary jsonb version byte
    assert orjson.loads(row[C_SECONDARY][1:]) == [
        {"intent": "calendar_event", "confidence": 0.125},
        {"intent": "weather", "confidence": 0.0625},
    ]
    empty = python_values()
    empty[C_SECONDARY] = ()
    assert wire_row(empty)[C_SECONDARY] == EMPTY_SECONDARY
    assert wire_row(row) == row  # already wire form: unchanged
    back = python_row(row)
    assert (back["id"], back["user_id"], back["conversation_id"]) == (LOG_ID, USER, None)
    assert back["secondary_intents"][1] == {"intent": "weather", "confidence": 0.0625}


def test_wire_rows_are_not_tracked_by_the_garbage_collector_once_seen() -> None:
    row = wire_row(python_values())
    op = make_op(INSERT, 1, row)
    gc.collect()
    assert not gc.is_tracked(row) and not gc.is_tracked(op)


def test_wrong_length_is_refused_with_the_counts() -> None:
    with pytest.raises(ValueError, match="insert row has 3 values, expected 17"):
        wire_row([LOG_ID, None, "p"])


def test_insert_line_round_trip() -> None:
    row = wire_row(python_values())
    line = encode_op(make_op(INSERT, 7, row))
    record = orjson.loads(line)
    assert record["v"] == FORMAT_VERSION == 3 and record["seq"] == 7
    assert record["row"][C_ID] == str(LOG_ID)  # readable: UUIDs as text
    assert record["row"][C_SECONDARY][0] == {"intent": "calendar_event", "confidence": 0.125}
    kind, seq, data, segment = decode_op(line)
    assert (kind, seq, segment) == (INSERT, 7, None)
    assert data == row


def test_a_version_1_line_with_pairs_is_still_read() -> None:
    record = {
        "v": 1,
        "op": "insert",
        "seq": 3,
        "row": [str(LOG_ID), str(USER), "remind me to call mom", "reminders", 0.75]
        + [[["calendar_event", 0.125], ["weather", 0.0625]]]
        + [None] * 7
        + [4, "v1", AT.isoformat(), AT.isoformat()],
    }
    _, _, data, _ = decode_op(orjson.dumps(record))
    assert data == wire_row(python_values())


def test_outcome_line_round_trip_and_unknown_versions() -> None:
    op = make_op(OUTCOME, 9, Outcome(LOG_ID, False, "calls", "timeout", AT))
    _, seq, data, _ = decode_op(encode_op(op))
    assert seq == 9 and list(data) == [LOG_ID, False, "calls", "timeout", AT]
    with pytest.raises(ValueError, match="spool record of version"):
        decode_op(b'{"v": 99, "op": "insert", "seq": 1, "row": []}\n')
