"""Child processes that a test releases together through a file barrier.

The test starts each child as ``python -m MODULE RUN_DIR NAME ARGS...`` (``Children.start``;
tests/monitor_child.py, tests/registry_child.py). A child imports what it needs, then calls
``wait_for_go``: it writes ``RUN_DIR/ready-<NAME>`` and waits for ``RUN_DIR/go``, which the test
writes once every child is ready (``Children.release``). A child's output goes to
``RUN_DIR/<NAME>.log`` and its result to ``RUN_DIR/<NAME>.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests import REPO


def wait_for_go(run_dir: Path, name: str) -> None:
    """The child's side of the barrier: say it is ready, then wait for the test's go."""
    (run_dir / f"ready-{name}").write_text(str(os.getpid()), encoding="utf-8")
    deadline = time.monotonic() + 300
    while not (run_dir / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}: no go signal")
        time.sleep(0.01)


class Children:
    """The test's side: child processes of ``python -m MODULE`` in ``run_dir``."""

    def __init__(self, module: str, run_dir: Path, env: dict[str, str] | None = None) -> None:
        self.module = module
        self.run_dir = run_dir
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        run_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: object) -> None:
        """Start child ``name``: ``python -m MODULE RUN_DIR NAME ARGS...``."""
        log = (self.run_dir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", self.module, str(self.run_dir), name, *map(str, args)],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def release(self, timeout: float = 300) -> None:
        """Wait until every child is at the barrier, then let them all go at once."""
        deadline = time.monotonic() + timeout
        while not all((self.run_dir / f"ready-{n}").exists() for n in self.procs):
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} died before the barrier:\n{self.log(name)}"
            assert time.monotonic() < deadline, "children never reached the barrier"
            time.sleep(0.02)
        (self.run_dir / "go").write_text("go", encoding="utf-8")

    def wait(self, timeout: float = 600) -> None:
        for name, proc in self.procs.items():
            code = proc.wait(timeout=timeout)
            assert code == 0, f"{name} exited {code}:\n{self.log(name)}"

    def run(self, timeout: float = 300) -> dict[str, Any]:
        """Release the children and wait for them (any left running on a failure are killed);
        their results by name."""
        try:
            self.release(timeout)
            self.wait(timeout)
        finally:
            self.kill()
        return {name: self.result(name) for name in self.procs}

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def log(self, name: str) -> str:
        return (self.run_dir / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def result(self, name: str) -> Any:
        return json.loads((self.run_dir / f"{name}.json").read_text(encoding="utf-8"))
