"""Pairs flow: contrastive pairs from the production part of a retraining file (the spec's
``convert_to_pairs`` step); the retrain flow adds them to the pairs it builds itself."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import latest_training_export
from tasks.pairs import build_pairs, write_pairs
from tasks.records import Record, parse_record

logger = logging.getLogger(__name__)


@task(cache_policy=NO_CACHE, name="read-training-rows", retries=2, retry_delay_seconds=1)
def read_rows(path: Path, production_only: bool) -> list[Record]:
    """Records of a retraining JSONL file; with ``production_only``, rows whose source is not
    ``base`` (the base set already gets its pairs at training time)."""
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
        record = parse_record(obj, path, lineno)
        if production_only and obj.get("source") == "base":
            continue
        records.append(record)
    return records


@task(cache_policy=NO_CACHE, name="build-pairs")
def make_pairs(records: list[Record], output: Path, max_pairs: int, seed: int) -> int:
    return write_pairs(output, build_pairs(records, max_pairs=max_pairs, seed=seed))


@flow(name="pairs")
def pairs_flow(
    input: str | None = None,
    output: str | None = None,
    max_pairs: int = 2000,
    seed: int = 0,
    production_only: bool = True,
) -> dict[str, Any]:
    """Write same-intent pairs (``{anchor, positive, label}`` JSONL) for ``input`` to ``output``
    (default: ``<input stem>.pairs.jsonl``); ``input`` defaults to the newest retraining export."""
    source = Path(input) if input else latest_training_export()
    target = Path(output) if output else source.with_name(f"{source.stem}.pairs.jsonl")
    records = read_rows(source, production_only)
    n = make_pairs(records, target, max_pairs, seed)
    get_run_logger().info("%d pairs from %d rows of %s -> %s", n, len(records), source, target)
    return {"input": str(source), "output": str(target), "pairs": n, "rows": len(records)}
