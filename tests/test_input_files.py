"""tasks/input_files.py: the one reader of JSON list / JSON Lines files people's tools save.

Readable files give the same rows whatever the BOM or line ends; an unreadable file gives ONE
file-level message naming the file, what it is (encoding, CSV, HTML, ...) and the fix; a bad
line in a JSON Lines file is reported on its own, with its line number.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from capture.errors import UserError
from capture.text import clean_notes
from tasks.input_files import (
    DEFAULT_EXPECTED,
    BadRow,
    InputFileError,
    JsonRows,
    read_json_rows,
    read_text_file,
)
from tests import REPO, SHARED_DATASETS

ROWS: list[dict[str, Any]] = [
    {
        "id": "0190f7a4-0000-7000-8000-000000000001",
        "prompt": "play some jazz",
        "predicted_intent": "music_play",
        "confidence": 0.41,
        "created_at": "2026-05-01T10:00:00+00:00",
        "corrected_intent": "",
        "notes": "",
    },
    {
        "id": "0190f7a4-0000-7000-8000-000000000002",
        "prompt": "שלום 👋 你好",
        "predicted_intent": "greeting",
        "confidence": 0.2,
        "created_at": "2026-05-01T10:01:00+00:00",
        "corrected_intent": "weather",
        "notes": "line\u2028separator inside",
    },
]
LIST_TEXT = json.dumps(ROWS, indent=2, ensure_ascii=False) + "\n"
JSONL_TEXT = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _read(path: Path, **kwargs: Any) -> JsonRows:
    return read_json_rows(path, what="review file", **kwargs)


def _file_error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(InputFileError) as info:
        _read(path, **kwargs)
    assert isinstance(info.value, UserError)
    assert isinstance(info.value, ValueError)
    assert info.value.path == path
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


# ----------------------------------------------------------------------------- readable files


ENCODING_FOUND = {b"": "utf-8", b"\xef\xbb\xbf": "utf-8 with BOM"}


def encodings(
    label: str, name: str, text: str, layout: str
) -> list[tuple[str, str, bytes, str, str]]:
    """The readable cases of ``text``: UTF-8, with a byte-order mark, with CRLF line ends, and
    with both — (case, file name, bytes, layout, encoding found)."""
    bom, crlf = b"\xef\xbb\xbf", text.replace("\n", "\r\n")
    variants = [
        ("UTF-8", b"", text),
        ("UTF-8-BOM", bom, text),
        ("CRLF", b"", crlf),
        ("UTF-8-BOM CRLF", bom, crlf),
    ]
    return [
        (f"{case} {label}", name, start + body.encode("utf-8"), layout, ENCODING_FOUND[start])
        for case, start, body in variants
    ]


READABLE = [
    *encodings("list", "r.json", LIST_TEXT, "list"),
    *encodings("JSONL", "r.jsonl", JSONL_TEXT, "jsonl"),
    (
        "JSONL without final newline",
        "r.jsonl",
        JSONL_TEXT.rstrip("\n").encode("utf-8"),
        "jsonl",
        "utf-8",
    ),
    ("ASCII-escaped list", "r.json", json.dumps(ROWS).encode("ascii"), "list", "utf-8"),
]


@pytest.mark.parametrize("case", READABLE, ids=[c[0] for c in READABLE])
def test_readable_files_give_the_same_rows(
    tmp_path: Path, case: tuple[str, str, bytes, str, str]
) -> None:
    _, name, data, layout, encoding = case
    result = _read(_write(tmp_path, name, data))
    assert [value for _, value in result.rows] == ROWS
    assert [row for row, _ in result.rows] == [1, 2]
    assert (result.layout, result.encoding, result.bad_rows) == (layout, encoding, [])
    assert result.rows[1][1]["notes"] == "line\u2028separator inside"  # not split at U+2028


def test_issue_13_case_1_a_bom_file_reads_like_the_same_file_without_it(tmp_path: Path) -> None:
    rows = [dict(ROWS[0], id=f"0190f7a4-0000-7000-8000-{i:012d}") for i in range(10)]
    text = json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    plain = _read(_write(tmp_path, "plain.json", text.encode("utf-8")))
    bom = _read(_write(tmp_path, "bom.json", b"\xef\xbb\xbf" + text.encode("utf-8")))
    assert bom.rows == plain.rows
    assert len(bom.rows) == 10
    assert bom.bad_rows == []


def test_jsonl_rows_are_line_numbers_and_blank_lines_are_ignored(tmp_path: Path) -> None:
    text = '\n{"a": 1}\n\n   \n{"a": 2}\r\n\t\n{"a": 3}\n\n'
    result = _read(_write(tmp_path, "r.jsonl", text.encode("utf-8")))
    assert result.rows == [(2, {"a": 1}), (5, {"a": 2}), (7, {"a": 3})]
    assert result.unit == "line"
    assert result.where(5) == f"{tmp_path / 'r.jsonl'}, line 5"


def test_list_rows_are_element_positions(tmp_path: Path) -> None:
    result = _read(_write(tmp_path, "r.json", b'[\n  {"a": 1},\n\n  {"a": 2}\n]'))
    assert result.rows == [(1, {"a": 1}), (2, {"a": 2})]
    assert result.unit == "row"
    assert result.where(2) == f"{tmp_path / 'r.json'}, row 2"


def test_an_empty_list_is_zero_rows_not_an_error(tmp_path: Path) -> None:
    result = _read(_write(tmp_path, "r.json", b"[]\n"))
    assert (result.layout, result.rows, result.bad_rows) == ("list", [], [])


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_jsonl_splits_only_at_line_feeds_not_at_unicode_line_breaks(
    tmp_path: Path, separator: str
) -> None:
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw; str.splitlines()
    would cut the row in two there."""
    rows = [{"text": f"a{separator}b", "label": "x"}, {"text": "c", "label": "y"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert separator in text
    result = _read(_write(tmp_path, "r.jsonl", text.encode("utf-8")))
    assert (result.rows, result.bad_rows) == ([(1, rows[0]), (2, rows[1])], [])


def test_jsonl_of_lists_and_files_concatenated_with_their_boms(tmp_path: Path) -> None:
    lists = _read(_write(tmp_path, "a.jsonl", b"[1, 2]\n[3, 4]\n"))
    assert (lists.layout, lists.rows) == ("jsonl", [(1, [1, 2]), (2, [3, 4])])
    both = b'\xef\xbb\xbf{"a": 1}\n' + b'\xef\xbb\xbf{"a": 2}\n'
    assert _read(_write(tmp_path, "b.jsonl", both)).rows == [(1, {"a": 1}), (2, {"a": 2})]


def test_values_are_returned_as_decoded_and_cleaned_by_capture_text(tmp_path: Path) -> None:
    """The reader does no text hygiene: NUL and lone surrogates reach the caller, whose
    capture.text rules decide (issue 13 cases 2 and 3)."""
    data = (
        b'[{"notes": "half \\ud83d emoji"}, {"notes": "nul\\u0000here"}, '
        b'{"notes": "ok \\ud83d\\ude00"}]'
    )
    result = _read(_write(tmp_path, "r.json", data))
    notes = [value["notes"] for _, value in result.rows]
    assert notes == ["half \ud83d emoji", "nul\x00here", "ok \U0001f600"]
    assert [clean_notes(n) for n in notes] == ["half \ufffd emoji", "nulhere", "ok \U0001f600"]


def test_utf16_is_read_when_the_caller_names_it(tmp_path: Path) -> None:
    path = _write(tmp_path, "r.json", LIST_TEXT.encode("utf-16"))  # with BOM
    result = _read(path, encoding="utf-16")
    assert ([v for _, v in result.rows], result.encoding) == (ROWS, "utf-16")
    text, label = read_text_file(path, what="review file", encoding="utf-16")
    assert (text, label) == (LIST_TEXT, "utf-16")


def test_read_text_file_removes_the_bom_and_keeps_line_ends(tmp_path: Path) -> None:
    path = _write(tmp_path, "t.txt", b"\xef\xbb\xbfa\r\nb\n")
    assert read_text_file(path, what="file") == ("a\r\nb\n", "utf-8 with BOM")


# ----------------------------------------------------------------------------- per-row problems


def test_a_malformed_jsonl_line_is_reported_on_its_own(tmp_path: Path) -> None:
    text = '{"id": 1, "notes": "a"}\n{"id": 2, "notes": "b"\n\n{"id": 4}\n'
    path = _write(tmp_path, "r.jsonl", text.encode("utf-8"))
    result = _read(path)
    assert result.rows == [(1, {"id": 1, "notes": "a"}), (4, {"id": 4})]
    assert result.bad_rows == [
        BadRow(
            2,
            "malformed JSON (Expecting ',' delimiter at column 23): "
            '\'{"id": 2, "notes": "b"\'; expected one JSON object per line',
        )
    ]
    assert str(result.bad_rows[0]).startswith("line 2: malformed JSON")
    with pytest.raises(InputFileError) as info:
        result.raise_for_bad_rows()
    assert str(info.value) == (
        f"{path}: 1 bad line in this review file: line 2: malformed JSON (Expecting ',' "
        'delimiter at column 23): \'{"id": 2, "notes": "b"\'; expected one JSON object per '
        "line; fix or remove it and try again"
    )


def test_a_bad_first_line_is_still_a_row_problem(tmp_path: Path) -> None:
    path = _write(tmp_path, "r.jsonl", b'oops, a note\n{"a": 1}\n{"a": 2}\n')
    result = _read(path)
    assert [row for row, _ in result.rows] == [2, 3]
    assert [b.row for b in result.bad_rows] == [1]
    assert "Expecting value at column 1" in result.bad_rows[0].message


def test_many_bad_lines_are_listed_up_to_five(tmp_path: Path) -> None:
    text = '{"a": 1}\n' + "".join(f"bad {i}\n" for i in range(8))
    result = _read(_write(tmp_path, "r.jsonl", text.encode("utf-8")))
    assert [b.row for b in result.bad_rows] == list(range(2, 10))
    with pytest.raises(
        InputFileError, match=r"8 bad lines .*line 6: .*; and 3 more; fix or remove them"
    ):
        result.raise_for_bad_rows()
    _read(_write(tmp_path, "ok.jsonl", b'{"a": 1}\n')).raise_for_bad_rows()  # nothing to raise


@pytest.mark.parametrize(
    ("name", "data", "row", "unit"),
    [
        ("r.json", b'[{"a": 1}, {"corrected_intent": "x", "corrected_intent": "y"}]', 2, "row"),
        ("r.jsonl", b'{"a": 1}\n{"corrected_intent": "x", "corrected_intent": "y"}\n', 2, "line"),
        (
            "n.json",
            b'[{"meta": {"corrected_intent": 1, "corrected_intent": 2}}, {"a": 2}]',
            1,
            "row",
        ),
    ],
)
def test_a_key_given_twice_is_a_row_problem_not_silently_the_last(
    tmp_path: Path, name: str, data: bytes, row: int, unit: str
) -> None:
    result = _read(_write(tmp_path, name, data))
    assert result.bad_rows == [
        BadRow(
            row,
            "the key 'corrected_intent' appears more than once in one object (JSON would keep "
            "only the last value); keep one",
            unit,  # type: ignore[arg-type]
        )
    ]
    assert row not in [r for r, _ in result.rows]
    assert len(result.rows) == 1


# ----------------------------------------------------------------------------- file-level errors

HEADER = "id,prompt,predicted_intent,confidence,created_at,corrected_intent,notes"


def _utf16_no_bom(codec: str) -> bytes:
    return LIST_TEXT.encode(codec)


#: (case, file name, bytes, parts of the one message)
UNREADABLE = [
    ("empty", "r.json", b"", ["cannot read this review file: found an empty file (0 bytes)"]),
    ("whitespace only", "r.json", b"  \r\n\t\n", ["found only whitespace (6 bytes)"]),
    ("BOM only", "r.json", b"\xef\xbb\xbf", ["found only a byte-order mark"]),
    (
        "UTF-16 LE with BOM",
        "r.json",
        LIST_TEXT.encode("utf-16-le").join([b"\xff\xfe", b""]),
        [
            "found UTF-16 LE text (it starts with the UTF-16 LE byte-order mark)",
            "iconv -f UTF-16 -t UTF-8",
        ],
    ),
    (
        "UTF-16 BE with BOM",
        "r.json",
        b"\xfe\xff" + LIST_TEXT.encode("utf-16-be"),
        ["found UTF-16 BE text (it starts with the UTF-16 BE byte-order mark)", "save it as UTF-8"],
    ),
    (
        "UTF-32 LE with BOM",
        "r.json",
        b"\xff\xfe\x00\x00" + LIST_TEXT.encode("utf-32-le"),
        ["found UTF-32 LE text", "iconv -f UTF-32 -t UTF-8"],
    ),
    (
        "UTF-32 BE with BOM",
        "r.json",
        b"\x00\x00\xfe\xff" + LIST_TEXT.encode("utf-32-be"),
        ["UTF-32 BE text"],
    ),
    (
        "UTF-16 LE without BOM",
        "r.json",
        _utf16_no_bom("utf-16-le"),
        [
            "found UTF-16 LE text without a byte-order mark (NUL bytes between the letters)",
            "iconv -f UTF-16LE",
        ],
    ),
    (
        "UTF-16 BE without BOM",
        "r.json",
        _utf16_no_bom("utf-16-be"),
        ["UTF-16 BE text without a byte-order mark"],
    ),
    (
        "UTF-32 LE without BOM",
        "r.json",
        LIST_TEXT.encode("utf-32-le"),
        ["UTF-32 LE text without a byte-order mark"],
    ),
    (
        "CSV",
        "r.csv",
        f"{HEADER}\r\n0190,play jazz,music_play,0.4,2026-05-01,,\r\n".encode(),
        [f"found CSV (comma-separated values) with header '{HEADER}'", "spreadsheet"],
    ),
    (
        "CSV with a BOM (Excel)",
        "r.csv",
        b"\xef\xbb\xbf" + f"{HEADER}\n1,a,b,0.1,c,,\n".encode(),
        ["found CSV (comma-separated values)"],
    ),
    (
        "semicolon CSV",
        "r.csv",
        HEADER.replace(",", ";").encode() + b"\n1;a;b;0,1;c;;\n",
        ["found CSV (semicolon-separated values) with header 'id;prompt;"],
    ),
    (
        "TSV",
        "r.tsv",
        HEADER.replace(",", "\t").encode() + b"\n1\ta\tb\t0.1\tc\t\t\n",
        ["found TSV (tab-separated values) with header 'id\\x09prompt\\x09"],
    ),
    (
        "HTML error page",
        "r.json",
        b"<!DOCTYPE html>\n<html><head><title>404 Not\n Found</title></head>\n"
        b"<body>404</body></html>\n",
        ["found an HTML page (title '404 Not Found')", "error page saved instead of the file"],
    ),
    ("HTML fragment", "r.json", b"  <html>\n<p>Sign in</p>\n", ["found an HTML page,"]),
    ("XML", "r.json", b'<?xml version="1.0"?>\n<rows><row/></rows>\n', ["found an XML document"]),
    (
        "binary garbage",
        "r.json",
        random.Random(13).randbytes(2048),
        [
            "found binary data (NUL bytes, the first at byte offset",
            "pass the review file itself, a text file",
        ],
    ),
    (
        "XLSX",
        "r.xlsx",
        b"PK\x03\x04\x14\x00\x06\x00" + bytes(100),
        ["found a ZIP archive (an .xlsx"],
    ),
    ("PDF", "r.pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", ["found a PDF document"]),
    ("gzip", "r.json.gz", gzip.compress(LIST_TEXT.encode()), ["found gzip-compressed data"]),
    (
        "Latin-1",
        "r.json",
        '[{"notes": "café"}]'.encode("latin-1"),
        [
            "found a byte that is not UTF-8: 0xe9 at byte offset 15 (line 1",
            "Windows-1252 or Latin-1",
        ],
    ),
    (
        "Latin-1 after a BOM, line 3",
        "r.json",
        b"\xef\xbb\xbf[\n{},\n" + '{"notes": "na\u00efve"}]'.encode("latin-1"),
        ["0xef at byte offset 22 (line 3"],
    ),
    (
        "cut inside a character",
        "r.json",
        '[{"notes": "😀"}]'.encode()[:13],
        ["a file that ends in the middle of a UTF-8 character at byte offset 12", "cut short"],
    ),
    (
        "pretty-printed object",
        "r.json",
        json.dumps({"rows": ROWS, "meta": {"n": 2}}, indent=2).encode(),
        [
            "found one JSON object spread over several lines (keys: 'rows', 'meta'), not rows",
            "save that list alone",
        ],
    ),
    (
        "pretty-printed object without a list",
        "r.json",
        b'{\n  "a": 1,\n  "b": 2\n}\n',
        ["(keys: 'a', 'b'), not rows", "or write one object per line"],
    ),
    (
        "malformed pretty-printed object",
        "r.json",
        b'{\n  "a": 1,\n  "b": \n}\n',
        ["found text that is not JSON rows (line 1: '{': Expecting property name"],
    ),
    (
        "a JSON number",
        "r.json",
        b"42\n",
        ["found a JSON number 42 on line 1, and no JSON object on any line"],
    ),
    ("a JSON string", "r.json", b'"hello"', ["found a JSON string 'hello' on line 1"]),
    ("JSON null", "r.json", b"null", ["found JSON null on line 1"]),
    ("numbers on every line", "r.jsonl", b"1\n2\n3\n", ["found a JSON number 1 on line 1"]),
    (
        "malformed JSON list",
        "r.json",
        b'[\n  {"a": 1},\n  {"a": 2},\n]\n',
        ["found malformed JSON at line 4, column 1: Expecting value", "a missing or extra comma"],
    ),
    ("unclosed JSON list", "r.json", b'[\n  {"a": 1}\n', ["malformed JSON at line 3, column 1"]),
    (
        "two lists one after the other",
        "r.json",
        b'[{"a": 1},\n {"a": 2}]\n[{"a": 3}]\n',
        ["malformed JSON at line 3, column 1: Extra data"],
    ),
    (
        "plain text",
        "notes.txt",
        b"hello world\nthis is not json\n",
        ["found text that is not JSON rows (line 1: 'hello world': Expecting value at column 1)"],
    ),
    (
        "YAML",
        "r.yaml",
        b"- id: 1\n  corrected_intent: x\n",
        ["text that is not JSON rows (line 1: '- id: 1'"],
    ),
]


@pytest.mark.parametrize(
    ("case", "name", "data", "parts"), UNREADABLE, ids=[c[0] for c in UNREADABLE]
)
def test_an_unreadable_file_gets_one_file_level_message(
    tmp_path: Path, case: str, name: str, data: bytes, parts: list[str]
) -> None:
    path = _write(tmp_path, name, data)
    message = _file_error(path)
    for part in parts:
        assert part in message
    assert "cannot read this review file: found " in message
    assert f", expected {DEFAULT_EXPECTED}; " in message


def test_the_caller_says_what_a_good_file_is(tmp_path: Path) -> None:
    path = _write(tmp_path, "r.csv", b"a,b\n1,2\n")
    with pytest.raises(InputFileError) as info:
        read_json_rows(
            path, what="review file", expected="the JSON list written by `export --mode review`"
        )
    assert str(info.value).startswith(
        f"{path}: cannot read this review file: found CSV (comma-separated values) with header "
        "'a,b', expected the JSON list written by `export --mode review`; a spreadsheet's CSV"
    )


def test_a_wrong_encoding_named_by_the_caller_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path, "r.json", b'[{"a": 1}]\n')  # 11 bytes: not UTF-16
    assert "found bytes that are not utf-16 at byte offset" in _file_error(path, encoding="utf-16")
    assert "unknown encoding 'klingon'" in _file_error(path, encoding="klingon")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    assert _file_error(missing) == f"{missing}: no such file; pass an existing review file"
    assert _file_error(tmp_path) == f"{tmp_path}: is a directory; pass a review file"


NOBODY = 65534


def _file_error_as(uid: int, path: Path) -> str:
    """``_file_error(path)`` computed in a forked child running as ``uid`` (root reads every
    file whatever its mode, so the permission case needs another user)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, report the message, exit without pytest's teardown
        os.close(read_end)
        try:
            os.setgid(uid)
            os.setuid(uid)
            message = _file_error(path)
        except BaseException as exc:
            message = f"child failed: {exc!r}"
        os.write(write_end, message.encode("utf-8", "backslashreplace"))
        os.close(write_end)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode("utf-8")
    os.waitpid(pid, 0)
    return message


def test_unreadable_permissions() -> None:
    folder = Path(tempfile.mkdtemp(prefix="pc-perm-", dir="/tmp"))
    try:
        folder.chmod(0o711)  # another user may reach the file, not list or read it
        path = _write(folder, "r.json", b"[]")
        path.chmod(0)
        expected = (
            f"{path}: permission denied reading this review file; make it readable by this user"
        )
        found = _file_error(path) if os.geteuid() != 0 else _file_error_as(NOBODY, path)
        assert found == expected
    finally:
        shutil.rmtree(folder)


# ----------------------------------------------------------------------------- real files


def _non_blank_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def test_the_packaged_demo_dataset_reads_as_json_lines() -> None:
    path = REPO / "capture" / "data" / "demo_intents.jsonl"
    result = read_json_rows(path, what="records file")
    assert (result.layout, result.bad_rows) == ("jsonl", [])
    assert len(result.rows) == _non_blank_lines(path)
    assert all(set(value) >= {"text", "label"} for _, value in result.rows)


@pytest.mark.parametrize("name", ["clinc150", "hwu64"])
def test_the_shared_datasets_read_as_json_lines(name: str) -> None:
    path = SHARED_DATASETS / name / "val.jsonl"
    assert path.exists(), f"{path} not found: the shared datasets lie beside the checkout"
    result = read_json_rows(path, what="records file")
    assert (result.layout, result.bad_rows) == ("jsonl", [])
    assert len(result.rows) == _non_blank_lines(path)


def test_a_json_object_file_is_refused_as_rows() -> None:
    path = SHARED_DATASETS / "clinc150" / "domains.json"
    assert path.exists(), f"{path} not found: the shared datasets lie beside the checkout"
    with pytest.raises(
        InputFileError, match=r"found one JSON object spread over several lines \(keys: 'banking'"
    ):
        read_json_rows(path, what="records file")
