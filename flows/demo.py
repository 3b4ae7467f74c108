"""``prompt-capture demo`` (``make demo``): the whole learning loop on the bundled demo dataset.

1. a fresh PROMPT_CAPTURE_HOME (a new sub-directory when the given one is in use), the SQLite
   database migrated;
2. the first model trained on the demo train split (the retrain flow with no champion), exported
   to ONNX and deployed as version 1;
3. the NLU service started with the hot-reloading ONNX classifier; a week of held-back prompts
   (the traffic split) sent through it; a wrong intent makes the (simulated) workflow fail;
4. the review set exported; a stand-in reviewer fills in the true labels; the file goes through
   the real corrections import (and a re-import shows it changes nothing);
5. the weekly cycle: training data, pairs, warm-started retrain, gate, ONNX export, deploy;
6. the running classifier hot-reloads; accuracy before and after on the test split (prompts
   neither model trained on), the gate decision and where the files are, printed.

Runs in Prefect's ephemeral mode, or against a server when PREFECT_API_URL is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from capture.settings import get_settings

logger = logging.getLogger(__name__)

DEMO_REVIEW_LIMIT = 300


class Printer(Protocol):
    def print(self, *objects: Any, **kwargs: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class DemoResult:
    home: Path
    accuracy_before: float
    accuracy_after: float
    version_before: str
    version_after: str
    promoted: bool
    card: str
    seconds: float


def _write_jsonl(path: Path, rows: Sequence[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows),
        encoding="utf-8",
    )


def fresh_home(requested: Path) -> Path:
    """``requested`` when it holds no models and no database yet, else a new sub-directory."""
    in_use = (requested / "models").exists() or (requested / "prompt_capture.db").exists()
    if not in_use:
        return requested
    return requested / f"demo-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"


def use_home(home: Path) -> None:
    """Point this process's settings at ``home`` with the SQLite default database."""
    os.environ["PROMPT_CAPTURE_HOME"] = str(home)
    os.environ["PROMPT_CAPTURE_DATABASE_URL"] = ""
    get_settings.cache_clear()


def accuracy(
    predict_batch: Callable[[list[str]], list[Any]], rows: Sequence[dict[str, str]]
) -> float:
    predictions = predict_batch([r["text"] for r in rows])
    hits = sum(p.intent == r["label"] for p, r in zip(predictions, rows, strict=True))
    return hits / len(rows)


def week_clock(n: int, now: datetime) -> Callable[[], datetime]:
    """A clock that spreads ``n`` calls evenly over the week before ``now``."""
    start = now - timedelta(days=7)
    step = timedelta(days=7) / max(n, 1)
    calls = iter(range(10**9))
    return lambda: start + step * next(calls)


async def send_traffic(
    classifier: Any, rows: Sequence[dict[str, str]], *, url: str, seed: int
) -> tuple[dict[str, str], int]:
    """Send ``rows`` through the NLU service; record a failed workflow for every wrong intent.
    Returns {log id: true label} and the number of failed workflows."""
    import random

    from capture.service import create_nlu_service

    rng = random.Random(seed)
    users = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(25)]
    truth: dict[str, str] = {}
    failed = 0
    service = create_nlu_service(
        classifier, url=url, clock=week_clock(len(rows), datetime.now(UTC))
    )
    async with service:
        for index, row in enumerate(rows):
            result = await service.process_message(
                row["text"],
                user_id=users[index % len(users)],
                conversation_id=uuid.UUID(int=rng.getrandbits(128)),
                message_index=0,
            )
            truth[str(result.log_id)] = row["label"]
            ok = result.intent == row["label"]
            failed += not ok
            await service.update_workflow_outcome(
                result.log_id,
                was_successful=ok,
                workflow_type=result.intent,
                execution_error=None if ok else "simulated: the user wanted another workflow",
            )
        await service.flush()
    return truth, failed


