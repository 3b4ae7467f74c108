"""The model registry: versioned model directories under ``models_dir`` and the ``current`` pointer.

Layout (see docs/ARCHITECTURE.md)::

    models_dir/
      current            the serving pointer (capture.pointers.read_pointer / write_pointer)
      history.jsonl      one line per deploy / rollback: {"at", "action", "version", "previous"}
      <version>/         a model directory (format: capture.model_dir) plus metrics.json,
                         training.json, card.md, gate.json

Versions are positive integers written in decimal ("1", "2", ...), so they sort by number.
Nothing here imports torch: the CLI's ``models`` and ``rollback`` stay light.

Every change (``publish``, ``deploy``, ``rollback``) holds the registry lock
(:func:`tasks.registry_lock.registry_lock`, re-entrant), whoever calls it; the flows that read the
registry and then change it hold the same lock around the whole read-decide-write.

Every file and folder here is shared: the NLU service may run as another Unix user, so files
get the umask's mode (0644 under the usual 022) and folders 0755, including model directories
copied or moved in from a private temporary folder (:func:`share_tree`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from capture.errors import UserError
from capture.files import (
    shared_dir_mode,
    shared_file_mode,
    write_json_atomic,
    write_jsonl_atomic,
)
from capture.model_dir import (
    METADATA_FILE,
    MODEL_FILE,
    SERVING_FILES,
    ModelDirError,
    ModelMetadata,
    missing_files,
)
from capture.pointers import CandidatePointer, read_candidate, read_pointer, write_pointer
from tasks.registry_lock import (
    DEFAULT_LOCK_TIMEOUT_S,
    NoRegistryError,
    RegistryBusyError,
    holds_registry_lock,
    registry_lock,
    require_registry_dir,
)
from tasks.retry import io_task

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
__all__ = [
    "DEFAULT_LOCK_TIMEOUT_S",
    "HISTORY_FILE",
    "ModelEntry",
    "NoRegistryError",
    "RegistryBusyError",
    "RegistryError",
    "current_model_dir",
    "current_version",
    "deploy",
    "deploy_task",
    "gate_status",
    "history",
    "holds_registry_lock",
    "is_deployable",
    "list_models",
    "model_labels",
    "next_version",
    "previous_deployable",
    "publish",
    "publish_task",
    "registry_lock",
    "require_registry_dir",
    "rollback",
    "rollback_task",
    "share_tree",
    "version_dir",
    "versions",
]


class RegistryError(UserError, RuntimeError):
    """The registry cannot do what was asked (unknown version, incomplete model, nothing to roll
    back to); the message names the fix."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One version in the registry, as ``prompt-capture models`` lists it."""

    version: str
    path: Path
    serving: bool
    deployable: bool
    created_at: str | None
    parent_version: str | None
    gate: str | None  # "promoted", "rejected", or None (never gated, e.g. the first model)
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json (the weekly cycle's)
    training: dict[str, Any] = field(default_factory=dict)
    metadata: ModelMetadata | None = None  # None when the version has no metadata file
    #: The A/B test this version is under (``models_dir/candidate`` names it), or None.
    candidate: CandidatePointer | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _is_version(name: str) -> bool:
    return name.isdigit() and int(name) > 0


def versions(models_dir: Path) -> list[str]:
    """Every version directory in the registry, oldest first."""
    if not models_dir.is_dir():
        return []
    names = [p.name for p in models_dir.iterdir() if p.is_dir() and _is_version(p.name)]
    return sorted(names, key=int)


def next_version(models_dir: Path) -> str:
    """The version a new model gets: one more than the highest in the registry."""
    existing = versions(models_dir)
    return str(int(existing[-1]) + 1) if existing else "1"


def version_dir(models_dir: Path, version: str) -> Path:
    if not _is_version(version):
        raise RegistryError(
            f"version {version!r} is not a registry version; versions are positive integers "
            "(see `prompt-capture models`)"
        )
    return models_dir / version


def current_version(models_dir: Path) -> str | None:
    """The serving version named by ``models_dir/current``, or None when nothing is deployed.

    Raises ``ModelDirError`` when the pointer does not name one version directory.
    """
    pointer = read_pointer(models_dir)
    return None if pointer is None else pointer.version


def current_model_dir(models_dir: Path) -> Path | None:
    version = current_version(models_dir)
    return None if version is None else models_dir / version


def is_deployable(path: Path) -> bool:
    """A model directory can serve when it has metadata, the ONNX model and the tokenizer."""
    return not missing_files(path, SERVING_FILES)


def gate_status(path: Path) -> str | None:
    gate = _read_json(path / "gate.json")
    if not gate:
        return None
    return "promoted" if gate.get("promote") else "rejected"


def model_labels(path: Path) -> list[str]:
    """The label list in a model directory's metadata (``ModelDirError`` when malformed)."""
    return list(ModelMetadata.read(path).labels)


def list_models(models_dir: Path) -> list[ModelEntry]:
    """Every version with its metrics, training summary, gate decision, serving flag and the
    candidate pointer when it names the version.

    Raises ``ModelDirError`` naming the file and field when a version's metadata file (or the
    candidate pointer) is malformed (a version without one is listed with ``metadata`` None).
    """
    serving = current_version(models_dir)
    under_test = read_candidate(models_dir)
    entries = []
    for version in versions(models_dir):
        path = models_dir / version
        metadata = ModelMetadata.read(path) if (path / METADATA_FILE).exists() else None
        entries.append(
            ModelEntry(
                version=version,
                path=path,
                serving=version == serving,
                deployable=is_deployable(path),
                created_at=metadata.created_at if metadata else None,
                parent_version=metadata.parent_version if metadata else None,
                gate=gate_status(path),
                metrics=_read_json(path / "metrics.json"),
                training=_read_json(path / "training.json"),
                metadata=metadata,
                candidate=under_test if under_test and under_test.version == version else None,
            )
        )
    return entries


def _append_history(models_dir: Path, record: dict[str, Any]) -> None:
    """Add one line to ``history.jsonl``: the whole file is rewritten atomically (the caller
    holds the registry lock), so a crash never leaves half a line."""
    rows = [*history(models_dir), record]
    write_jsonl_atomic(models_dir / HISTORY_FILE, [_sorted(row) for row in rows])


def _sorted(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in sorted(row)}


def history(models_dir: Path) -> list[dict[str, Any]]:
    """Deploys and rollbacks, oldest first (a line that is not a JSON object is left out, with
    a warning)."""
    path = models_dir / HISTORY_FILE
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").split("\n")  # JSONL: split at "\n" only
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):  # half a line from an append cut short (older versions)
            logger.warning("%s: line %d is not a JSON object; left out", path, number)
            continue
        rows.append(row)
    return rows


