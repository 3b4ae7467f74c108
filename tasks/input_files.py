"""The ONE reader of the JSON files people's tools save (review/corrections files, training,
evaluation and pair files): :func:`read_json_rows`, and :func:`read_text_file` under it.

Accepted: UTF-8 with or without a BOM, LF or CRLF line ends, and either

* a JSON list of values (the review file format) — row ``n`` is the list's ``n``-th element
  (1-based), or
* JSON Lines — one JSON value per line, blank lines ignored; row ``n`` is line ``n`` of the
  file (1-based, counting blank lines), so it matches what an editor shows.

What cannot be read at all gets ONE file-level :class:`InputFileError` (a ``UserError``) naming the
file, what was found and the fix: an empty or whitespace-only file; UTF-16 or UTF-32 (by its BOM
or its NUL-byte pattern) unless ``encoding`` says so; bytes that are not UTF-8 (the byte offset is
named); a binary file (ZIP/XLSX, PDF, image, gzip, SQLite, NUL bytes); an HTML or XML page (an
error page saved instead of the file); CSV/TSV (a separated header line); one JSON object or
scalar instead of rows; a JSON list that does not parse (line and column named); text that is
not JSON. A JSON Lines file some of whose lines parse reports each bad line as a
:class:`BadRow` (row number + the JSON error) and returns the others; so does an object with
the same key twice (JSON would silently keep the last value).

The values are returned as :mod:`json` decodes them, unchanged: strings may hold NUL, lone
surrogates (from ``"\\ud83d"`` escapes), invisible characters and unnormalised forms, and
numbers may be NaN/Infinity (Python's JSON extension). Text hygiene is NOT done here: every
caller passes the strings it keeps through :mod:`capture.text` (``clean_prompt``,
``clean_notes``, ``IntentCatalogue.check``/``check_intent_name``), the one owner of those rules,
and range-checks its numbers. Messages show values through ``capture.text.visible`` so a lone
surrogate never breaks printing or logging.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from capture.errors import UserError
from capture.text import visible

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXPECTED",
    "BadRow",
    "InputFileError",
    "JsonRows",
    "read_json_rows",
    "read_text_file",
]

#: What a readable file looks like, as file-level messages say it unless the caller is specific.
DEFAULT_EXPECTED = "UTF-8 JSON: a list of objects, or one object per line (JSON Lines)"

_SNIFF_BYTES = 4096
_MAX_SHOWN_BAD_ROWS = 5
_UTF8_BOM = b"\xef\xbb\xbf"
# Longest first (the UTF-32 LE BOM starts with the UTF-16 LE one).
_BOMS: tuple[tuple[bytes, str, str], ...] = (
    (b"\x00\x00\xfe\xff", "UTF-32 BE", "UTF-32"),
    (b"\xff\xfe\x00\x00", "UTF-32 LE", "UTF-32"),
    (b"\xfe\xff", "UTF-16 BE", "UTF-16"),
    (b"\xff\xfe", "UTF-16 LE", "UTF-16"),
)
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a ZIP archive (an .xlsx, .ods or .docx file is one)"),
    (b"\xd0\xcf\x11\xe0", "an old Microsoft Office file (.xls or .doc)"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "gzip-compressed data (decompress it first: gunzip)"),
    (b"SQLite format 3\x00", "an SQLite database"),
)
_CONTROL_BYTES = frozenset(range(0x00, 0x09)) | frozenset(range(0x0E, 0x1B)) | {0x1C, 0x1D}
_SEPARATORS: tuple[tuple[str, str], ...] = (
    ("\t", "TSV (tab-separated values)"),
    (";", "CSV (semicolon-separated values)"),
    (",", "CSV (comma-separated values)"),
)
_ROWS_FIX = "put the rows in a JSON list [{...}, {...}] or write one object per line"
_TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
_MARKUP = re.compile(r"<(!doctype|html|head|body|\?xml|[a-z][a-z0-9:-]*[\s>/])", re.IGNORECASE)


class InputFileError(UserError, ValueError):
    """A file that cannot be read as a whole (or, from :meth:`JsonRows.raise_for_bad_rows`,
    has bad rows). The message names the file, what was found and the fix; ``path`` too."""

    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


@dataclass(frozen=True, slots=True)
class BadRow:
    """A JSON Lines line (or list element) that cannot be used; ``row`` as in :class:`JsonRows`."""

    row: int
    message: str
    unit: Literal["line", "row"] = "line"

    def __str__(self) -> str:
        return f"{self.unit} {self.row}: {self.message}"


@dataclass(frozen=True, slots=True)
class JsonRows:
    """What :func:`read_json_rows` read.

    ``rows``: ``[(row, value), ...]`` in file order, ``value`` as :mod:`json` decoded it (not
    cleaned). ``row`` is the 1-based element index for ``layout == "list"`` and the 1-based
    line number for ``"jsonl"``. ``bad_rows``: lines/elements that could not be used (not in
    ``rows``). ``encoding``: ``"utf-8"``, ``"utf-8 with BOM"`` or the one the caller gave.
    """

    path: Path
    what: str
    layout: Literal["list", "jsonl"]
    encoding: str
    rows: list[tuple[int, Any]] = field(default_factory=list)
    bad_rows: list[BadRow] = field(default_factory=list)

    @property
    def unit(self) -> Literal["line", "row"]:
        """How a row number is named in messages: ``"row"`` (list) or ``"line"`` (JSON Lines)."""
        return "row" if self.layout == "list" else "line"

    def where(self, row: int) -> str:
        """``"<path>, line 3"`` (JSON Lines) or ``"<path>, row 3"`` (list), for messages."""
        return f"{self.path}, {self.unit} {row}"

    def raise_for_bad_rows(self) -> None:
        """Raise one :class:`InputFileError` listing the first bad rows, if there are any."""
        if not self.bad_rows:
            return
        n = len(self.bad_rows)
        shown = "; ".join(str(b) for b in self.bad_rows[:_MAX_SHOWN_BAD_ROWS])
        more = f"; and {n - _MAX_SHOWN_BAD_ROWS} more" if n > _MAX_SHOWN_BAD_ROWS else ""
        raise InputFileError(
            self.path,
            f"{n} bad {self.unit}{'s' if n > 1 else ''} in this {self.what}: {shown}{more}; "
            f"fix or remove {'them' if n > 1 else 'it'} and try again",
        )


def _fail(path: Path, what: str, found: str, expected: str, fix: str) -> InputFileError:
    return InputFileError(
        path, f"cannot read this {what}: found {found}, expected {expected}; {fix}"
    )


def _utf_family_without_bom(sample: bytes) -> str | None:
    """The encoding (``"UTF-16 LE"``, ...) whose NUL-byte pattern ``sample`` has (mostly-ASCII
    UTF-16 or UTF-32 text without a BOM), else ``None``."""

    def zeros(start: int, step: int) -> float:
        part = sample[start::step]
        return part.count(0) / len(part) if part else 0.0

    if len(sample) >= 8:
        if zeros(1, 4) > 0.9 and zeros(2, 4) > 0.9 and zeros(3, 4) > 0.9 and zeros(0, 4) < 0.1:
            return "UTF-32 LE"
        if zeros(0, 4) > 0.9 and zeros(1, 4) > 0.9 and zeros(2, 4) > 0.9 and zeros(3, 4) < 0.1:
            return "UTF-32 BE"
    if len(sample) >= 4:
        if zeros(1, 2) > 0.7 and zeros(0, 2) < 0.1:
            return "UTF-16 LE"
        if zeros(0, 2) > 0.7 and zeros(1, 2) < 0.1:
            return "UTF-16 BE"
    return None


def _convert_fix(path: Path, family: str) -> str:
    return (
        f"save it as UTF-8 (the editor's 'Save as' offers the encoding), or convert it: "
        f"iconv -f {family} -t UTF-8 '{path}' > '{path.with_suffix('.utf8' + path.suffix)}'"
    )


def _sniff_binary(raw: bytes) -> str | None:
    """What binary format ``raw`` is, or ``None`` when it may be text."""
    for magic, kind in _MAGIC:
        if raw.startswith(magic):
            return kind
    sample = raw[:_SNIFF_BYTES]
    if 0 in sample:
        return f"binary data (NUL bytes, the first at byte offset {sample.index(0)})"
    controls = sum(1 for b in sample if b in _CONTROL_BYTES)
    if controls > len(sample) // 10:
        return f"binary data ({controls} control bytes in the first {len(sample)})"
    return None


def _not_utf8(
    path: Path, what: str, expected: str, raw: bytes, exc: UnicodeDecodeError, *, skipped: int
) -> InputFileError:
    """The error for bytes that are not UTF-8; offsets count from the file's first byte."""
    line = raw[: exc.start].count(b"\n") + 1
    near = raw[max(0, exc.start - 20) : exc.start + 20].decode("utf-8", "replace")
    where = f"at byte offset {exc.start + skipped} (line {line}, near {visible(near)})"
    if exc.end >= len(raw) and exc.reason == "unexpected end of data":
        found = f"a file that ends in the middle of a UTF-8 character {where}"
        return _fail(path, what, found, expected, "it was cut short; write or export it again")
    found = (
        f"a byte that is not UTF-8: 0x{raw[exc.start]:02x} {where}; the file is probably "
        "Windows-1252 or Latin-1"
    )
    fix = (
        "save it as UTF-8, or convert it: "
        f"iconv -f WINDOWS-1252 -t UTF-8 '{path}' > '{path.with_suffix('.utf8' + path.suffix)}'"
    )
    return _fail(path, what, found, expected, fix)


