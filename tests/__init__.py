"""The test suite. ``REPO`` is the checkout; ``SHARED_DATASETS`` the public datasets beside it;
``run_cli`` runs the installed ``prompt-capture`` command as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
CLI = str(Path(sys.executable).with_name("prompt-capture"))


def run_cli(
    *args: str, env: dict[str, str], cwd: Path, timeout: float | None = 600
) -> subprocess.CompletedProcess[str]:
    """``prompt-capture ARGS`` in a process of its own, its output captured as text; the exit
    code is the caller's to check."""
    return subprocess.run(
        [CLI, *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
