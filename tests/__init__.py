"""The test suite. ``REPO`` is the checkout; ``SHARED_DATASETS`` the public datasets beside it."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
