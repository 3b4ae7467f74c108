"""Strict JSONL loading: every bad case names the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capture.text import clean_prompt
from tasks.records import Record, RecordsError, load_records, write_records


def _write(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [
    json.dumps({"text": "play some jazz", "label": "music", "source": "review"}),
    "",
    json.dumps({"text": "will it rain", "label": "weather"}),
]


def test_loads_records_and_ignores_extra_keys_and_blank_lines(tmp_path: Path) -> None:
    records = load_records(_write(tmp_path, GOOD))
    assert records == [Record("play some jazz", "music"), Record("will it rain", "weather")]


def test_round_trip_write_and_load(tmp_path: Path) -> None:
    rows = [Record("héllo wörld", "greet"), Record('say "bye"', "farewell")]
    path = tmp_path / "out.jsonl"
    assert write_records(path, rows) == 2
    assert load_records(path) == rows
    assert not (tmp_path / "out.jsonl.tmp").exists()


@pytest.mark.parametrize(
    ("bad_line", "needle"),
    [
        ('{"text": "x", "label": "a"', "malformed JSON"),
        (json.dumps({"label": "music"}), "missing field 'text'"),
        (json.dumps({"text": "hi"}), "missing field 'label'"),
        (json.dumps({"text": 3, "label": "music"}), "field 'text': expected a string, found int"),
        (json.dumps({"text": "   ", "label": "music"}), "field 'text': expected non-empty text"),
        (json.dumps({"text": "hi", "label": ""}), "field 'label': expected non-empty text"),
        (json.dumps(["hi", "music"]), "expected a JSON object"),
    ],
)
def test_bad_line_names_file_line_and_problem(tmp_path: Path, bad_line: str, needle: str) -> None:
    path = _write(tmp_path, [*GOOD, bad_line])
    with pytest.raises(RecordsError) as err:
        load_records(path)
    message = str(err.value)
    assert f"{path}:4:" in message
    assert needle in message


def test_single_label_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, [json.dumps({"text": f"t{i}", "label": "only"}) for i in range(3)])
    with pytest.raises(RecordsError, match=r"at least 2 distinct labels, found 1 \(\['only'\]\)"):
        load_records(path)
    assert len(load_records(path, min_labels=1)) == 3


def test_undecodable_bytes_name_the_line_and_encoding_fix(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    content = (
        "\n".join(GOOD) + "\n" + json.dumps({"text": "café", "label": "food"}, ensure_ascii=False)
    )
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(RecordsError) as err:
        load_records(path)
    # One file-level message (tasks.input_files) that names the file, the line and the fix.
    assert str(err.value).startswith(f"{path}: cannot read this records file")
    assert "(line 4," in str(err.value)
    assert "UTF-8" in str(err.value)
    assert "iconv" in str(err.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(RecordsError, match="found only whitespace"):
        load_records(_write(tmp_path, [""]))
    (tmp_path / "zero.jsonl").write_bytes(b"")
    with pytest.raises(RecordsError, match=r"found an empty file \(0 bytes\)"):
        load_records(tmp_path / "zero.jsonl")
    with pytest.raises(RecordsError, match="no such file"):
        load_records(tmp_path / "absent.jsonl")
    with pytest.raises(RecordsError, match="no records found"):
        load_records(_write(tmp_path, ["[]"], name="empty-list.json"))


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(GOOD)).encode("utf-8"))
    assert [r.label for r in load_records(path)] == ["music", "weather"]


@pytest.mark.parametrize(
    ("data", "found"),
    [
        ("\n".join(GOOD).encode("utf-16"), "UTF-16 LE text"),
        (b"text,label\nplay some jazz,music\nwill it rain,weather\n", "CSV (comma-separated"),
        (b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head></html>", "HTML page"),
    ],
)
def test_a_file_that_is_not_records_gets_one_file_level_message(
    tmp_path: Path, data: bytes, found: str
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    with pytest.raises(RecordsError) as err:
        load_records(path)
    message = str(err.value)
    assert message.startswith(f"{path}: cannot read this records file: found ")
    assert found in message and message.count(str(path)) >= 1


def test_crlf_and_a_json_list_read_like_json_lines(tmp_path: Path) -> None:
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(("\r\n".join(GOOD) + "\r\n").encode("utf-8"))
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([json.loads(x) for x in GOOD if x]), encoding="utf-8")
    assert load_records(crlf) == load_records(as_list) == load_records(_write(tmp_path, GOOD))


def test_bad_element_of_a_json_list_names_its_row(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b"}]), encoding="utf-8")
    with pytest.raises(RecordsError, match=r"list\.json, row 2: missing field 'label'"):
        load_records(path)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_a_text_holding_a_unicode_line_break_stays_one_record(
    tmp_path: Path, separator: str
) -> None:
    rows = [Record(f"first{separator}second", "music"), Record("will it rain", "weather")]
    path = tmp_path / "out.jsonl"
    write_records(path, rows)
    assert separator in path.read_text(encoding="utf-8")  # written raw (ensure_ascii=False)
    # One record each; U+0085 (a C1 control) is removed by capture.text like every control.
    assert load_records(path) == [Record(clean_prompt(r.text), r.label) for r in rows]


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("a\x00b", "ab"),  # NUL: PostgreSQL cannot store it
        ("half \ud83d emoji", "half \ufffd emoji"),  # lone surrogate
        ("  cafe\u0301 \u200b", "caf\u00e9"),  # NFC, surrounding whitespace and ZWSP
        ("\u05e9\u05dc\u05d5\u05dd \u200f", "\u05e9\u05dc\u05d5\u05dd \u200f"),  # RTL mark kept
    ],
)
def test_texts_are_cleaned_by_capture_text(tmp_path: Path, text: str, stored: str) -> None:
    path = tmp_path / "t.jsonl"
    line = json.dumps({"text": text, "label": "music"})  # ASCII escapes, as tools write them
    path.write_text(line + "\n" + json.dumps({"text": "x", "label": "y"}) + "\n")
    assert load_records(path)[0].text == stored


@pytest.mark.parametrize(
    ("label", "needle"),
    [
        ("Music_Play", "write 'music_play'"),
        ("weather\u200b", "invisible character"),
        ("<img src=x onerror=alert(1)>", "outside a-z, 0-9 and _"),
        ("\x00", "found '\\x00'"),
    ],
)
def test_a_label_outside_the_intent_name_form_is_refused(
    tmp_path: Path, label: str, needle: str
) -> None:
    path = _write(tmp_path, [*GOOD, json.dumps({"text": "hello", "label": label})])
    with pytest.raises(RecordsError) as err:
        load_records(path)
    assert f"{path}:4: field 'label'" in str(err.value) and needle in str(err.value)
