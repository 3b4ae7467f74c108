"""Deploy and rollback flows: ONNX export of a registry version and the atomic ``current`` switch.

A running ``HotReloadingClassifier`` watches ``models_dir/current`` and swaps models between
requests, so deploying or rolling back needs no restart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import models_dir, resolve_optional
from tasks.registry import (
    RegistryError,
    current_version,
    deploy_task,
    gate_status,
    is_deployable,
    rollback_task,
    version_dir,
    versions,
    write_json_atomic,
)

logger = logging.getLogger(__name__)


def latest_promotable(registry: Path) -> str | None:
    """The newest version the gate did not reject."""
    candidates = [v for v in versions(registry) if gate_status(registry / v) != "rejected"]
    return candidates[-1] if candidates else None


@task(cache_policy=NO_CACHE, name="export-onnx")
def export_model(model_dir: Path, quantize: bool, validation_data: Path | None) -> dict[str, Any]:
    """Write model.onnx + tokenizer.json into ``model_dir``; record the export in metrics.json."""
    import json

    from tasks.export_onnx import export_onnx
    from tasks.records import load_records

    texts = [r.text for r in load_records(validation_data)] if validation_data else None
    report = export_onnx(model_dir, quantize=quantize, validation_texts=texts).to_dict()
    metrics_path = model_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics["export"] = report
    write_json_atomic(metrics_path, metrics)
    return report


@flow(name="deploy")
def deploy_flow(
    version: str | None = None,
    *,
    quantize: bool = True,
    validation_data: str | None = None,
    allow_rejected: bool = False,
) -> dict[str, Any]:
    """Export ``version`` (default: the newest one the gate did not reject) to ONNX when needed
    and make it the serving version. ``validation_data`` (default ``home/data/base_val.jsonl``)
    holds the texts of the int8 parity check."""
    run_logger = get_run_logger()
    registry = models_dir()
    version = version or latest_promotable(registry)
    if version is None:
        raise RegistryError(f"nothing to deploy: the registry at {registry} has no version")
    target = version_dir(registry, version)
    if not target.is_dir():
        raise RegistryError(f"version {version} is not in the registry at {registry}")
    if gate_status(target) == "rejected" and not allow_rejected:
        raise RegistryError(
            f"version {version} was rejected by the gate (see {target / 'card.md'}); pass "
            "allow_rejected=True to deploy it anyway"
        )
    export: dict[str, Any] | None = None
    if not is_deployable(target):
        export = export_model(target, quantize, resolve_optional(validation_data, "val"))
        run_logger.info(
            "exported version %s to ONNX (%s, agreement %.4f)",
            version,
            export["published"],
            export["agreement"],
        )
    previous = deploy_task(registry, version)
    run_logger.info("now serving version %s (was %s)", version, previous)
    return {
        "version": version,
        "previous": previous,
        "model_dir": str(target),
        "export": export,
    }


@flow(name="rollback")
def rollback_flow(to: str | None = None) -> dict[str, Any]:
    """Serve ``to`` (default: the newest deployable, not rejected version older than the
    current one)."""
    registry = models_dir()
    before = current_version(registry)
    previous, now = rollback_task(registry, to)
    get_run_logger().info("rolled back from version %s to %s", before, now)
    return {"previous": previous, "version": now}
