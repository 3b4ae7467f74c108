"""Contrastive pairs (the spec's ``convert_to_pairs``): plain records, linear cost, balanced.

Each intent gets about ``max_pairs / n_intents`` (anchor, positive) pairs drawn from its own
examples, capped by the number of distinct pairs it can form; every example is used as an anchor
about equally often. A hard negative comes from a class the model confuses with the pair's class
when a confusion mapping is given, else from a random other class.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from capture.files import write_jsonl_atomic
from tasks.records import Record

logger = logging.getLogger(__name__)


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
    hard_negatives: Mapping[str, Sequence[str]] | None = None,
    with_negatives: bool = False,
) -> list[Pair]:
    """Build at most ``max_pairs`` same-intent pairs, balanced across intents.

    Intent ``i`` (labels sorted) gets ``max_pairs // n`` pairs, plus one for the first
    ``max_pairs % n`` intents, capped by ``k(k-1)/2`` for an intent with ``k`` distinct texts.
    Negatives are added when ``hard_negatives`` (``{label: [confusable labels, most confused
    first]}``) is given or ``with_negatives`` is true: from the confusable labels (cycling through
    them in rank order) when the mapping has any for the label, else from a random other label.
    Same records and seed give the same pairs; cost is linear in ``max_pairs`` and the data.
    """
    if max_pairs < 0:
        raise ValueError(f"max_pairs: expected a non-negative integer, found {max_pairs}")
    rng = random.Random(seed)
    groups = group_by_label(records)
    labels = list(groups)
    if not labels:
        return []
    base, extra = divmod(max_pairs, len(labels))
    want_negatives = with_negatives or hard_negatives is not None
    pairs: list[Pair] = []
    for index, label in enumerate(labels):
        quota = base + (1 if index < extra else 0)
        texts = groups[label]
        quota = min(quota, len(texts) * (len(texts) - 1) // 2)
        confusable = [
            c for c in (hard_negatives or {}).get(label, ()) if c != label and c in groups
        ]
        others = [other for other in labels if other != label]
        for n, (anchor, positive) in enumerate(_label_pairs(texts, quota, rng)):
            negative = negative_label = None
            if want_negatives and others:
                if confusable:
                    negative_label = confusable[n % len(confusable)]
                else:
                    negative_label = rng.choice(others)
                negative = rng.choice(groups[negative_label])
            pairs.append(Pair(anchor, positive, label, negative, negative_label))
    rng.shuffle(pairs)
    logger.info("built %d pairs over %d intents (budget %d)", len(pairs), len(labels), max_pairs)
    return pairs


def write_pairs(path: str | os.PathLike[str], pairs: Sequence[Pair]) -> int:
    """Write pairs as JSONL (one object per pair; absent negatives are omitted), atomically and
    private (0600: the texts are prompts, like the export they come from); returns how many."""
    rows = ({k: v for k, v in asdict(pair).items() if v is not None} for pair in pairs)
    write_jsonl_atomic(Path(path), rows, private=True)
    return len(pairs)


def read_pairs(path: str | os.PathLike[str]) -> list[Pair]:
    """Read pairs written by :func:`write_pairs`; errors name the line."""
    p = Path(path)
    out: list[Pair] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append(
                Pair(
                    anchor=str(obj["anchor"]),
                    positive=str(obj["positive"]),
                    label=str(obj["label"]),
                    negative=obj.get("negative"),
                    negative_label=obj.get("negative_label"),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{p}:{lineno}: expected a pair object with 'anchor', 'positive' and 'label', "
                f"found {line[:80]!r} ({exc})"
            ) from None
    return out
