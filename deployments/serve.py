"""``prompt-capture serve``: every deployment of ``prefect.yaml`` served from one process.

Schedules, default parameters, tags and descriptions come from ``prefect.yaml`` (one source of
truth with ``prefect deploy --all``); the flows run in this process, so no work pool or worker
is needed. Needs a Prefect API (``prefect server start`` and ``PREFECT_API_URL``, or Cloud).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO_ROOT / "prefect.yaml"


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One entry of ``prefect.yaml``'s ``deployments`` list, as ``serve`` needs it."""

    name: str
    entrypoint: str
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: list[dict[str, Any]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    description: str | None = None
    # ``concurrency_limit``: {limit, collision_strategy} (or an int), as `prefect deploy` reads it
    concurrency_limit: dict[str, Any] | int | None = None


def read_specs(path: Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """The deployments of a ``prefect.yaml`` file; errors name the deployment and the field."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        raise ValueError(f"{path}: expected a mapping with a 'deployments' list")
    specs = []
    for index, entry in enumerate(data["deployments"]):
        where = f"{path}: deployments[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping, found {entry!r}")
        for key in ("name", "entrypoint"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise ValueError(f"{where}: field {key!r} must be a non-empty string")
        specs.append(
            DeploymentSpec(
                name=entry["name"],
                entrypoint=entry["entrypoint"],
                parameters=dict(entry.get("parameters") or {}),
                schedules=list(entry.get("schedules") or []),
                tags=list(entry.get("tags") or []),
                description=entry.get("description"),
                concurrency_limit=entry.get("concurrency_limit"),
            )
        )
    return specs


def load_flow(entrypoint: str, root: Path = REPO_ROOT) -> Any:
    """Import the flow object named by ``path/to/file.py:function`` (relative to ``root``)."""
    from prefect import Flow

    file_part, _, attr = entrypoint.partition(":")
    if not attr:
        raise ValueError(f"entrypoint {entrypoint!r}: expected 'path/to/file.py:flow_function'")
    path = root / file_part
    module_name = ".".join(Path(file_part).with_suffix("").parts)
    if module_name in sys.modules:
        module = sys.modules[module_name]
    else:
        if not path.exists():
            raise FileNotFoundError(f"entrypoint {entrypoint!r}: {path} does not exist")
        module = importlib.import_module(module_name)
    obj = getattr(module, attr, None)
    if not isinstance(obj, Flow):
        raise TypeError(f"entrypoint {entrypoint!r}: {attr} is not a Prefect flow ({obj!r})")
    return obj


def to_schedules(spec: DeploymentSpec) -> list[Any]:
    """``prefect.schedules`` objects for the spec's schedules (cron or interval)."""
    from datetime import timedelta

    from prefect.schedules import Cron, Interval

    out = []
    for index, raw in enumerate(spec.schedules):
        active = bool(raw.get("active", True))
        timezone = raw.get("timezone")
        if "cron" in raw:
            out.append(Cron(raw["cron"], timezone=timezone, active=active))
        elif "interval" in raw:
            out.append(
                Interval(
                    timedelta(seconds=float(raw["interval"])), timezone=timezone, active=active
                )
            )
        else:
            raise ValueError(
                f"deployment {spec.name!r}: schedules[{index}]: expected 'cron' or 'interval'"
            )
    return out


def to_concurrency_limit(spec: DeploymentSpec) -> Any:
    """The spec's ``concurrency_limit`` as ``to_deployment`` takes it (an int, a
    ``ConcurrencyLimitConfig``, or None)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    raw = spec.concurrency_limit
    if raw is None or isinstance(raw, int):
        return raw
    return ConcurrencyLimitConfig.model_validate(raw)


def build_deployments(specs: list[DeploymentSpec]) -> list[Any]:
    """``RunnerDeployment`` objects for ``serve``, parameters validated against each flow."""
    deployments = []
    for spec in specs:
        flow = load_flow(spec.entrypoint)
        flow.validate_parameters(spec.parameters)
        deployments.append(
            flow.to_deployment(
                name=spec.name,
                parameters=spec.parameters,
                schedules=to_schedules(spec),
                tags=spec.tags,
                description=spec.description,
                concurrency_limit=to_concurrency_limit(spec),
            )
        )
    return deployments


def serve_all(path: Path = PREFECT_YAML, *, only: list[str] | None = None) -> None:
    """Serve the deployments of ``path`` (or the ``only`` ones) until interrupted."""
    from prefect import serve

    specs = read_specs(path)
    if only:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise ValueError(
                f"unknown deployment(s) {', '.join(unknown)}; {path} has "
                f"{', '.join(s.name for s in specs)}"
            )
        specs = [s for s in specs if s.name in only]
    deployments = build_deployments(specs)
    logger.info("serving %d deployments: %s", len(specs), ", ".join(s.name for s in specs))
    serve(*deployments)
