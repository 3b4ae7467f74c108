"""The deploy steps: which registry version to serve, its ONNX export (recorded in
``metrics.json``), the typed result of a deploy or a rollback, and the serving model's card as
the operators find it in the Prefect UI (artifact key :data:`SERVING_CARD_KEY`).

The pointer switch itself is ``tasks.registry.deploy`` / ``rollback`` (atomic; a running
``HotReloadingClassifier`` follows it between requests, so nothing restarts).
:func:`switch_serving` is the one entry point of ``prompt-capture deploy VERSION`` and
``prompt-capture rollback [--to VERSION]``: the candidate rule (a deploy is refused while an A/B
candidate is under test, unless forced) and the switch, under one hold of the registry lock.
:func:`export_model` is the one export entry point (``prompt-capture export-onnx``; the deploy
and stage-candidate flows through :func:`export_for_serving`, its steps as Prefect task runs):
the ONNX export, then the fast path when the settings turn it on. An export removes the fast path
fitted to the ``model.onnx`` it replaces (``tasks.export_onnx``), so a directory never serves a
fast path of another model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE

from capture.model_dir import MODEL_FILE, ModelDirError
from capture.pointers import CandidatePointer, read_candidate
from tasks.ab_candidate import clear_candidate
from tasks.export_onnx import ExportReport, export_onnx
from tasks.fast_path import METRICS_KEY as FAST_PATH_KEY
from tasks.fast_path import FastPathReport, fast_path_for_serving
from tasks.json_values import json_fields
from tasks.records import load_records
from tasks.registry import (
    DEFAULT_LOCK_TIMEOUT_S,
    RegistryError,
    current_version,
    deploy,
    gate_status,
    registry_lock,
    require_registry_dir,
    rollback,
    version_dir,
    versions,
)
from tasks.retrain import CARD_FILE, record_metrics

if TYPE_CHECKING:
    from capture.settings import Settings

logger = logging.getLogger(__name__)

EXPORT_KEY = "export"  # where metrics.json records the export report
#: The artifact key of the card of the model that serves now (a new version of it on every
#: deploy and rollback; the challengers' cards are under ``model-card``).
SERVING_CARD_KEY = "serving-model-card"


def latest_promotable(models_dir: Path) -> str | None:
    """The newest version the gate did not reject (None when the registry is empty)."""
    candidates = [v for v in versions(models_dir) if gate_status(models_dir / v) != "rejected"]
    return candidates[-1] if candidates else None


def pick_version(
    models_dir: Path,
    version: str | None,
    *,
    allow_rejected: bool,
    rejected_fix: str = "pass allow_rejected=True to deploy it anyway",
) -> Path:
    """The directory of ``version`` (default: :func:`latest_promotable`) after checking it may
    be deployed. Raises :class:`tasks.registry.RegistryError` when there is nothing to deploy,
    the version is not in the registry, or the gate rejected it and ``allow_rejected`` is
    false (the message ends with ``rejected_fix``)."""
    chosen = version or latest_promotable(models_dir)
    if chosen is None:
        raise RegistryError(f"nothing to deploy: the registry at {models_dir} has no version")
    target = version_dir(models_dir, chosen)
    if not target.is_dir():
        raise RegistryError(
            f"version {chosen} is not in the registry at {models_dir}; see `prompt-capture "
            "models` for the versions there"
        )
    if gate_status(target) == "rejected" and not allow_rejected:
        raise RegistryError(
            f"version {chosen} was rejected by the gate (see {target / CARD_FILE}); {rejected_fix}"
        )
    return target


#: :func:`pick_version` as the flows' Prefect task.
choose_version = task(cache_policy=NO_CACHE, name="choose-version")(pick_version)


def registry_of(model_dir: Path, models_dir: Path | None) -> Path | None:
    """``models_dir`` when ``model_dir`` is one of its version directories, else None."""
    if models_dir is None:
        return None
    inside = Path(model_dir).resolve().parent == Path(models_dir).resolve()
    return Path(models_dir) if inside and Path(model_dir).name.isdigit() else None


@dataclass(frozen=True, slots=True)
class ModelExport:
    """What :func:`export_model` wrote: the ONNX export, and the fast path built beside it
    (None when the settings' fast path is off)."""

    onnx: ExportReport
    fast_path: FastPathReport | None = None


def export_model(
    model_dir: Path,
    *,
    quantize: bool = True,
    validation_data: Path | None = None,
    models_dir: Path | None = None,
    settings: Settings | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> ModelExport:
    """Write ``model.onnx`` + ``tokenizer.json`` into ``model_dir``
    (:func:`tasks.export_onnx.export_onnx`: int8 when ``quantize`` and its parity gate pass,
    else fp32; the texts of ``validation_data`` are the parity check's, default a built-in set)
    and record the report under ``export`` in its ``metrics.json``; then, when ``settings``
    turn the fast path on, build it beside the export as the deploy flow does
    (``tasks.fast_path.fast_path_for_serving``). A fast path fitted to the previous
    ``model.onnx`` is removed either way.

    When ``model_dir`` is a version of the registry ``models_dir``, all of it holds the
    registry lock (it never races a deploy exporting the same version), and a version that
    serves or is under test keeps its ``model.onnx``: replacing the file that serves is a
    :class:`tasks.registry.RegistryError` naming the other ways. Raises
    ``tasks.export_onnx.ExportError`` when the directory cannot be exported.
    """
    model_dir = Path(model_dir)
    registry = registry_of(model_dir, models_dir)
    if registry is None:
        return _export_serving_files(model_dir, quantize, validation_data, settings)
    with registry_lock(registry, timeout=lock_timeout):
        _refuse_replacing_what_serves(registry, model_dir)
        return _export_serving_files(model_dir, quantize, validation_data, settings)


def export_for_serving(
    model_dir: Path,
    *,
    quantize: bool,
    validation_data: Path | None,
    settings: Settings,
) -> ExportReport:
    """:func:`export_model` for a registry version the calling flow chose under the registry
    lock, as the flow's task runs: ``export-onnx``, then ``build-fast-path`` when ``settings``
    turn the fast path on; ``validation_data`` holds the texts of the parity check (and of the
    fast path's threshold)."""
    return _export_serving_files(model_dir, quantize, validation_data, settings, in_flow=True).onnx


def _export_serving_files(
    model_dir: Path,
    quantize: bool,
    validation_data: Path | None,
    settings: Settings | None,
    *,
    in_flow: bool = False,
) -> ModelExport:
    """The export's two steps: Prefect task runs of the calling flow (``in_flow``), else plain
    calls (the CLI runs no flow)."""
    export: Callable[..., ExportReport] = export_onnx_task if in_flow else export_onnx_task.fn
    build: Callable[..., FastPathReport | None] = (
        fast_path_for_serving if in_flow else fast_path_for_serving.fn
    )
    report = export(model_dir, quantize=quantize, validation_data=validation_data)
    fast = None
    if settings is not None and settings.fast_path:
        fast = build(model_dir, settings=settings, validation_data=validation_data)
    return ModelExport(report, fast)


def _refuse_replacing_what_serves(models_dir: Path, model_dir: Path) -> None:
    if not (model_dir / MODEL_FILE).exists():
        return
    candidate = read_candidate(models_dir)
    for role, version in (
        ("serves", current_version(models_dir)),
        ("is under test", None if candidate is None else candidate.version),
    ):
        if version == model_dir.name:
            raise RegistryError(
                f"version {version} {role} from {model_dir / MODEL_FILE}: exporting it again "
                "would change what serves without a deploy; deploy (or stop testing) another "
                "version first, or export a copy of the directory"
            )


@task(cache_policy=NO_CACHE, name="export-onnx")
def export_onnx_task(
    model_dir: Path, *, quantize: bool, validation_data: Path | None
) -> ExportReport:
    """:func:`tasks.export_onnx.export_onnx` with the texts of ``validation_data`` (None: the
    built-in set) as the parity check's, its report recorded under ``export`` in
    ``metrics.json``; when it removed the fast path fitted to the previous ``model.onnx``, that
    is recorded under ``fast_path``."""
    texts = (
        [r.text for r in load_records(validation_data, min_labels=1)] if validation_data else None
    )
    report = export_onnx(model_dir, quantize=quantize, validation_texts=texts)
    record_metrics(model_dir, EXPORT_KEY, report.to_dict())
    if report.fast_path_removed:
        record_metrics(
            model_dir,
            FAST_PATH_KEY,
            {"published": False, "reason": "removed: fitted to the model.onnx it replaced"},
        )
    return report


@dataclass(frozen=True, slots=True)
class DeployResult:
    """A serving switch: ``version`` serves now, ``previous`` served before (None: nothing).
    ``export`` is the ONNX export this deploy made (None when the version had one already, and
    for a rollback)."""

    version: str
    previous: str | None
    model_dir: Path
    export: ExportReport | None = None
    #: The A/B candidate the switch ended (it is the version that serves now), if any.
    candidate_cleared: str | None = None
    #: The A/B candidate that stays under test beside the new champion (a forced deploy).
    candidate_kept: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The result as JSON-able values (``prompt-capture cycle --json``)."""
        return json_fields(self)


def serving_card_markdown(result: DeployResult, *, action: str, now: datetime | None = None) -> str:
    """The markdown of the :data:`SERVING_CARD_KEY` artifact after a deploy or a rollback
    (``action``): which version serves since when, what served before, then the version's
    model card (``card.md``; a line saying there is none for a version trained outside the
    retrain flow)."""
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M:%S UTC")
    card_path = result.model_dir / CARD_FILE
    card = (
        card_path.read_text(encoding="utf-8")
        if card_path.is_file()
        else f"_Version {result.version} has no model card ({card_path} does not exist)._\n"
    )
    return (
        f"# Serving: version {result.version}\n\n"
        f"Since {when} ({action}; before: {result.previous or 'nothing'}). "
        f"Model directory: `{result.model_dir}`.\n\n---\n\n{card}"
    )


SwitchAction = Literal["deploy", "rollback"]


def _candidate_under_test(models_dir: Path, action: SwitchAction) -> CandidatePointer | None:
    """The candidate pointer; a malformed one refuses a deploy (the message names the file and
    the fix) but never blocks a rollback, as it never serves (``capture.ab_routing``)."""
    try:
        return read_candidate(models_dir)
    except ModelDirError as exc:
        if action == "deploy":
            raise
        logger.warning("rolling back despite a malformed candidate pointer: %s", exc)
        return None


def switch_serving(
    models_dir: Path,
    version: str | None,
    *,
    action: SwitchAction,
    force: bool = False,
    allow_rejected: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT_S,
) -> DeployResult:
    """Make a registry version the serving one, under one hold of the registry lock:
    ``prompt-capture deploy VERSION`` (``action="deploy"``) and ``rollback [--to VERSION]``
    (``action="rollback"``; ``version`` None: the previous deployable one).

    - deploy: ``version`` must be exported (``model.onnx``; the fix named is ``prompt-capture
      export-onnx``) and not rejected by the gate unless ``allow_rejected``. While an A/B
      candidate is under test (``models_dir/candidate``) it is refused unless ``force``: the
      A/B check decides that test. Deploying the version that already serves changes nothing.
    - rollback: allowed while a candidate is under test (it is the emergency switch).
    - either way, when the new serving version is the candidate, the candidate pointer is
      cleared in the same hold (``candidate-promote`` for a deploy, ``candidate-clear`` for a
      rollback, in ``history.jsonl``): a version cannot be champion and candidate at once.

    Raises ``tasks.registry.RegistryError`` (the message names the fix), ``NoRegistryError``
    when ``models_dir`` does not exist (never created here) or ``RegistryBusyError``.
    """
    require_registry_dir(models_dir, action)  # never a new, empty registry
    with registry_lock(models_dir, timeout=lock_timeout):
        under_test = _candidate_under_test(models_dir, action)
        if action == "rollback":
            previous, now = rollback(models_dir, version, lock_timeout=lock_timeout)
        else:
            if version is None:
                raise RegistryError(
                    "deploy: name the version to serve (see `prompt-capture models`)"
                )
            target = pick_version(
                models_dir,
                version,
                allow_rejected=allow_rejected,
                rejected_fix="pass --allow-rejected to deploy it anyway",
            )
            now = target.name
            previous = current_version(models_dir)
            if previous == now:
                logger.info("version %s serves already; nothing changed", now)
                return DeployResult(version=now, previous=previous, model_dir=target)
            if under_test is not None and not force:
                raise RegistryError(
                    f"version {under_test.version} is under test as the {under_test.mode} "
                    f"candidate ({models_dir / 'candidate'}), so nothing else is deployed: let "
                    "the A/B check decide (`prompt-capture ab`), stop the test "
                    "(`prompt-capture candidate clear`), or pass --force"
                )
            previous = deploy(models_dir, now, lock_timeout=lock_timeout)
        cleared = kept = None
        if under_test is not None and under_test.version == now:
            clear_candidate(
                models_dir,
                action="candidate-promote" if action == "deploy" else "candidate-clear",
                reason=f"version {now} serves after a {action}",
                lock_timeout=lock_timeout,
            )
            cleared = now
        elif under_test is not None:
            kept = under_test.version
            logger.warning(
                "candidate %s stays under test (%s), now beside version %s",
                kept,
                under_test.mode,
                now,
            )
    return DeployResult(
        version=now,
        previous=previous,
        model_dir=version_dir(models_dir, now),
        candidate_cleared=cleared,
        candidate_kept=kept,
    )
