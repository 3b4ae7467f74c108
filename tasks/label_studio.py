"""Label Studio interchange: the review selection as Label Studio tasks, and a Label Studio
export read back as corrections.

**Export** (``prompt-capture export --mode review --format label-studio``;
:func:`write_label_studio_tasks`) writes two files:

- the tasks, a JSON list in Label Studio's task format (labelstud.io/guide/task_format), one per
  selected prompt, the prediction as a pre-annotation::

    {"data": {"text": "<prompt>", "log_id": "<uuid>", "predicted_intent": "scheduling",
              "created_at": "2025-10-25T10:00:00+00:00"},
     "predictions": [{"model_version": "v3", "score": 0.65,
                      "result": [{"from_name": "intent", "to_name": "text", "type": "choices",
                                  "value": {"choices": ["scheduling"]}}]}]}

- the labeling config next to it (``<tasks stem>.label-config.xml``, :func:`labeling_config`):
  ``<Text name="text" value="$text"/>``, a single-choice ``<Choices name="intent"
  toName="text">`` with one ``<Choice>`` per intent of the catalogue, and an optional
  ``<TextArea name="notes" toName="text">`` whose text becomes ``correction_notes``.

**Import** (``prompt-capture import-corrections FILE`` on Label Studio's JSON export;
:func:`is_label_studio_export`, :func:`label_studio_rows`): each task becomes one corrections
row ``{"id": data.log_id, "corrected_intent": <choice>, "notes": <notes>}`` that then meets the
corrections file's rules (``tasks.review_file`` parses it, ``tasks.corrections`` validates and
applies all or nothing). Per task:

- annotations with ``was_cancelled: true`` are ignored; a task with no annotation left (none, or
  all cancelled: a skipped task) is not applied and counted as skipped ("not reviewed");
- an annotation marked ``ground_truth: true`` settles the task (the latest of those wins);
- otherwise the latest annotation (``updated_at``, else ``created_at``, else its position) of
  each annotator (``completed_by``) counts; annotators who chose different intents are a
  conflict, reported on the task's row (nothing is chosen silently — the file is rejected);
- the intent is the single choice of the ``choices`` result named ``intent`` (or the only
  ``choices`` result); none, or several choices, is a problem of the row; ``notes`` is the text
  of a ``textarea`` result named ``notes``, joined by newlines.

Row numbers are the task's position in the file (1-based), as for a corrections file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from xml.sax.saxutils import quoteattr

from capture.files import write_text_atomic
from tasks.retry import io_task

if TYPE_CHECKING:
    from tasks.review_file import ReviewRow

logger = logging.getLogger(__name__)

__all__ = [
    "CHOICES_NAME",
    "CONFIG_SUFFIX",
    "FILE_FORMATS",
    "NOTES_NAME",
    "TEXT_NAME",
    "LabelStudioProblem",
    "config_path_for",
    "is_label_studio_export",
    "label_studio_rows",
    "label_studio_task",
    "labeling_config",
    "review_file_to_label_studio",
    "review_file_to_label_studio_task",
    "write_label_studio_tasks",
]

TEXT_NAME: Final = "text"
CHOICES_NAME: Final = "intent"
NOTES_NAME: Final = "notes"
CONFIG_SUFFIX: Final = ".label-config.xml"
#: The review export's file formats: the spec's review file, or Label Studio tasks.
FILE_FORMATS: Final = ("json", "label-studio")


@dataclass(frozen=True, slots=True)
class LabelStudioProblem:
    """Why one task of a Label Studio export cannot be applied (row: the task's 1-based
    position); ``tasks.review_file`` turns it into a ``RowProblem``."""

    row: int
    field: str
    message: str
    log_id: str | None = None


# --------------------------------------------------------------------------- export


def labeling_config(intents: Iterable[str]) -> str:
    """The Label Studio labeling config (XML) matching :func:`label_studio_task`: the prompt as
    ``text``, one single choice ``intent`` over ``intents`` (sorted, deduplicated) and a
    ``notes`` text area."""
    choices = "\n".join(
        f"    <Choice value={quoteattr(name)}/>" for name in sorted(set(intents)) if name
    )
    return (
        "<View>\n"
        f'  <Text name="{TEXT_NAME}" value="${TEXT_NAME}"/>\n'
        f'  <Choices name="{CHOICES_NAME}" toName="{TEXT_NAME}" choice="single" '
        'showInline="false">\n'
        f"{choices}\n"
        "  </Choices>\n"
        f'  <TextArea name="{NOTES_NAME}" toName="{TEXT_NAME}" rows="2" '
        'placeholder="notes (optional)" maxSubmissions="1"/>\n'
        "</View>\n"
    )


def label_studio_task(row: ReviewRow, *, model_version: str) -> dict[str, Any]:
    """One Label Studio task of a review row: ``data`` (text, log id, prediction, time) and the
    prediction as a ``predictions`` pre-annotation (``model_version``, ``score`` = confidence
    rounded to 4 decimals, a ``choices`` result)."""
    score = round(float(row.confidence), 4)
    return {
        "data": {
            TEXT_NAME: row.prompt,
            "log_id": row.id,
            "predicted_intent": row.predicted_intent,
            "confidence": score,
            "created_at": row.created_at,
        },
        "predictions": [
            {
                "model_version": model_version,
                "score": score,
                "result": [
                    {
                        "from_name": CHOICES_NAME,
                        "to_name": TEXT_NAME,
                        "type": "choices",
                        "value": {"choices": [row.predicted_intent]},
                    }
                ],
            }
        ],
    }


def config_path_for(tasks_path: Path) -> Path:
    """Where the labeling config of ``tasks_path`` goes: next to it, ``<stem>.label-config.xml``."""
    return tasks_path.with_name(tasks_path.stem + CONFIG_SUFFIX)


def write_label_studio_tasks(
    path: Path, rows: Sequence[ReviewRow], *, intents: Iterable[str], model_version: str
) -> Path:
    """Write the tasks (a private JSON list, indented by 2) to ``path`` and the labeling config
    (``intents`` plus every predicted intent) next to it; returns the config's path."""
    tasks = [label_studio_task(r, model_version=model_version) for r in rows]
    write_text_atomic(path, json.dumps(tasks, indent=2, ensure_ascii=False) + "\n", private=True)
    config = config_path_for(path)
    names = set(intents) | {r.predicted_intent for r in rows}
    write_text_atomic(config, labeling_config(names))
    logger.info("label studio: %d tasks to %s, labeling config %s", len(tasks), path, config)
    return config


