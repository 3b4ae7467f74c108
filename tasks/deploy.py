"""The deploy steps: which registry version to serve, its ONNX export (recorded in
``metrics.json``), the typed result of a deploy or a rollback, and the serving model's card as
the operators find it in the Prefect UI (artifact key :data:`SERVING_CARD_KEY`).

The pointer switch itself is ``tasks.registry.deploy`` / ``rollback`` (atomic; a running
``HotReloadingClassifier`` follows it between requests, so nothing restarts).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from capture.files import write_json_atomic
from tasks.export_onnx import ExportReport, export_onnx
from tasks.records import load_records
from tasks.registry import RegistryError, gate_status, version_dir, versions
from tasks.retrain import CARD_FILE

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
EXPORT_KEY = "export"  # where metrics.json records the export report
#: The artifact key of the card of the model that serves now (a new version of it on every
#: deploy and rollback; the challengers' cards are under ``model-card``).
SERVING_CARD_KEY = "serving-model-card"


def latest_promotable(models_dir: Path) -> str | None:
    """The newest version the gate did not reject (None when the registry is empty)."""
    candidates = [v for v in versions(models_dir) if gate_status(models_dir / v) != "rejected"]
    return candidates[-1] if candidates else None


@task(cache_policy=NO_CACHE, name="choose-version")
def choose_version(models_dir: Path, version: str | None, *, allow_rejected: bool) -> Path:
    """The directory of ``version`` (default: :func:`latest_promotable`) after checking it may
    be deployed. Raises :class:`tasks.registry.RegistryError` when there is nothing to deploy,
    the version is not in the registry, or the gate rejected it and ``allow_rejected`` is
    false."""
    chosen = version or latest_promotable(models_dir)
    if chosen is None:
        raise RegistryError(f"nothing to deploy: the registry at {models_dir} has no version")
    target = version_dir(models_dir, chosen)
    if not target.is_dir():
        raise RegistryError(f"version {chosen} is not in the registry at {models_dir}")
    if gate_status(target) == "rejected" and not allow_rejected:
        raise RegistryError(
            f"version {chosen} was rejected by the gate (see {target / 'card.md'}); pass "
            "allow_rejected=True to deploy it anyway"
        )
    return target


@task(cache_policy=NO_CACHE, name="export-onnx")
def export_for_serving(
    model_dir: Path, *, quantize: bool, validation_data: Path | None
) -> ExportReport:
    """Write ``model.onnx`` + ``tokenizer.json`` into ``model_dir``
    (:func:`tasks.export_onnx.export_onnx`; ``validation_data`` holds the texts of the parity
    check) and record the report under ``export`` in its ``metrics.json``."""
    texts = [r.text for r in load_records(validation_data)] if validation_data else None
    report = export_onnx(model_dir, quantize=quantize, validation_texts=texts)
    metrics_path = model_dir / METRICS_FILE
    metrics: dict[str, Any] = (
        json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
    )
    metrics[EXPORT_KEY] = report.to_dict()
    write_json_atomic(metrics_path, metrics)
    return report


@dataclass(frozen=True, slots=True)
class DeployResult:
    """A serving switch: ``version`` serves now, ``previous`` served before (None: nothing).
    ``export`` is the ONNX export this deploy made (None when the version had one already, and
    for a rollback)."""

    version: str
    previous: str | None
    model_dir: Path
    export: ExportReport | None = None

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-able values (``prompt-capture cycle --json``)."""
        return {
            "version": self.version,
            "previous": self.previous,
            "model_dir": str(self.model_dir),
            "export": self.export.to_dict() if self.export is not None else None,
        }


def serving_card_markdown(result: DeployResult, *, action: str, now: datetime | None = None) -> str:
    """The markdown of the :data:`SERVING_CARD_KEY` artifact after a deploy or a rollback
    (``action``): which version serves since when, what served before, then the version's
    model card (``card.md``; a line saying there is none for a version trained outside the
    retrain flow)."""
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M:%S UTC")
    card_path = result.model_dir / CARD_FILE
    card = (
        card_path.read_text(encoding="utf-8")
        if card_path.is_file()
        else f"_Version {result.version} has no model card ({card_path} does not exist)._\n"
    )
    return (
        f"# Serving: version {result.version}\n\n"
        f"Since {when} ({action}; before: {result.previous or 'nothing'}). "
        f"Model directory: `{result.model_dir}`.\n\n---\n\n{card}"
    )
