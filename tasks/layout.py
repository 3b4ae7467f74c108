"""Where things live under a PROMPT_CAPTURE_HOME: one typed paths object built from the home.

A flow builds one :class:`HomeLayout` at its entry (from the ``home`` it was given, or the
settings' home) and hands tasks the paths they need::

    home/
      models/          the registry (versions 1, 2, …, the ``current`` pointer)
      data/            base_train.jsonl, base_val.jsonl, base_test.jsonl: the base data set
      work/            scratch space (a challenger being trained)
      exports/         retraining-<stamp>.jsonl (+ .holdout.jsonl, .pairs.jsonl, .meta.json),
                       review-<stamp>.json
      inbox/           reviewed files waiting for import (processed/, rejected/ after it)
      reports/         monitoring dashboards
      spool/           the capture logger's spool
      prompt_capture.db  the default SQLite database

The base files hold the base data set of the first model (written by ``prompt-capture demo``,
or copied there by whoever trained the first model): the training data export adds
``base_train`` so the model does not forget, retraining calibrates on ``base_val``, and the gate
scores both models on ``base_test`` plus the held-out corrected prompts.

A home is *set up* when it holds the registry folder ``models/``: ``prompt-capture init`` and
the demo create it (:meth:`HomeLayout.create_registry`). The flows that read or change the
registry (weekly cycle, retrain, deploy, rollback, ab-check) refuse a home without one
(:meth:`HomeLayout.require_registry`) instead of starting a new, empty registry where nobody
looks: a worker on another machine whose PROMPT_CAPTURE_HOME is unset or not mounted fails at
once, naming the home and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from capture.errors import UserError
from capture.settings import HomeDirs

logger = logging.getLogger(__name__)

BASE_FILES = {"train": "base_train.jsonl", "val": "base_val.jsonl", "test": "base_test.jsonl"}
TRAINING_EXPORT_GLOB = "retraining-*.jsonl"


class LayoutError(UserError, FileNotFoundError):
    """A file the run needs is not where it was said to be; the message names it and the fix."""


class HomeNotSetUpError(LayoutError):
    """The run's home holds no registry (``models/``): a home nobody set up, or the wrong one."""


def stamp(now: datetime | None = None) -> str:
    """A file-name-safe UTC timestamp, e.g. ``20260312T020000Z``."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


@dataclass(frozen=True, slots=True)
class HomeLayout(HomeDirs):
    """The folders and files of one PROMPT_CAPTURE_HOME (nothing is created by building it):
    the folders of :class:`~capture.settings.HomeDirs` plus the files a run needs."""

    home: Path

    def require_registry(self) -> Path:
        """``models_dir`` when the home holds the registry folder; else raise
        :class:`HomeNotSetUpError` naming the home and the fix (nothing is created)."""
        if self.models_dir.is_dir():
            return self.models_dir
        if not self.home.exists():
            found = f"{self.home} does not exist"
        elif self.home.is_dir():
            found = f"{self.home} holds no model registry ({self.models_dir.name}/ is missing)"
        else:
            found = f"{self.home} is not a folder"
        raise HomeNotSetUpError(
            f"PROMPT_CAPTURE_HOME: {found}, so this flow would start a new, empty registry "
            "there; point PROMPT_CAPTURE_HOME (or the flow's `home` parameter) at the home "
            "every worker and serving process shares (a shared filesystem; README, 'A worker "
            "on another machine'), or create one with `prompt-capture init` or "
            "`prompt-capture demo`"
        )

    def create_registry(self) -> Path:
        """Create the home and its (empty) registry folder if missing; returns ``models_dir``.
        Shared like every registry folder (the umask's mode: a serving process may run as
        another Unix user)."""
        self.models_dir.mkdir(parents=True, exist_ok=True)
        return self.models_dir

    def base_file(self, kind: str) -> Path:
        """``home/data/base_<kind>.jsonl`` (kind: train, val, test); KeyError names the kinds."""
        if kind not in BASE_FILES:
            raise KeyError(f"base file kind {kind!r}: expected one of {', '.join(BASE_FILES)}")
        return self.data_dir / BASE_FILES[kind]

    def optional_file(
        self, path: str | Path | None, default_kind: str | None = None
    ) -> Path | None:
        """``path`` when given (it must exist: :class:`LayoutError` otherwise); else the base
        file of ``default_kind`` when it exists; else None."""
        if path:
            resolved = Path(path)
            if not resolved.exists():
                raise LayoutError(f"{resolved}: not found; pass an existing file")
            return resolved
        if default_kind is not None and self.base_file(default_kind).exists():
            return self.base_file(default_kind)
        return None

    def review_export_path(self, now: datetime | None = None) -> Path:
        """``exports/review-<stamp>.json``: where the review export writes by default."""
        return self.exports_dir / f"review-{stamp(now)}.json"

    def training_export_path(self, now: datetime | None = None) -> Path:
        """``exports/retraining-<stamp>.jsonl``: where the training data export writes."""
        return self.exports_dir / f"retraining-{stamp(now)}.jsonl"

    def latest_training_export(self) -> Path:
        """The newest ``exports/retraining-*.jsonl`` (not a ``.holdout`` or ``.pairs`` file).

        Raises :class:`LayoutError` naming the flow to run when there is none.
        """
        found = sorted(
            p
            for p in self.exports_dir.glob(TRAINING_EXPORT_GLOB)
            if not p.name.endswith((".holdout.jsonl", ".pairs.jsonl"))
        )
        if not found:
            raise LayoutError(
                f"no retraining export in {self.exports_dir}; run the training-data flow "
                "(`prompt-capture export --mode retraining`) first or pass the file"
            )
        return found[-1]
