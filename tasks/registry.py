"""The model registry: versioned model directories under ``models_dir`` and the ``current`` pointer.

Layout (see docs/ARCHITECTURE.md)::

    models_dir/
      current            one line: the serving version, replaced atomically (os.replace)
      history.jsonl      one line per deploy / rollback: {"at", "action", "version", "previous"}
      <version>/         a model directory (metadata.json, head.npz, encoder/, model.onnx,
                         tokenizer.json) plus metrics.json, training.json, card.md, gate.json

Versions are positive integers written in decimal ("1", "2", ...), so they sort by number.
Nothing here imports torch: the CLI's ``models`` and ``rollback`` stay light.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

logger = logging.getLogger(__name__)

CURRENT_FILE = "current"
HISTORY_FILE = "history.jsonl"
SERVING_FILES = ("metadata.json", "model.onnx", "tokenizer.json")


class RegistryError(RuntimeError):
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
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """The serving version named by ``models_dir/current``, or None when nothing is deployed."""
    pointer = models_dir / CURRENT_FILE
    if not pointer.exists():
        return None
    value = pointer.read_text(encoding="utf-8").strip()
    return value or None


def current_model_dir(models_dir: Path) -> Path | None:
    version = current_version(models_dir)
    return None if version is None else models_dir / version


def is_deployable(path: Path) -> bool:
    """A model directory can serve when it has metadata, the ONNX model and the tokenizer."""
    return all((path / name).is_file() for name in SERVING_FILES)


def gate_status(path: Path) -> str | None:
    gate = _read_json(path / "gate.json")
    if not gate:
        return None
    return "promoted" if gate.get("promote") else "rejected"


def model_labels(path: Path) -> list[str]:
    """The label list in a model directory's metadata.json."""
    labels = _read_json(path / "metadata.json").get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise RegistryError(f"{path / 'metadata.json'}: expected a list of labels under 'labels'")
    return list(labels)


def list_models(models_dir: Path) -> list[ModelEntry]:
    """Every version with its metrics, training summary, gate decision and serving flag."""
    serving = current_version(models_dir)
    entries = []
    for version in versions(models_dir):
        path = models_dir / version
        metadata = _read_json(path / "metadata.json")
        entries.append(
            ModelEntry(
                version=version,
                path=path,
                serving=version == serving,
                deployable=is_deployable(path),
                created_at=metadata.get("created_at"),
                parent_version=metadata.get("parent_version"),
                gate=gate_status(path),
                metrics=_read_json(path / "metrics.json"),
                training=_read_json(path / "training.json"),
            )
        )
    return entries


def _append_history(models_dir: Path, record: dict[str, Any]) -> None:
    with (models_dir / HISTORY_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def history(models_dir: Path) -> list[dict[str, Any]]:
    """Deploys and rollbacks, oldest first."""
    path = models_dir / HISTORY_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _switch(models_dir: Path, version: str, action: str) -> str | None:
    path = version_dir(models_dir, version)
    if not path.is_dir():
        raise RegistryError(
            f"version {version} is not in the registry at {models_dir}; "
            "see `prompt-capture models` for the versions there"
        )
    if not is_deployable(path):
        missing = [name for name in SERVING_FILES if not (path / name).is_file()]
        raise RegistryError(
            f"version {version} at {path} cannot serve: missing {', '.join(missing)}; "
            "export it to ONNX first"
        )
    previous = current_version(models_dir)
    write_text_atomic(models_dir / CURRENT_FILE, version + "\n")
    _append_history(
        models_dir, {"at": _now(), "action": action, "version": version, "previous": previous}
    )
    logger.info("%s: serving version %s (was %s)", action, version, previous)
    return previous


def _set_onnx_version(path: Path, version: str) -> None:
    """Keep the version in an already exported model.onnx equal to the registry version."""
    import onnx

    from tasks.export_onnx import set_onnx_metadata

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    props["version"] = version
    set_onnx_metadata(path, props)


def _copy_in(model_dir: Path, models_dir: Path, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".publish-{target.name}-", dir=models_dir))
    try:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
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
) -> Path:
    """Put ``model_dir`` into the registry as ``version`` (default: the next one) and return the
    version directory. A model already inside ``models_dir`` under its version is kept in place;
    anything else is moved (``move``) or copied. Writes metrics.json and training.json when
    given, and records the version in metadata.json. Does not deploy."""
    version = version or next_version(models_dir)
    target = version_dir(models_dir, version)
    if model_dir.resolve() != target.resolve():
        if target.exists():
            raise RegistryError(
                f"version {version} already exists at {target}; publish under a new version"
            )
        models_dir.mkdir(parents=True, exist_ok=True)
        if move and model_dir.stat().st_dev == models_dir.stat().st_dev:
            os.replace(model_dir, target)
        else:
            _copy_in(model_dir, models_dir, target)
    metadata_path = target / "metadata.json"
    metadata = _read_json(metadata_path)
    if not metadata:
        raise RegistryError(f"{model_dir} has no metadata.json: it is not a model directory")
    if metadata.get("version") != version:
        metadata["version"] = version
        write_json_atomic(metadata_path, metadata)
        if (target / "model.onnx").exists():
            _set_onnx_version(target / "model.onnx", version)
    if metrics is not None:
        write_json_atomic(target / "metrics.json", metrics)
    if training is not None:
        write_json_atomic(target / "training.json", training)
    logger.info("published version %s at %s", version, target)
    return target


def deploy(models_dir: Path, version: str) -> str | None:
    """Make ``version`` the serving one (atomic pointer switch); returns the previous version."""
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


def rollback(models_dir: Path, to: str | None = None) -> tuple[str | None, str]:
    """Serve ``to`` (default: the previous deployable version); returns (previous, now serving)."""
    current = current_version(models_dir)
    target = to or previous_deployable(models_dir)
    if target is None:
        raise RegistryError(
            f"nothing to roll back to from version {current or 'none'} in {models_dir}: "
            "no older deployable version; see `prompt-capture models`"
        )
    previous = _switch(models_dir, target, "rollback")
    return previous, target


publish_task = task(cache_policy=NO_CACHE, name="publish-model", retries=2, retry_delay_seconds=2)(
    publish
)
deploy_task = task(cache_policy=NO_CACHE, name="deploy-model", retries=2, retry_delay_seconds=2)(
    deploy
)
rollback_task = task(
    cache_policy=NO_CACHE, name="rollback-model", retries=2, retry_delay_seconds=2
)(rollback)
