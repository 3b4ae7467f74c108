"""Strict JSONL loading: every bad case names the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    assert f"{path}:4:" in str(err.value)
    assert "UTF-8" in str(err.value)
    assert "iconv" in str(err.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(RecordsError, match="no records found"):
        load_records(_write(tmp_path, [""]))
    with pytest.raises(RecordsError, match="file not found"):
        load_records(tmp_path / "absent.jsonl")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(GOOD)).encode("utf-8"))
    assert [r.label for r in load_records(path)] == ["music", "weather"]