def read_text_file(
    path: str | os.PathLike[str],
    *,
    what: str,
    expected: str = DEFAULT_EXPECTED,
    encoding: str | None = None,
) -> tuple[str, str]:
    """The text of ``path`` and its encoding label: ``(text, "utf-8" | "utf-8 with BOM" |
    encoding)``; the BOM is removed, line ends are left as they are.

    Without ``encoding``: UTF-8 with or without BOM only. With it (a Python codec name such as
    ``"utf-16"``): decoded with that codec. Raises :class:`InputFileError` (``what`` names the
    kind of file, ``expected`` what a good one is) for a missing or unreadable file, an empty or
    whitespace-only one, UTF-16/UTF-32, binary data, or bytes that do not decode; other
    ``OSError``s (I/O failures) propagate.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputFileError(p, f"no such file; pass an existing {what}") from None
    except IsADirectoryError:
        raise InputFileError(p, f"is a directory; pass a {what}") from None
    except PermissionError:
        raise InputFileError(
            p, f"permission denied reading this {what}; make it readable by this user"
        ) from None
    if not raw:
        raise _fail(
            p,
            what,
            "an empty file (0 bytes)",
            expected,
            "was it saved or copied completely? write or export it again",
        )
    if encoding is not None:
        label = encoding
        try:
            text = raw.decode(encoding)
        except LookupError:
            raise InputFileError(p, f"unknown encoding {encoding!r}; name a Python codec") from None
        except UnicodeDecodeError as exc:
            raise _fail(
                p,
                what,
                f"bytes that are not {encoding} at byte offset {exc.start} ({exc.reason})",
                expected,
                "give the file's real encoding, or save it as UTF-8",
            ) from None
    else:
        for bom, bom_family, codec in _BOMS:
            if raw.startswith(bom):
                raise _fail(
                    p,
                    what,
                    f"{bom_family} text (it starts with the {bom_family} byte-order mark)",
                    expected,
                    _convert_fix(p, codec),
                )
        label, skipped = "utf-8", 0
        if raw.startswith(_UTF8_BOM):
            raw, label, skipped = raw[len(_UTF8_BOM) :], "utf-8 with BOM", len(_UTF8_BOM)
        family = _utf_family_without_bom(raw[:_SNIFF_BYTES]) if 0 in raw[:_SNIFF_BYTES] else None
        if family is not None:
            raise _fail(
                p,
                what,
                f"{family} text without a byte-order mark (NUL bytes between the letters)",
                expected,
                _convert_fix(p, family.replace(" ", "")),
            )
        binary = _sniff_binary(raw)
        if binary is not None:
            raise _fail(p, what, binary, expected, f"pass the {what} itself, a text file")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8(p, what, expected, raw, exc, skipped=skipped) from None
    text = text.lstrip("\ufeff")
    if not text.strip():
        found = "only a byte-order mark" if not text else f"only whitespace ({len(raw)} bytes)"
        raise _fail(p, what, found, expected, "was it saved completely? write or export it again")
    return text, label


class _DupDict(dict[str, Any]):
    """A decoded object that had a key more than once (JSON keeps the last value)."""

    duplicate_keys: list[str]


class _Decoder:
    """``json`` with an object hook that notes duplicate keys (``found`` counts them)."""

    def __init__(self) -> None:
        self.found = 0
        self.decoder = json.JSONDecoder(object_pairs_hook=self._object)

    def _object(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        self.found += 1
        counts: dict[str, int] = {}
        for key, _ in pairs:
            counts[key] = counts.get(key, 0) + 1
        dup = _DupDict(obj)
        dup.duplicate_keys = sorted(k for k, n in counts.items() if n > 1)
        return dup

    def decode(self, text: str) -> Any:
        return self.decoder.decode(text)

    def duplicate_problem(self, value: Any) -> str | None:
        """A message when an object inside ``value`` had a key twice, else ``None``."""
        if not self.found:
            return None
        keys: set[str] = set()
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, _DupDict):
                keys.update(item.duplicate_keys)
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        if not keys:
            return None
        shown = ", ".join(repr(k) for k in sorted(keys))
        return (
            f"the key {shown} appears more than once in one object (JSON would keep only the "
            "last value); keep one"
        )


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON list"
    if isinstance(value, str):
        return f"a JSON string {visible(value, 40)}"
    if value is None:
        return "JSON null"
    if isinstance(value, bool):
        return f"JSON {str(value).lower()}"
    return f"a JSON number {value!r}"


def _first_line(text: str) -> tuple[int, str]:
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            return lineno, line.rstrip("\r")
    return 1, ""


def _markup(text: str) -> str | None:
    """``"an HTML page (title '404 Not Found')"`` when ``text`` is markup, else ``None``."""
    head = text.lstrip()[:2048]
    if not head.startswith("<") or _MARKUP.match(head) is None:
        return None
    title = _TITLE.search(text[:65536])
    named = f" (title {visible(' '.join(title.group(1).split()), 60)})" if title else ""
    lowered = head.lower()
    if lowered.startswith("<?xml") and "<html" not in lowered:
        return f"an XML document{named}"
    return f"an HTML page{named}"


def _separated(text: str) -> str | None:
    """``"CSV (comma-separated values) with header 'a,b'"`` when the first lines look like a
    separated table, else ``None``."""
    lines = [ln.rstrip("\r") for ln in text.split("\n") if ln.strip()][:5]
    if not lines or lines[0].lstrip()[:1] in ("[", "{"):
        return None
    for sep, kind in _SEPARATORS:
        n = lines[0].count(sep)
        if n and (len(lines) == 1 or all(ln.count(sep) >= n for ln in lines[1:])):
            return f"{kind} with header {visible(lines[0], 100)}"
    return None


def _not_rows(path: Path, what: str, expected: str, text: str, decoder: _Decoder) -> InputFileError:
    """The one file-level error for text of which no line is a JSON object or list."""
    fix = "check that this is the right file, and that it was saved as JSON"
    table = _separated(text)
    if table is not None:
        return _fail(
            path,
            what,
            table,
            expected,
            "a spreadsheet's CSV export cannot be read; keep the file as JSON (edit it in a "
            "text editor) or convert the table to JSON",
        )
    try:
        whole = decoder.decode(text)
    except (json.JSONDecodeError, RecursionError):
        pass
    else:
        if isinstance(whole, dict):
            keys = ", ".join(visible(k, 40) for k in list(whole)[:5]) or "none"
            lists = [k for k, v in whole.items() if isinstance(v, list)]
            hint = (
                f" (if the rows are the list under {lists[0]!r}, save that list alone)"
                if lists
                else ""
            )
            return _fail(
                path,
                what,
                f"one JSON object spread over several lines (keys: {keys}), not rows",
                expected,
                _ROWS_FIX + hint,
            )
        return _fail(path, what, f"{_type_name(whole)}, not rows", expected, _ROWS_FIX)
    lineno, line = _first_line(text)
    try:
        decoder.decode(line)
    except json.JSONDecodeError as exc:
        reason = f"{exc.msg} at column {exc.colno}"
    except RecursionError:
        reason = "nested too deeply"
    else:
        reason = "not an object"
    return _fail(
        path,
        what,
        f"text that is not JSON rows (line {lineno}: {visible(line.strip(), 60)}: {reason})",
        expected,
        fix,
    )


def _parse_list(
    path: Path, what: str, expected: str, text: str, decoder: _Decoder
) -> list[Any] | None:
    """The decoded list, or ``None`` when ``text`` is several JSON lists one per line."""
    try:
        data = decoder.decode(text)
    except RecursionError:
        raise _fail(path, what, "JSON nested too deeply", expected, "flatten it") from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and _every_line_parses(text):
            return None
        raise _fail(
            path,
            what,
            f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            expected,
            "fix the file there (a missing or extra comma, bracket or quote is the usual cause)",
        ) from None
    if not isinstance(data, list):  # pragma: no cover - text starts with "["
        raise _fail(path, what, _type_name(data), expected, _ROWS_FIX)
    return data


def _every_line_parses(text: str) -> bool:
    for line in text.split("\n"):
        if line.strip():
            try:
                json.loads(line.lstrip("\ufeff"))
            except (json.JSONDecodeError, RecursionError):
                return False
    return True


def _parse_lines(text: str, decoder: _Decoder) -> tuple[list[tuple[int, Any]], list[BadRow]]:
    rows: list[tuple[int, Any]] = []
    bad: list[BadRow] = []
    for lineno, raw_line in enumerate(text.split("\n"), start=1):
        if not raw_line.strip():
            continue
        line = raw_line.lstrip("\ufeff")  # files concatenated with `cat` keep their BOMs
        try:
            value = decoder.decode(line)
        except json.JSONDecodeError as exc:
            bad.append(
                BadRow(
                    lineno,
                    f"malformed JSON ({exc.msg} at column {exc.colno}): "
                    f"{visible(line.strip(), 60)}; expected one JSON object per line",
                )
            )
            continue
        except RecursionError:
            bad.append(BadRow(lineno, "JSON nested too deeply"))
            continue
        problem = decoder.duplicate_problem(value)
        if problem is not None:
            bad.append(BadRow(lineno, problem))
            continue
        rows.append((lineno, value))
    return rows, bad


def read_json_rows(
    path: str | os.PathLike[str],
    *,
    what: str,
    expected: str = DEFAULT_EXPECTED,
    encoding: str | None = None,
) -> JsonRows:
    """Read a JSON list or JSON Lines file into numbered rows (see the module docstring).

    ``what`` names the kind of file in messages ("review file", "training records file");
    ``expected`` says what a good one is ("the JSON list written by `prompt-capture export
    --mode review`"); ``encoding`` (a Python codec) reads e.g. UTF-16 when the user says so.

    Returns :class:`JsonRows` (``rows`` may be empty for ``[]``; ``bad_rows`` lists JSON Lines
    lines that do not parse and objects with a duplicate key, per row). Raises
    :class:`InputFileError` once for a file that cannot be read as a whole (see
    :func:`read_text_file`, plus: HTML/XML, CSV/TSV, a JSON object or scalar, a malformed JSON
    list, text of which no line is a JSON object or list).
    """
    p = Path(path)
    text, label = read_text_file(p, what=what, expected=expected, encoding=encoding)
    markup = _markup(text)
    if markup is not None:
        raise _fail(
            p,
            what,
            markup,
            expected,
            "it is probably an error page saved instead of the file (a download that failed "
            "or needed a login); download or export the file again",
        )
    decoder = _Decoder()
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = _parse_list(p, what, expected, text, decoder)
        if data is not None:
            result = JsonRows(p, what, "list", label)
            for n, value in enumerate(data, start=1):
                problem = decoder.duplicate_problem(value)
                if problem is None:
                    result.rows.append((n, value))
                else:
                    result.bad_rows.append(BadRow(n, problem, "row"))
            logger.debug("%s: %d rows (JSON list, %s)", p, len(result.rows), label)
            return result
    if stripped.startswith("{") and "\n" in stripped.rstrip():
        try:
            whole = decoder.decode(text)
        except (json.JSONDecodeError, RecursionError):
            pass  # not one value: JSON Lines, or not JSON
        else:
            if isinstance(whole, dict):  # one object over several lines
                raise _not_rows(p, what, expected, text, decoder)
    rows, bad = _parse_lines(text, decoder)
    if not any(isinstance(v, dict | list) for _, v in rows):
        if rows and not bad:
            first, value = rows[0]
            raise _fail(
                p,
                what,
                f"{_type_name(value)} on line {first}, and no JSON object on any line",
                expected,
                _ROWS_FIX,
            )
        raise _not_rows(p, what, expected, text, decoder)
    logger.debug("%s: %d rows, %d bad (JSON Lines, %s)", p, len(rows), len(bad), label)
    return JsonRows(p, what, "jsonl", label, rows, bad)
