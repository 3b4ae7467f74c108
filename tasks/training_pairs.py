"""Contrastive pairs from a retraining export (the spec's ``convert_to_pairs`` step).

The pairs flow reads the production rows of a retraining JSONL (the base set gets its pairs at
training time), builds balanced same-intent pairs (``tasks.pairs.build_pairs``) and writes them
next to the export as ``<stem>.pairs.jsonl``; the retrain trains on that file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.json_values import json_fields
from tasks.pairs import build_pairs, write_pairs
from tasks.records import Record
from tasks.retry import io_task
from tasks.training_file import SOURCE_BASE, read_training_file

logger = logging.getLogger(__name__)


def pairs_path_for(training_file: Path) -> Path:
    """Where the pairs of ``exports/retraining-X.jsonl`` go: ``retraining-X.pairs.jsonl``."""
    return training_file.with_name(f"{training_file.stem}.pairs.jsonl")


@io_task(name="read-training-rows", retry_delay_seconds=1)
def read_training_rows(path: Path, production_only: bool) -> list[Record]:
    """Records of a retraining JSONL file (read and validated by
    ``tasks.training_file.read_training_file``); with ``production_only``, only rows whose
    ``source`` is not ``base``. Raises ``TrainingFileError`` naming the line of a bad row."""
    return [
        Record(row.text, row.label)
        for row in read_training_file(path)
        if not (production_only and row.source == SOURCE_BASE)
    ]


@task(cache_policy=NO_CACHE, name="build-pairs")
def make_pairs(records: list[Record], output: Path, max_pairs: int, seed: int) -> int:
    """Build up to ``max_pairs`` same-intent pairs of ``records`` and write them to ``output``
    (``{anchor, positive, label}`` JSONL); returns how many."""
    return write_pairs(output, build_pairs(records, max_pairs=max_pairs, seed=seed))


@dataclass(frozen=True, slots=True)
class PairsResult:
    """What the pairs flow wrote: ``pairs`` pairs from ``rows`` rows of ``input``."""

    input: Path
    output: Path
    pairs: int
    rows: int

    def as_dict(self) -> dict[str, Any]:
        return json_fields(self)
