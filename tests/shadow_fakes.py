"""Synthetic shadow candidates that a worker PROCESS can rebuild (picklable, light imports).

The shadow worker runs the candidate in a separate process (``capture.shadow``), so a test's
candidate must cross a process boundary: :class:`GatedLoader` is a plain object that builds
:class:`GatedCandidate`, which blocks each prediction on a gate — a directory shared by the test
and the worker — until the test opens it. The first prediction records the process id it ran
in, so a test can see where the candidate predicted.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from capture.classifier import ModelLoadError
from capture.types import Prediction

ENTERED = "entered"
RELEASE = "release"


@dataclass(frozen=True)
class Gate:
    """A directory: ``entered`` (written by the candidate, holding its pid), ``release``
    (written by the test: predictions go ahead)."""

    path: Path

    def open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / RELEASE).touch()

    def is_open(self) -> bool:
        return (self.path / RELEASE).exists()

    def wait_entered(self, timeout: float = 60.0) -> int | None:
        """The pid of the process whose candidate is blocked at the gate (None on timeout)."""
        deadline = time.monotonic() + timeout
        path = self.path / ENTERED
        while time.monotonic() < deadline:
            if path.exists():
                return int(path.read_text(encoding="utf-8"))
            time.sleep(0.01)
        return None


@dataclass
class GatedCandidate:
    """Predicts ``intent_<version>`` (confidence 0.75) once the gate is open."""

    version: str
    gate: Gate
    timeout_s: float = 60.0

    def predict(self, text: str) -> Prediction:
        entered = self.gate.path / ENTERED
        if not entered.exists():
            self.gate.path.mkdir(parents=True, exist_ok=True)
            partial = entered.with_suffix(f".{os.getpid()}")
            partial.write_text(str(os.getpid()), encoding="utf-8")
            partial.replace(entered)
        deadline = time.monotonic() + self.timeout_s
        while not self.gate.is_open():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.gate.path}: never released")
            time.sleep(0.005)
        return Prediction(f"calendar_v{self.version}", 0.75)


@dataclass
class GatedLoader:
    """Builds a :class:`GatedCandidate` per version directory; refuses the versions in
    ``refuse`` as a corrupt model would be refused (``ModelLoadError``)."""

    gate: Gate
    refuse: frozenset[str] = field(default_factory=frozenset)

    def __call__(self, path: Path) -> GatedCandidate:
        if path.name in self.refuse:
            raise ModelLoadError(f"{path}/model.onnx: corrupt (refused by the test loader)")
        return GatedCandidate(path.name, self.gate)
