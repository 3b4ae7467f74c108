"""The packaged demo dataset, its stratified split and the keyword classifier."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from capture.demo_data import (
    DEFAULT_FRACTIONS,
    DEMO_INTENTS,
    DEMO_LABELS,
    OOS_LABEL,
    DemoSplits,
    KeywordClassifier,
    load_demo_dataset,
    parse_records,
    split_demo_dataset,
)
from capture.types import Classifier, Prediction

REPO = Path(__file__).resolve().parents[1]
PARTS = ("train", "val", "test", "traffic")


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    return load_demo_dataset()


@pytest.fixture(scope="module")
def splits(records: list[dict[str, str]]) -> DemoSplits:
    return split_demo_dataset(records, seed=0)


@pytest.fixture(scope="module")
def keyword(splits: DemoSplits) -> KeywordClassifier:
    return KeywordClassifier.fit(splits.train)


def _pairs(rows: list[dict[str, str]]) -> Counter[tuple[str, str]]:
    return Counter((r["text"], r["label"]) for r in rows)


# ------------------------------------------------------------------------------ dataset


def test_dataset_has_every_label_with_enough_examples(records: list[dict[str, str]]) -> None:
    assert 2800 <= len(records) <= 3300
    counts = Counter(r["label"] for r in records)
    assert set(counts) == set(DEMO_LABELS)
    assert len(DEMO_INTENTS) == 20 and OOS_LABEL not in DEMO_INTENTS
    for intent in DEMO_INTENTS:
        assert 100 <= counts[intent] <= 150, (intent, counts[intent])
    assert 250 <= counts[OOS_LABEL] <= 350


def test_dataset_texts_are_unique_and_clean(records: list[dict[str, str]]) -> None:
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts)
    assert len({t.lower() for t in texts}) == len(texts)
    for r in records:
        assert set(r) == {"text", "label"}
        assert r["text"] == r["text"].strip() and r["text"]
        assert "{" not in r["text"] and "|" not in r["text"], r["text"]


def test_dataset_is_shuffled_not_grouped_by_label(records: list[dict[str, str]]) -> None:
    first_100 = Counter(r["label"] for r in records[:100])
    assert len(first_100) >= 15


def test_committed_file_is_the_generator_output() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_demo_dataset.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_parse_records_names_the_bad_line() -> None:
    good = '{"text": "hi", "label": "smalltalk_greeting"}'
    assert (
        parse_records([good, "", good], source="x.jsonl")
        == [{"text": "hi", "label": "smalltalk_greeting"}] * 2
    )
    with pytest.raises(ValueError, match=r"x\.jsonl, line 2: field 'label'"):
        parse_records([good, '{"text": "hi"}'], source="x.jsonl")
    with pytest.raises(ValueError, match=r"line 3: expected a JSON object, found invalid JSON"):
        parse_records([good, good, "{nope"], source="x.jsonl")


# ------------------------------------------------------------------------------ split


def test_split_is_deterministic(records: list[dict[str, str]], splits: DemoSplits) -> None:
    again = split_demo_dataset(records, seed=0)
    assert again == splits
    other = split_demo_dataset(records, seed=1)
    assert other.test != splits.test


def test_split_is_disjoint_and_covers_everything(
    records: list[dict[str, str]], splits: DemoSplits
) -> None:
    parts = [getattr(splits, name) for name in PARTS]
    texts = [{r["text"] for r in p} for p in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not texts[i] & texts[j], (PARTS[i], PARTS[j])
    merged: Counter[tuple[str, str]] = Counter()
    for p in parts:
        merged += _pairs(p)
    assert merged == _pairs(records)


def test_split_is_stratified_by_label(records: list[dict[str, str]], splits: DemoSplits) -> None:
    totals = Counter(r["label"] for r in records)
    for name, frac in zip(PARTS, DEFAULT_FRACTIONS, strict=True):
        part = getattr(splits, name)
        assert abs(len(part) - frac * len(records)) <= len(totals), name
        counts = Counter(r["label"] for r in part)
        for label, n in totals.items():
            assert abs(counts[label] - frac * n) <= 1.0, (name, label, counts[label], n)
    # Parts are interleaved, not label blocks.
    assert len(Counter(r["label"] for r in splits.traffic[:60])) >= 12


def test_split_with_custom_fractions_and_bad_input(records: list[dict[str, str]]) -> None:
    sp = split_demo_dataset(records, seed=3, fractions=(0.5, 0.0, 0.5, 0.0))
    assert sp.val == [] and sp.traffic == []
    assert len(sp.train) + len(sp.test) == len(records)
    with pytest.raises(ValueError, match="sum to 1"):
        split_demo_dataset(records, fractions=(0.5, 0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="non-negative"):
        split_demo_dataset(records, fractions=(1.2, -0.2, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"records\[1\]: field 'text'"):
        split_demo_dataset([{"text": "a", "label": "x"}, {"label": "x"}])


def test_tiny_split_never_loses_records() -> None:
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(7)]
    sp = split_demo_dataset(rows, seed=5, fractions=(0.5, 0.5, 0.0, 0.0))
    assert sorted(r["text"] for r in sp.train + sp.val) == sorted(r["text"] for r in rows)


# ------------------------------------------------------------------------------ classifier


def test_keyword_classifier_is_useful_but_not_perfect(
    splits: DemoSplits, keyword: KeywordClassifier
) -> None:
    correct = sum(keyword.predict(r["text"]).intent == r["label"] for r in splits.test)
    accuracy = correct / len(splits.test)
    # Measured 0.869 on seed 0 (0.83-0.87 over split seeds 0-5). Chance is 1/21, the majority
    # label (oos) is 10%. A sentence-embedding model does clearly better on this data.
    assert 0.75 <= accuracy <= 0.95, accuracy
    # It does not just echo one label.
    predicted = Counter(keyword.predict(r["text"]).intent for r in splits.test)
    assert len(predicted) == len(DEMO_LABELS)


def test_keyword_predictions_are_valid_and_ranked(
    splits: DemoSplits, keyword: KeywordClassifier
) -> None:
    assert isinstance(keyword, Classifier)
    assert keyword.version == "keyword-v1"
    assert set(keyword.labels) == set(DEMO_LABELS)
    for r in splits.test[:200]:
        p = keyword.predict(r["text"])
        assert isinstance(p, Prediction)
        p.validate()
        assert 0.0 <= p.confidence <= 1.0
        assert len(p.secondary_intents) == 3
        names = [name for name, _ in p.secondary_intents]
        assert p.intent not in names and len(set(names)) == 3
        confs = [p.confidence, *(c for _, c in p.secondary_intents)]
        assert confs == sorted(confs, reverse=True)
        assert sum(confs) <= 1.0 + 1e-9


def test_keyword_confidence_tracks_correctness(
    splits: DemoSplits, keyword: KeywordClassifier
) -> None:
    preds = [(keyword.predict(r["text"]), r["label"]) for r in splits.test]
    right = [p.confidence for p, y in preds if p.intent == y]
    wrong = [p.confidence for p, y in preds if p.intent != y]
    assert wrong and right
    assert sum(right) / len(right) > sum(wrong) / len(wrong) + 0.1


def test_keyword_classifier_on_known_and_unknown_text() -> None:
    clf = KeywordClassifier.fit(
        [
            {"text": "set an alarm for 7am", "label": "alarm"},
            {"text": "wake me up at six", "label": "alarm"},
            {"text": "what's the weather tomorrow", "label": "weather"},
            {"text": "will it rain in Paris", "label": "weather"},
        ],
        top_k=1,
    )
    assert clf.labels == ("alarm", "weather")
    rain = clf.predict("Is it going to RAIN?")
    assert rain.intent == "weather" and rain.confidence > 0.5
    assert rain.secondary_intents[0][0] == "alarm"
    blank = clf.predict("zzz qqq")
    assert blank.confidence == pytest.approx(0.5)
    assert clf.predict_batch(["wake me at 5", "weather in Oslo"]) == [
        clf.predict("wake me at 5"),
        clf.predict("weather in Oslo"),
    ]
    assert clf.predict("wake me at 5").intent == "alarm"


def test_keyword_fit_rejects_bad_records() -> None:
    with pytest.raises(ValueError, match="found none"):
        KeywordClassifier.fit([])
    with pytest.raises(ValueError, match=r"records\[0\]: field 'label'"):
        KeywordClassifier.fit([{"text": "hello", "label": ""}])
    with pytest.raises(ValueError, match="temperature"):
        KeywordClassifier.fit([{"text": "hello", "label": "a"}], temperature=0)