def review_file_to_label_studio(
    path: Path, *, models_dir: Path | None, url: str | None = None
) -> Path:
    """Rewrite the review file at ``path`` (``tasks.review_file``'s format, as
    ``tasks.review_export`` wrote it) as Label Studio tasks, in place, and write the labeling
    config next to it; returns the config's path. ``model_version`` is the serving version under
    ``models_dir`` (``"unknown"`` when nothing is deployed); the choices are the catalogue of
    ``tasks.corrections.intent_catalog`` (the serving model's labels, else the database's
    intents). Raises ``ReviewFileError`` / ``InputFileError`` (``UserError``\\ s) for a file
    that is not a review file."""
    from capture.db import database_url, get_sync_engine
    from tasks.corrections import intent_catalog
    from tasks.registry import current_version
    from tasks.review_file import read_review_file

    rows = read_review_file(path)
    version = (current_version(models_dir) if models_dir is not None else None) or "unknown"
    with get_sync_engine(database_url(url)).connect() as conn:
        intents = intent_catalog(conn, models_dir)
    return write_label_studio_tasks(path, rows, intents=intents, model_version=version)


review_file_to_label_studio_task = io_task(
    review_file_to_label_studio, name="label-studio-tasks", retry_delay_seconds=1
)


# --------------------------------------------------------------------------- import


def is_label_studio_export(items: Sequence[object]) -> bool:
    """Whether decoded rows are Label Studio tasks: no row has the corrections file's
    ``corrected_intent`` and some row is an object with a ``data`` object and an
    ``annotations`` list (the other rows are then reported as tasks, by row)."""
    rows = [i for i in items if isinstance(i, dict)]
    return not any("corrected_intent" in i for i in rows) and any(
        isinstance(i.get("data"), dict) and isinstance(i.get("annotations"), list) for i in rows
    )


