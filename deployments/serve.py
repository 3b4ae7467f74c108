"""``prompt-capture serve``: every deployment of ``prefect.yaml`` served from one process.

Schedules, default parameters, tags and descriptions come from ``prefect.yaml`` (one source of
truth with ``prefect deploy --all``); the flows run in this process, so no work pool or worker
is needed. Needs a Prefect API (``prefect server start`` and ``PREFECT_API_URL``, or Cloud).

``serve`` and ``prefect deploy --all`` never share a deployment: serve's are named
``<name>-served`` (``weekly-cycle/weekly-cycle-served`` beside the worker's
``weekly-cycle/weekly-cycle``) and tagged ``served``. Applying a deployment replaces its pull
steps and work pool, and on Ctrl-C Prefect's runner pauses every deployment it served (which
deletes their scheduled runs), so taking over the worker's names would break the worker setup.
Before registering anything, serve refuses (:class:`ServeConflictError`) a ``-served`` name
that a worker deployment (one with a work pool or pull steps) already holds, and warns when the
worker's deployment of a stage is scheduled too (both would run it).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capture.errors import UserError
from deployments.cli_support import OptionError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
#: serve's deployment of the ``prefect.yaml`` entry ``name`` is ``name + SERVED_SUFFIX``.
SERVED_SUFFIX = "-served"
SERVED_TAG = "served"


class ServeConflictError(UserError, RuntimeError):
    """A deployment serve would register is held by someone else (a worker deployment); the
    message names it and the fix."""


def served_name(name: str) -> str:
    """The name of serve's deployment of the ``prefect.yaml`` entry ``name``."""
    return f"{name}{SERVED_SUFFIX}"


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
    """``RunnerDeployment`` objects for ``serve`` (named :func:`served_name`, tagged
    ``served``), parameters validated against each flow."""
    deployments = []
    for spec in specs:
        flow = load_flow(spec.entrypoint)
        flow.validate_parameters(spec.parameters)
        description = f"{spec.description or spec.name} (served by `prompt-capture serve`)"
        deployments.append(
            flow.to_deployment(
                name=served_name(spec.name),
                parameters=spec.parameters,
                schedules=to_schedules(spec),
                tags=[*spec.tags, SERVED_TAG],
                description=description,
                concurrency_limit=to_concurrency_limit(spec),
            )
        )
    return deployments


def check_deployments_free(deployments: list[Any]) -> list[str]:
    """Refuse to register ``deployments`` over worker deployments; return warnings.

    Raises :class:`ServeConflictError` when one of the names is held by a deployment with a
    work pool or pull steps (made by ``prefect deploy``, or by hand): registering would drop
    them, and stopping serve would pause it. A deployment of that name without either is one a
    previous serve made, and is taken over. Returns one line per stage whose worker deployment
    (the name without ``-served``) is scheduled and not paused: both would run it.
    """
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    warnings = []
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            full_name = f"{deployment.flow_name}/{deployment.name}"
            try:
                found = client.read_deployment_by_name(full_name)
            except ObjectNotFound:
                found = None
            if found is not None and (found.work_pool_name or found.pull_steps):
                raise ServeConflictError(
                    f"deployment {full_name} exists with work pool "
                    f"{found.work_pool_name or 'none'} and {len(found.pull_steps or [])} pull "
                    "step(s), so it is not one serve made; serve will not take it over (that "
                    "would drop its pull steps, and stopping serve would pause it). Rename or "
                    f"delete it (`prefect deployment delete {full_name}`), then serve again"
                )
            worker_name = deployment.name.removesuffix(SERVED_SUFFIX)
            try:
                worker = client.read_deployment_by_name(f"{deployment.flow_name}/{worker_name}")
            except ObjectNotFound:
                continue
            if not worker.paused and any(s.active for s in worker.schedules or []):
                warnings.append(
                    f"{deployment.flow_name}/{worker_name} (work pool "
                    f"{worker.work_pool_name or 'none'}) is scheduled too: its worker and this "
                    f"serve will both run {deployment.flow_name} on schedule; pause one of them"
                )
    return warnings


def prepare_served(path: Path = PREFECT_YAML, *, only: list[str] | None = None) -> list[Any]:
    """serve's ``RunnerDeployment`` objects for the entries of ``path`` (or the ``only``
    ones), after :func:`check_deployments_free` (its warnings are logged)."""
    specs = read_specs(path)
    if only:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise OptionError(
                f"--only: unknown deployment(s) {', '.join(unknown)}; {path} has "
                f"{', '.join(s.name for s in specs)}"
            )
        specs = [s for s in specs if s.name in only]
    deployments = build_deployments(specs)
    for warning in check_deployments_free(deployments):
        logger.warning("%s", warning)
    return deployments


def serve_all(path: Path = PREFECT_YAML, *, only: list[str] | None = None) -> None:
    """Serve the deployments of ``path`` (or the ``only`` ones) until interrupted. On Ctrl-C
    Prefect pauses the deployments this process registered (the ``-served`` ones) and nothing
    else."""
    from prefect import serve

    deployments = prepare_served(path, only=only)
    logger.info(
        "serving %d deployments: %s", len(deployments), ", ".join(d.name for d in deployments)
    )
    serve(*deployments, pause_on_shutdown=True)
