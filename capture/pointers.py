"""The registry's pointers, owned here and nowhere else: the serving pointer
``models_dir/current`` (one line naming the serving version, :func:`read_pointer` /
:func:`write_pointer`) and the A/B candidate pointer ``models_dir/candidate``
(:func:`read_candidate` / :func:`write_candidate` / :func:`clear_candidate`).

Each names a version directory under ``models_dir`` (a model directory, format:
``capture.model_dir``). A malformed pointer raises ``capture.model_dir.ModelDirError`` naming the
file, what was expected and found, and the fix. Writes are atomic (``capture.files``): readers
see the old or the new pointer, never a partial one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capture.files import write_json_atomic, write_text_atomic
from capture.model_dir import ModelDirError, _is_number, _short

POINTER_FILE = "current"


@dataclass(frozen=True, slots=True)
class ServingPointer:
    """What ``models_dir/current`` said when read: the version, and the file's identity (a
    rewrite by ``os.replace`` makes a new inode even within one timestamp tick)."""

    version: str
    mtime_ns: int
    size: int
    inode: int


def _check_pointer_version(version: str, path: Path, found: object) -> None:
    if not version or any(c in version for c in "\n\r/\\") or version in {".", ".."}:
        raise ModelDirError(
            f"{path}: expected one line naming a version directory under {path.parent}, "
            f"found {found!r}; deploy or roll back to rewrite it (`prompt-capture rollback`)"
        )


def read_pointer(models_dir: Path) -> ServingPointer | None:
    """The serving pointer ``models_dir/current``; None when there is none (nothing deployed).

    Raises ``ModelDirError`` when it does not name one version directory, ``OSError`` when it
    cannot be read.
    """
    path = Path(models_dir) / POINTER_FILE
    try:
        with path.open("rb") as handle:  # stat and content of the same file
            stat = os.fstat(handle.fileno())
            raw = handle.read(4096)
    except FileNotFoundError:
        return None
    try:
        version = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ModelDirError(
            f"{path}: not UTF-8 text ({exc}); deploy or roll back to rewrite it"
        ) from exc
    _check_pointer_version(version, path, raw[:80])
    return ServingPointer(
        version=version, mtime_ns=stat.st_mtime_ns, size=stat.st_size, inode=stat.st_ino
    )


def write_pointer(models_dir: Path, version: str) -> Path:
    """Point ``models_dir/current`` at ``version``, atomically (readers see the old or the new
    version, never a partial line); returns the pointer's path."""
    path = Path(models_dir) / POINTER_FILE
    _check_pointer_version(version, path, version)
    return write_text_atomic(path, version + "\n")


# The candidate pointer (production A/B, docs/AB_TESTING.md): ``models_dir/candidate`` beside
# ``current``, one JSON object {"version", "mode", "share"}; written atomically (readers see the
# old or the new pointer) and cleared by one unlink, both under the registry lock
# (tasks.ab_candidate).

CANDIDATE_FILE = "candidate"
CANDIDATE_MODES = ("shadow", "canary")


@dataclass(frozen=True, slots=True)
class CandidatePointer:
    """What ``models_dir/candidate`` says: the challenger ``version`` under test, its ``mode``
    (``shadow``: predicted after the champion answered, never answers; ``canary``: answers the
    sticky ``share`` in [0, 1] of users), and the file's identity (``mtime_ns``, ``inode``)."""

    version: str
    mode: str
    share: float
    mtime_ns: int = 0
    inode: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "mode": self.mode, "share": self.share}

    def same_route(self, other: CandidatePointer | None) -> bool:
        return other is not None and self.to_dict() == other.to_dict()


def _candidate_error(path: Path, expected: str, found: object) -> ModelDirError:
    return ModelDirError(
        f"{path}: expected {expected}, found {_short(found)}; set it again with "
        "`prompt-capture candidate set VERSION --mode shadow|canary` or remove it with "
        "`prompt-capture candidate clear`"
    )


def check_candidate(version: str, mode: str, share: float, path: Path) -> None:
    """Raise ``ModelDirError`` unless ``version`` names one directory, ``mode`` is one of
    :data:`CANDIDATE_MODES` and ``share`` is a number in [0, 1]."""
    _check_pointer_version(version, path, version)
    if mode not in CANDIDATE_MODES:
        raise _candidate_error(path, f"mode one of {list(CANDIDATE_MODES)}", mode)
    if not _is_number(share) or not 0.0 <= share <= 1.0:
        raise _candidate_error(path, "share a number in [0, 1]", share)


def read_candidate(models_dir: Path) -> CandidatePointer | None:
    """The candidate pointer ``models_dir/candidate``; None when no candidate is under test.

    Raises ``ModelDirError`` when malformed, ``OSError`` when it cannot be read.
    """
    path = Path(models_dir) / CANDIDATE_FILE
    try:
        with path.open("rb") as handle:
            stat = os.fstat(handle.fileno())
            raw = handle.read(4096)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _candidate_error(path, "a JSON object {version, mode, share}", raw[:80]) from exc
    if not isinstance(data, dict):
        raise _candidate_error(path, "a JSON object {version, mode, share}", data)
    version, mode, share = data.get("version"), data.get("mode"), data.get("share", 0.0)
    if not isinstance(version, str) or not isinstance(mode, str):
        raise _candidate_error(path, "string fields version and mode", data)
    check_candidate(version, mode, share, path)
    return CandidatePointer(version, mode, float(share), stat.st_mtime_ns, stat.st_ino)


def write_candidate(models_dir: Path, version: str, mode: str, share: float) -> Path:
    """Point ``models_dir/candidate`` at ``version`` in ``mode`` with ``share``, atomically;
    returns the path. Raises ``ModelDirError`` before writing anything when a field is bad."""
    path = Path(models_dir) / CANDIDATE_FILE
    check_candidate(version, mode, share, path)
    return write_json_atomic(path, {"version": version, "mode": mode, "share": float(share)})


def clear_candidate(models_dir: Path) -> bool:
    """Remove ``models_dir/candidate`` (one atomic unlink); True when there was one."""
    try:
        os.unlink(Path(models_dir) / CANDIDATE_FILE)
    except FileNotFoundError:
        return False
    return True
