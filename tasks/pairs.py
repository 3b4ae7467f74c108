"""Contrastive pairs (the spec's ``convert_to_pairs``): plain records, linear cost, balanced.

Each intent that can form a pair (at least :data:`MIN_EXAMPLES_PER_INTENT` distinct texts) gets
about ``max_pairs / n`` (anchor, positive) pairs drawn from its own examples, capped by the
number of distinct pairs it can form; every example is used as an anchor about equally often.
Asked for negatives, each pair gets one text of a random other class.

Pair files are JSON Lines (:func:`write_pairs`); :func:`read_pairs` reads them through
``tasks.input_files.read_json_rows`` (BOM, CRLF, a JSON list too; one file-level message for
what is not such a file) and names the row of a bad pair.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from capture.errors import UserError
from capture.files import write_jsonl_atomic
from capture.text import clean_prompt, visible
from tasks.input_files import read_json_rows
from tasks.records import Record

logger = logging.getLogger(__name__)

#: Distinct texts an intent needs to form one (anchor, positive) pair.
MIN_EXAMPLES_PER_INTENT = 2
PAIRS_FILE_EXPECTED = (
    'JSON Lines of pair objects {"anchor", "positive", "label"} (optionally "negative", '
    '"negative_label"), as `prompt-capture convert-to-pairs` writes them'
)


class PairsFileError(UserError, ValueError):
    """A pairs file row that is not a pair; the message names the file, the row and the fix."""


@dataclass(frozen=True, slots=True)
class Pair:
    """An (anchor, positive) pair of the same intent, optionally with a negative of another."""

    anchor: str
    positive: str
    label: str
    negative: str | None = None
    negative_label: str | None = None


def group_by_label(records: Sequence[Record]) -> dict[str, list[str]]:
    """Texts per label, labels in sorted order, duplicate texts within a label removed."""
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(r.label, [])
        if r.text not in groups[r.label]:
            groups[r.label].append(r.text)
    return {label: groups[label] for label in sorted(groups)}


def pairable_labels(groups: Mapping[str, Sequence[str]]) -> list[str]:
    """The labels of ``groups`` (:func:`group_by_label`) with at least
    :data:`MIN_EXAMPLES_PER_INTENT` distinct texts, i.e. that can form a pair, in order."""
    return [label for label, texts in groups.items() if len(texts) >= MIN_EXAMPLES_PER_INTENT]


def _label_pairs(texts: list[str], quota: int, rng: random.Random) -> list[tuple[str, str]]:
    """``quota`` distinct unordered index pairs of ``texts`` (``quota`` <= k(k-1)/2)."""
    k = len(texts)
    total = k * (k - 1) // 2
    if 2 * quota >= total:
        # Enumerating costs O(total) <= O(2 * quota): still linear in the budget.
        chosen = [(i, j) for i in range(k) for j in range(i + 1, k)]
        rng.shuffle(chosen)
        chosen = chosen[:quota]
    else:
        seen: set[tuple[int, int]] = set()
        chosen = []
        anchors: list[int] = []
        while len(chosen) < quota:
            if not anchors:
                anchors = list(range(k))
                rng.shuffle(anchors)
            i = anchors.pop()
            # quota < total / 2, so most random partners are still free: a few tries suffice.
            for _ in range(8):
                j = rng.randrange(k - 1)
                j = j + 1 if j >= i else j
                key = (min(i, j), max(i, j))
                if key not in seen:
                    seen.add(key)
                    chosen.append((i, j))
                    break
    return [(texts[i], texts[j]) for i, j in chosen]


def build_pairs(
    records: Sequence[Record],
    *,
    max_pairs: int,
    seed: int = 0,
    with_negatives: bool = False,
) -> list[Pair]:
    """Build at most ``max_pairs`` same-intent pairs, balanced across intents.

    Of the ``n`` intents that can form a pair (:func:`pairable_labels`, sorted), intent ``i``
    gets ``max_pairs // n`` pairs, plus one for the first ``max_pairs % n`` intents, capped by
    ``k(k-1)/2`` for an intent with ``k`` distinct texts; an intent with one distinct text gets
    none (it can still be a negative).
    With ``with_negatives``, each pair gets a negative: a text of a random other label.
    Same records and seed give the same pairs; cost is linear in ``max_pairs`` and the data.
    """
    if max_pairs < 0:
        raise ValueError(f"max_pairs: expected a non-negative integer, found {max_pairs}")
    rng = random.Random(seed)
    groups = group_by_label(records)
    labels = list(groups)
    pairable = pairable_labels(groups)
    if not pairable:
        return []
    base, extra = divmod(max_pairs, len(pairable))
    pairs: list[Pair] = []
    for index, label in enumerate(pairable):
        quota = base + (1 if index < extra else 0)
        texts = groups[label]
        quota = min(quota, len(texts) * (len(texts) - 1) // 2)
        others = [other for other in labels if other != label]
        for anchor, positive in _label_pairs(texts, quota, rng):
            negative = negative_label = None
            if with_negatives and others:
                negative_label = rng.choice(others)
                negative = rng.choice(groups[negative_label])
            pairs.append(Pair(anchor, positive, label, negative, negative_label))
    rng.shuffle(pairs)
    logger.info("built %d pairs over %d intents (budget %d)", len(pairs), len(pairable), max_pairs)
    return pairs


def write_pairs(path: str | os.PathLike[str], pairs: Sequence[Pair]) -> int:
    """Write pairs as JSONL (one object per pair; absent negatives are omitted), atomically and
    private (0600: the texts are prompts, like the export they come from); returns how many."""
    rows = ({k: v for k, v in asdict(pair).items() if v is not None} for pair in pairs)
    write_jsonl_atomic(Path(path), rows, private=True)
    return len(pairs)


def _pair_error(where: str, found: object, problem: str) -> PairsFileError:
    return PairsFileError(
        f"{where}: expected a pair object with 'anchor', 'positive' and 'label' (non-empty "
        f"strings; 'negative' and 'negative_label' optional strings), found "
        f"{visible(json.dumps(found, ensure_ascii=False))} ({problem}); fix or remove it "
        "(pairs files come from "
        "`prompt-capture convert-to-pairs`)"
    )


def _text(obj: dict[str, object], key: str, where: str, *, required: bool) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if key not in obj:
        raise _pair_error(where, obj, f"{key!r} is missing")
    if not isinstance(value, str):
        raise _pair_error(where, obj, f"{key!r} is {type(value).__name__}, not a string")
    cleaned = value.strip() if key.endswith("label") else clean_prompt(value)
    if not cleaned:
        raise _pair_error(where, obj, f"{key!r} is empty")
    return cleaned


def read_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Read pairs written by :func:`write_pairs` (any file ``read_json_rows`` reads: UTF-8 with
    or without a BOM, CRLF, JSON Lines or a JSON list). Texts go through
    ``capture.text.clean_prompt``, labels are stripped, as training records' are.

    Raises ``tasks.input_files.InputFileError`` once for a file that is not such a file
    (missing, empty, UTF-16, CSV, HTML, ...) or has lines that are not JSON, and
    :class:`PairsFileError` naming ``file:row`` for the first row that is not a pair.
    """
    p = Path(path)
    rows = read_json_rows(p, what="pairs file", expected=PAIRS_FILE_EXPECTED)
    rows.raise_for_bad_rows()
    out: list[Pair] = []
    for row, obj in rows.rows:
        where = f"{p}:{row}" if rows.layout == "jsonl" else rows.where(row)
        if not isinstance(obj, dict):
            raise _pair_error(where, obj, f"a JSON {type(obj).__name__}, not an object")
        out.append(
            Pair(
                anchor=_text(obj, "anchor", where, required=True) or "",
                positive=_text(obj, "positive", where, required=True) or "",
                label=_text(obj, "label", where, required=True) or "",
                negative=_text(obj, "negative", where, required=False),
                negative_label=_text(obj, "negative_label", where, required=False),
            )
        )
    logger.debug("read %d pairs from %s", len(out), p)
    return out
