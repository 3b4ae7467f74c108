"""Deterministic monitoring data for the report tests and scripts/check_report.sh.

``python -m tests.report_data HOME`` migrates an SQLite database under HOME, fills it with two
weeks of synthetic traffic and writes a three-version model registry, so the report has
something to draw.
"""

from __future__ import annotations

import json
import random
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, insert

from capture import db
from capture.ids import uuid7
from capture.model_dir import ModelMetadata
from capture.models import PromptLog
from capture.values import as_real

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
INTENTS = {
    # intent: (weight, mean confidence, success probability, correction probability)
    "book_meeting": (30, 0.92, 0.95, 0.02),
    "cancel_meeting": (14, 0.88, 0.9, 0.04),
    "check_weather": (22, 0.95, 0.98, 0.01),
    "set_reminder": (18, 0.85, 0.88, 0.05),
    "transfer_money": (8, 0.7, 0.6, 0.2),
    "oos": (8, 0.45, 0.5, 0.15),
}


def synthetic_logs(
    n: int, *, now: datetime = NOW, days: int = 14, seed: int = 0
) -> list[dict[str, Any]]:
    """``n`` prompt-log rows spread over the ``days`` days before ``now``."""
    rng = random.Random(seed)
    names = list(INTENTS)
    weights = [INTENTS[k][0] for k in names]
    rows = []
    for i in range(n):
        intent = rng.choices(names, weights)[0]
        _, mean, p_success, p_correct = INTENTS[intent]
        # Confidence drifts down over the last days for one intent, so the daily plot moves.
        created = now - timedelta(seconds=rng.uniform(0, days * 86_400))
        drift = 0.15 if intent == "set_reminder" and (now - created).days < 4 else 0.0
        confidence = min(1.0, max(0.0, rng.gauss(mean - drift, 0.1)))
        outcome = None if rng.random() < 0.2 else rng.random() < p_success
        corrected = rng.choice(names) if rng.random() < p_correct else None
        rows.append(
            {
                "id": uuid7(),
                "user_id": uuid.UUID(int=rng.getrandbits(128)),
                "prompt": f"synthetic prompt {i}",
                "predicted_intent": intent,
                "confidence": as_real(confidence),
                "corrected_intent": corrected,
                "was_successful": outcome,
                "workflow_type": intent,
                "model_version": "2" if (now - created).days >= 5 else "3",
                "created_at": created,
                "updated_at": created,
            }
        )
    return rows


def insert_logs(url: str, rows: list[dict[str, Any]]) -> None:
    with db.get_sync_engine(url).begin() as conn:
        conn.execute(insert(cast(Table, PromptLog.__table__)), rows)


def write_registry(models_dir: Path, *, now: datetime = NOW) -> None:
    """Three versions a week apart; v3 serves, v2 was rejected by the gate."""
    versions = [("1", 0.842, 0.81, None), ("2", 0.835, 0.80, False), ("3", 0.887, 0.86, True)]
    for k, (version, accuracy, f1, promote) in enumerate(versions):
        path = models_dir / version
        path.mkdir(parents=True, exist_ok=True)
        created = now - timedelta(days=7 * (len(versions) - k))
        ModelMetadata(
            version=version,
            labels=tuple(INTENTS),
            oos_label="oos",
            oos_threshold=None,
            temperature=1.0,
            base_model="all-MiniLM-L6-v2",
            parent_version=None if k == 0 else versions[k - 1][0],
            created_at=created.isoformat(),
            hyperparameters={},
            metrics={},
            max_seq_length=48,
            embedding_dim=384,
        ).write(path)
        metrics = {"evaluation": {"all": {"challenger": {"accuracy": accuracy, "macro_f1": f1}}}}
        (path / "metrics.json").write_text(json.dumps(metrics))
        if promote is not None:
            (path / "gate.json").write_text(json.dumps({"promote": promote}))
    (models_dir / "current").write_text("3\n")


def main(argv: list[str]) -> None:
    home = Path(argv[1])
    url = f"sqlite:///{(home / 'prompt_capture.db').resolve()}"
    db.upgrade(url)
    insert_logs(url, synthetic_logs(3_000))
    write_registry(home / "models")


if __name__ == "__main__":
    main(sys.argv)