def servable_version_dir(models_dir: Path, version: str) -> Path:
    """The directory of registry version ``version``; ``RegistryError`` when it is not in the
    registry or lacks a serving file (not exported to ONNX yet)."""
    path = version_dir(models_dir, version)
    if not path.is_dir():
        raise RegistryError(
            f"version {version} is not in the registry at {models_dir}; "
            "see `prompt-capture models` for the versions there"
        )
    missing = missing_files(path, SERVING_FILES)
    if missing:
        raise RegistryError(
            f"version {version} at {path} cannot serve: missing {', '.join(missing)}; "
            f"export it to ONNX first: `prompt-capture export-onnx --model {path}`"
        )
    return path


def _switch(models_dir: Path, version: str, action: str) -> str | None:
    """Point ``current`` at ``version`` and record it in the history (lock held by caller).
    When ``version`` serves already, nothing is written: no pointer, no history row."""
    path = servable_version_dir(models_dir, version)
    previous = current_version(models_dir)
    if previous == version:
        logger.debug("%s: version %s serves already; nothing changed", action, version)
        return previous
    _warn_if_gated_against_another(path, previous, action)
    write_pointer(models_dir, version)
    _append_history(
        models_dir, {"at": _now(), "action": action, "version": version, "previous": previous}
    )
    logger.info("%s: serving version %s (was %s)", action, version, previous)
    return previous


def gated_against(path: Path) -> str | None:
    """The champion version a published challenger was compared with (``metrics.json``'s
    ``champion_version``), or None (never gated, or the first model)."""
    value = _read_json(path / "metrics.json").get("champion_version")
    return str(value) if value is not None else None


def _warn_if_gated_against_another(path: Path, serving: str | None, action: str) -> None:
    if action != "deploy" or gate_status(path) is None:
        return
    champion = gated_against(path)
    if champion is not None and serving is not None and champion != serving:
        logger.warning(
            "deploying version %s, which the gate compared with version %s, but version %s "
            "serves now: it was never compared with the model it replaces",
            path.name,
            champion,
            serving,
        )


def share_tree(root: Path) -> None:
    """Give ``root`` and everything under it the shared modes: folders ``0o777 & ~umask``,
    files ``0o666 & ~umask`` (a ``mkdtemp`` folder is 0700 and ``copy2`` keeps a private
    source's 0600: the service, maybe another Unix user, must read the model)."""
    dir_mode, file_mode = shared_dir_mode(), shared_file_mode()
    os.chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), dir_mode)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def _set_onnx_version(path: Path, version: str) -> None:
    """Keep the version in an already exported model.onnx equal to the registry version."""
    from tasks.onnx_graph import read_onnx_metadata, set_onnx_metadata

    props = read_onnx_metadata(path)
    props["version"] = version
    set_onnx_metadata(path, props)


