"""Pair construction: exact counts, balance, determinism, hard negatives, linear budget."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tasks.pairs import build_pairs, read_pairs, write_pairs
from tasks.records import Record


def _records(sizes: dict[str, int]) -> list[Record]:
    return [Record(f"{label} example {i}", label) for label, n in sizes.items() for i in range(n)]


def test_quota_is_balanced_and_capped_by_what_each_intent_can_give() -> None:
    records = _records({"a": 10, "b": 4, "c": 2})
    pairs = build_pairs(records, max_pairs=30, seed=0)
    # 30 // 3 = 10 each; b can form 4*3/2 = 6 distinct pairs, c only 1.
    assert Counter(p.label for p in pairs) == {"a": 10, "b": 6, "c": 1}
    remainder = build_pairs(records, max_pairs=7, seed=0)
    # 7 = 3 * 2 + 1: the first label (sorted) gets the extra pair.
    assert Counter(p.label for p in remainder) == {"a": 3, "b": 2, "c": 1}


def test_pairs_are_distinct_same_intent_and_never_self_pairs() -> None:
    records = _records({"a": 6, "b": 6})
    pairs = build_pairs(records, max_pairs=30, seed=1)
    assert len(pairs) == 30  # 15 = 6*5/2 per intent, all of them
    keys = {(p.label, frozenset((p.anchor, p.positive))) for p in pairs}
    assert len(keys) == 30
    for p in pairs:
        assert p.anchor != p.positive
        assert p.anchor.startswith(p.label) and p.positive.startswith(p.label)
        assert p.negative is None and p.negative_label is None


def test_deterministic_for_a_seed() -> None:
    records = _records({"a": 20, "b": 20, "c": 20})
    assert build_pairs(records, max_pairs=40, seed=7) == build_pairs(records, max_pairs=40, seed=7)
    assert build_pairs(records, max_pairs=40, seed=7) != build_pairs(records, max_pairs=40, seed=8)


def test_budget_is_linear_and_anchors_spread_over_examples() -> None:
    records = _records({"big": 1000, "other": 1000})
    pairs = build_pairs(records, max_pairs=1000, seed=0)
    assert Counter(p.label for p in pairs) == {"big": 500, "other": 500}
    big_anchors = [p.anchor for p in pairs if p.label == "big"]
    assert len(set(big_anchors)) == 500  # each anchor used once before any repeats


def test_duplicate_texts_do_not_form_pairs() -> None:
    records = [Record("same", "a"), Record("same", "a"), Record("x", "b"), Record("y", "b")]
    pairs = build_pairs(records, max_pairs=10, seed=0)
    assert Counter(p.label for p in pairs) == {"b": 1}


def test_random_negatives_without_mapping() -> None:
    pairs = build_pairs(_records({"a": 4, "b": 4}), max_pairs=4, seed=0, with_negatives=True)
    assert {(p.label, p.negative_label) for p in pairs} == {("a", "b"), ("b", "a")}


def test_zero_budget_and_negative_budget() -> None:
    assert build_pairs(_records({"a": 3, "b": 3}), max_pairs=0, seed=0) == []
    with pytest.raises(ValueError, match="max_pairs"):
        build_pairs(_records({"a": 3, "b": 3}), max_pairs=-1, seed=0)


def test_write_and_read_round_trip(tmp_path: Path) -> None:
    pairs = build_pairs(_records({"a": 4, "b": 4}), max_pairs=6, seed=0, with_negatives=True)
    path = tmp_path / "pairs.jsonl"
    assert write_pairs(path, pairs) == 6
    assert read_pairs(path) == pairs
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"anchor", "positive", "label", "negative", "negative_label"}
    path.write_text('{"anchor": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: expected a pair object"):
        read_pairs(path)


def test_read_pairs_takes_what_editors_save_and_names_what_it_cannot(tmp_path: Path) -> None:
    from tasks.input_files import InputFileError
    from tasks.pairs import PairsFileError

    pairs = build_pairs(_records({"a": 4, "b": 4}), max_pairs=4, seed=0)
    rows = [{"anchor": p.anchor, "positive": p.positive, "label": p.label} for p in pairs]
    saved = tmp_path / "saved.jsonl"
    saved.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode())
    assert read_pairs(saved) == pairs  # UTF-8 with a BOM and CRLF line ends
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    assert read_pairs(listed) == pairs  # a JSON list
    table = tmp_path / "pairs.csv"
    table.write_text("anchor,positive,label\na,b,c\n", encoding="utf-8")
    with pytest.raises(InputFileError, match=r"found CSV .*; a spreadsheet's CSV export"):
        read_pairs(table)
    wide = tmp_path / "utf16.jsonl"
    wide.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode("utf-16"))
    with pytest.raises(InputFileError, match="found UTF-16 LE text"):
        read_pairs(wide)
    listed.write_text(json.dumps([rows[0], {"anchor": "x", "positive": 3, "label": "a"}]))
    with pytest.raises(PairsFileError, match=r"listed\.json, row 2: .*'positive' is int"):
        read_pairs(listed)