def _when(annotation: dict[str, Any]) -> datetime:
    for key in ("updated_at", "created_at"):
        value = annotation.get(key)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return datetime.min.replace(tzinfo=UTC)


def _latest(annotations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    # position breaks ties (the later in the list is the newer)
    return max(enumerate(annotations), key=lambda p: (_when(p[1]), p[0]))[1]


def _answer(annotation: dict[str, Any]) -> tuple[str | None, str, str]:
    """``(intent or None, notes, problem)`` of one annotation's ``result``."""
    result = annotation.get("result")
    if not isinstance(result, list):
        return None, "", "the annotation has no 'result' list"
    regions = [r for r in result if isinstance(r, dict)]
    choices = [r for r in regions if r.get("type") == "choices"]
    named = [r for r in choices if r.get("from_name") == CHOICES_NAME] or choices
    notes = "\n".join(
        t
        for r in regions
        if r.get("type") == "textarea" and r.get("from_name") == NOTES_NAME
        for t in (r.get("value") or {}).get("text") or []
        if isinstance(t, str) and t.strip()
    )
    if not named:
        return None, notes, f"the annotation chose no intent (no '{CHOICES_NAME}' choice)"
    picked = [c for r in named for c in ((r.get("value") or {}).get("choices") or [])]
    if len(picked) != 1 or not isinstance(picked[0], str):
        return None, notes, f"expected one chosen intent, found {picked!r}"
    return picked[0], notes, ""


def _task_row(
    row: int, task: dict[str, Any]
) -> tuple[dict[str, Any] | None, LabelStudioProblem | None]:
    """The corrections row of one task, None for a skipped task, or the task's problem."""
    log_id = task["data"].get("log_id")
    shown = str(log_id) if log_id is not None else None
    live = [a for a in task["annotations"] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not live:
        return None, None
    truth = [a for a in live if a.get("ground_truth") is True]
    if truth:
        chosen = [_latest(truth)]
    else:
        by_annotator: dict[str, list[dict[str, Any]]] = {}
        for a in live:
            by_annotator.setdefault(json.dumps(a.get("completed_by"), sort_keys=True), []).append(a)
        chosen = [_latest(group) for group in by_annotator.values()]
    answers = [_answer(a) for a in chosen]
    bad = [problem for _, _, problem in answers if problem]
    if bad:
        return None, LabelStudioProblem(row, "annotations", bad[0] + "; fix it or skip it", shown)
    intents = sorted({intent for intent, _, _ in answers if intent is not None})
    if len(intents) > 1:
        message = (
            f"annotators chose different intents ({', '.join(intents)}); settle it in Label "
            "Studio (mark one annotation ground truth, or cancel the others)"
        )
        return None, LabelStudioProblem(row, "annotations", message, shown)
    notes = "\n".join(dict.fromkeys(n for _, n, _ in answers if n))
    return {"id": log_id, "corrected_intent": intents[0], "notes": notes}, None


def label_studio_rows(
    items: Iterable[tuple[int, object]],
) -> tuple[list[tuple[int, dict[str, Any]]], int, list[LabelStudioProblem]]:
    """The corrections rows of numbered Label Studio tasks (see the module doc), the number of
    skipped tasks (no annotation that was not cancelled), and the problems by row."""
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[LabelStudioProblem] = []
    skipped = 0
    for row, task in items:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            problems.append(LabelStudioProblem(row, "data", "expected a Label Studio task"))
            continue
        if not isinstance(task.get("annotations"), list):
            problems.append(LabelStudioProblem(row, "annotations", "expected a list"))
            continue
        corrected, problem = _task_row(row, task)
        if problem is not None:
            problems.append(problem)
        elif corrected is None:
            skipped += 1
            logger.info("label studio task (row %d) skipped: no annotation", row)
        else:
            rows.append((row, corrected))
    return rows, skipped, problems