def _copy_in(model_dir: Path, models_dir: Path, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".publish-{target.name}-", dir=models_dir))
    try:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        share_tree(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(
    model_dir: Path,
    models_dir: Path,
    *,
    version: str | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    move: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> Path:
    """Put ``model_dir`` into the registry as ``version`` (default: the next one) and return the
    version directory. A model already inside ``models_dir`` under its version is kept in place;
    anything else is moved (``move``) or copied, and gets the shared modes (:func:`share_tree`).
    Writes metrics.json and training.json when given, and records the version in the model
    metadata (and model.onnx). Does not deploy. Holds the registry lock.

    Raises ``RegistryError`` when ``model_dir`` has no valid metadata or ``version`` is
    taken or not a registry version; ``RegistryBusyError`` when another run holds the lock
    for ``lock_timeout`` seconds.
    """
    if version is not None:
        version_dir(models_dir, version)  # a bad version is refused before anything is locked
    try:
        metadata = ModelMetadata.read(model_dir)
    except ModelDirError as exc:
        raise RegistryError(f"{model_dir} is not a model directory: {exc}") from exc
    with registry_lock(models_dir, timeout=lock_timeout):
        return _publish(
            model_dir,
            models_dir,
            metadata,
            version=version or next_version(models_dir),
            metrics=metrics,
            training=training,
            move=move,
        )


def _publish(
    model_dir: Path,
    models_dir: Path,
    metadata: ModelMetadata,
    *,
    version: str,
    metrics: dict[str, Any] | None,
    training: dict[str, Any] | None,
    move: bool,
) -> Path:
    target = version_dir(models_dir, version)
    if model_dir.resolve() != target.resolve():
        if target.exists():
            raise RegistryError(
                f"version {version} already exists at {target}; publish under a new version"
            )
        models_dir.mkdir(parents=True, exist_ok=True)
        if move and model_dir.stat().st_dev == models_dir.stat().st_dev:
            os.replace(model_dir, target)
            share_tree(target)
        else:
            _copy_in(model_dir, models_dir, target)
    if metadata.version != version:
        dataclasses.replace(metadata, version=version).write(target)
        if (target / MODEL_FILE).exists():
            _set_onnx_version(target / MODEL_FILE, version)
    if metrics is not None:
        write_json_atomic(target / "metrics.json", metrics)
    if training is not None:
        write_json_atomic(target / "training.json", training)
    logger.info("published version %s at %s", version, target)
    return target


def deploy(
    models_dir: Path, version: str, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S
) -> str | None:
    """Make ``version`` the serving one (atomic pointer switch, under the registry lock);
    returns the previous version. Logs a warning when the gate compared ``version`` with
    another model than the one serving now. Raises ``RegistryError`` (not in the registry,
    not exported) or ``RegistryBusyError``."""
    with registry_lock(models_dir, timeout=lock_timeout):
        return _switch(models_dir, version, "deploy")


def previous_deployable(models_dir: Path, before: str | None = None) -> str | None:
    """The newest deployable, not-rejected version older than ``before`` (default: current)."""
    before = before or current_version(models_dir)
    candidates = [
        v
        for v in versions(models_dir)
        if (before is None or int(v) < int(before))
        and is_deployable(models_dir / v)
        and gate_status(models_dir / v) != "rejected"
    ]
    return candidates[-1] if candidates else None


def rollback(
    models_dir: Path, to: str | None = None, *, lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S
) -> tuple[str | None, str]:
    """Serve ``to`` (default: the deployable version before the serving one, chosen under the
    registry lock); returns (previous, now serving). Raises ``RegistryError`` (nothing deployed
    yet and no ``to``, nothing to roll back to, not deployable) or ``RegistryBusyError``."""
    with registry_lock(models_dir, timeout=lock_timeout):
        return _rollback(models_dir, to)


def _rollback(models_dir: Path, to: str | None) -> tuple[str | None, str]:
    current = current_version(models_dir)
    if to is None and current is None:
        raise RegistryError(
            f"nothing to roll back: no version is deployed in {models_dir} yet, so there is no "
            "earlier one; deploy one with `prompt-capture deploy VERSION` (`prompt-capture "
            "models` lists them)"
        )
    target = to or previous_deployable(models_dir)
    if target is None:
        raise RegistryError(
            f"nothing to roll back to from version {current} in {models_dir}: no older "
            "deployable version; see `prompt-capture models`"
        )
    previous = _switch(models_dir, target, "rollback")
    return previous, target


publish_task = io_task(publish, name="publish-model")
deploy_task = io_task(deploy, name="deploy-model")
rollback_task = io_task(rollback, name="rollback-model")