def review_as_reviewer(path: Path, truth: dict[str, str], inbox: Path) -> Path:
    """Fill ``corrected_intent`` of every row with the true label; drop the file in the inbox."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    for row in rows:
        row["corrected_intent"] = truth[row["id"]]
        if row["corrected_intent"] != row["predicted_intent"]:
            row["notes"] = "demo reviewer: true label from the dataset"
    inbox.mkdir(parents=True, exist_ok=True)
    target = inbox / path.name.replace("review-", "reviewed-")
    target.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return target


def wait_for_version(classifier: Any, version: str, timeout: float = 60.0) -> float:
    """Seconds until ``classifier.version`` becomes ``version`` (raises on timeout)."""
    started = time.monotonic()
    while str(classifier.version) != version:
        if time.monotonic() - started > timeout:
            raise TimeoutError(
                f"the classifier still serves {classifier.version} {timeout:.0f}s after "
                f"version {version} was deployed"
            )
        time.sleep(0.1)
    return time.monotonic() - started


def run_demo(
    out: Printer,
    *,
    first_steps: int = 30,
    retrain_steps: int = 20,
    seed: int = 0,
    home: Path | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring) and print what happened."""
    from capture import db
    from capture.classifier import HotReloadingClassifier
    from capture.demo_data import load_demo_dataset, split_demo_dataset
    from flows.common import base_file
    from flows.corrections import corrections_flow
    from flows.deploy import deploy_flow
    from flows.retrain import retrain_flow
    from flows.review import review_export_flow
    from flows.weekly import weekly_cycle
    from tasks.registry import list_models

    started = time.monotonic()
    demo_home = fresh_home((home or get_settings().home).resolve())
    use_home(demo_home)
    settings = get_settings()
    url = settings.resolved_database_url
    out.print(f"[bold]1. setup[/bold]: PROMPT_CAPTURE_HOME={demo_home}")
    db.upgrade(url)
    out.print(f"   database migrated: {url}")

    splits = split_demo_dataset(load_demo_dataset(), seed=seed)
    for kind, rows in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
        _write_jsonl(base_file(kind), rows)
    out.print(
        f"   demo dataset: train {len(splits.train)}, val {len(splits.val)}, "
        f"test {len(splits.test)}, traffic {len(splits.traffic)} (held back)"
    )

    hyper = {"seed": seed, "batch_size": 16, "min_steps": first_steps, "max_steps": first_steps}
    out.print(f"[bold]2. first model[/bold]: {first_steps} training steps on the train split")
    first = retrain_flow(
        str(base_file("train")), warm_start=False, hyperparameters=hyper, min_support=10
    )
    deployed = deploy_flow(first["version"])
    out.print(
        f"   version {first['version']} deployed ({deployed['export']['published']} ONNX, "
        f"agreement with torch {deployed['export']['agreement']:.1%})"
    )

    classifier = HotReloadingClassifier(settings.models_dir)
    try:
        acc_before = accuracy(classifier.predict_batch, splits.test)
        version_before = str(classifier.version)
        out.print(
            f"[bold]3. traffic[/bold]: {len(splits.traffic)} prompts through the NLU service "
            f"(model {version_before})"
        )
        truth, failed = asyncio.run(send_traffic(classifier, splits.traffic, url=url, seed=seed))
        out.print(f"   logged {len(truth)} prompts; {failed} workflows failed (wrong intent)")

        review = review_export_flow(days=7, limit=DEMO_REVIEW_LIMIT)
        out.print(
            f"[bold]4. review[/bold]: {review['selected']} of {review['candidates']} candidates "
            f"exported to {review['path']} ({review['reasons']})"
        )
        reviewed = review_as_reviewer(Path(review["path"]), truth, settings.inbox_dir)
        imported = corrections_flow()
        for item in imported:
            out.print(
                f"   imported {Path(item['file']).name}: applied {item['applied']}, "
                f"unchanged {item['unchanged']}, rejected {len(item['rejected'])}"
            )
        again = corrections_flow(file=str(settings.inbox_dir / "processed" / reviewed.name))
        out.print(
            f"   re-import of the same file: applied {again[0]['applied']}, "
            f"unchanged {again[0]['unchanged']} (idempotent)"
        )

        out.print(
            f"[bold]5. weekly cycle[/bold]: training data, pairs, retrain ({retrain_steps} "
            "steps, warm start), gate, ONNX export, deploy"
        )
        retrain_hyper = {**hyper, "min_steps": retrain_steps, "max_steps": retrain_steps}
        cycle = weekly_cycle(days=7, hyperparameters=retrain_hyper)
        result = cycle["retrain"]
        data = cycle["training_data"]
        out.print(
            f"   training data: {data['n_train']} rows {data['counts']}; "
            f"{data['n_holdout']} corrected prompts held out"
        )
        out.print(f"   gate: [bold]{result['verdict']}[/bold]")
        for reason in result["reasons"]:
            out.print(f"     - {reason}", highlight=False)
        if cycle["deployed"]:
            wait_for_version(classifier, result["version"])
            out.print(
                f"[bold]6. hot reload[/bold]: the running classifier switched from "
                f"{version_before} to {classifier.version} without a restart "
                f"(reloads: {classifier.reloads})"
            )
        else:
            out.print(f"[bold]6. no deploy[/bold]: version {version_before} keeps serving")
        acc_after = accuracy(classifier.predict_batch, splits.test)
        version_after = str(classifier.version)
    finally:
        close = getattr(classifier, "close", None)
        if close is not None:
            close()

    elapsed = time.monotonic() - started
    out.print(
        f"\n[bold]accuracy on the test split[/bold] ({len(splits.test)} prompts neither model "
        f"trained on): before {acc_before:.2%} (version {version_before}), after "
        f"{acc_after:.2%} (version {version_after}), change {acc_after - acc_before:+.2%}"
    )
    out.print(f"gate decision: {result['verdict']}; model card: {result['card']}")
    out.print(f"registry: {settings.models_dir}")
    for entry in list_models(settings.models_dir):
        out.print(
            f"  version {entry.version}: gate {entry.gate or '-'}"
            f"{', serving' if entry.serving else ''} — {entry.path}",
            highlight=False,
        )
    out.print(
        f"exports: {settings.exports_dir}; inbox: {settings.inbox_dir}; "
        f"database: {url}\nsee them with: PROMPT_CAPTURE_HOME={demo_home} prompt-capture models"
    )
    api = os.environ.get("PREFECT_API_URL")
    if api:
        out.print(f"flow runs, the model card and review artifacts are in the Prefect UI ({api})")
    else:
        out.print(
            "the flows ran in Prefect's ephemeral mode; to see them in the UI run "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    out.print(f"demo finished in {elapsed:.0f}s")
    return DemoResult(
        home=demo_home,
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        version_before=version_before,
        version_after=version_after,
        promoted=bool(result["promote"]),
        card=result["card"],
        seconds=elapsed,
    )
