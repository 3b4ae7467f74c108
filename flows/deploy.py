"""Deploy and rollback flows: ONNX export of a registry version and the atomic ``current`` switch.

A running ``HotReloadingClassifier`` watches ``models_dir/current`` and swaps models between
requests, so deploying or rolling back needs no restart. Both publish the card of the model
that serves afterwards under the artifact key ``serving-model-card``.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.entry import open_run
from tasks.deploy import (
    SERVING_CARD_KEY,
    DeployResult,
    choose_version,
    export_for_serving,
    serving_card_markdown,
)
from tasks.registry import (
    deploy_task,
    is_deployable,
    registry_lock,
    rollback_task,
    version_dir,
)


@flow(name="deploy")
def deploy_flow(
    version: str | None = None,
    *,
    quantize: bool = True,
    validation_data: str | None = None,
    allow_rejected: bool = False,
    home: str | None = None,
) -> DeployResult:
    """Export ``version`` (default: the newest one the gate did not reject) to ONNX when needed
    (with its fast path when the settings turn it on) and make it the serving version.
    ``validation_data`` (default ``home/data/base_val.jsonl``) holds the texts of the int8
    parity check; ``home`` defaults to PROMPT_CAPTURE_HOME. Holds the registry lock from
    choosing the version to the switch."""
    run_logger = get_run_logger()
    run = open_run(home)
    run.require_registry()  # never a new, empty registry in a home nobody set up
    layout = run.layout
    # Held from choosing the version to the switch (re-entered inside the weekly cycle).
    with registry_lock(layout.models_dir):
        target = choose_version(layout.models_dir, version, allow_rejected=allow_rejected)
        export = None
        if not is_deployable(target):
            validation = layout.optional_file(validation_data, "val")
            export = export_for_serving(
                target, quantize=quantize, validation_data=validation, settings=run.settings
            )
            run_logger.info(
                "exported version %s to ONNX (%s, agreement %.4f)",
                target.name,
                export.published,
                export.agreement,
            )
        previous = deploy_task(layout.models_dir, target.name)
    run_logger.info("now serving version %s (was %s)", target.name, previous)
    result = DeployResult(version=target.name, previous=previous, model_dir=target, export=export)
    publish_serving_card(result, action="deploy")
    return result


@flow(name="rollback")
def rollback_flow(to: str | None = None, home: str | None = None) -> DeployResult:
    """Serve ``to`` (default: the newest deployable, not rejected version older than the
    current one); ``home`` defaults to PROMPT_CAPTURE_HOME. ``tasks.registry.rollback`` holds
    the registry lock."""
    run = open_run(home)
    run.require_registry()  # never a new, empty registry in a home nobody set up
    layout = run.layout
    previous, now = rollback_task(layout.models_dir, to)
    get_run_logger().info("rolled back from version %s to %s", previous, now)
    result = DeployResult(
        version=now, previous=previous, model_dir=version_dir(layout.models_dir, now)
    )
    publish_serving_card(result, action="rollback")
    return result


def publish_serving_card(result: DeployResult, *, action: str) -> None:
    """The serving model's card as the ``serving-model-card`` artifact (one key: its history is
    the history of what served)."""
    create_markdown_artifact(
        key=SERVING_CARD_KEY,
        markdown=serving_card_markdown(result, action=action),
        description=f"version {result.version} serves ({action}; before: {result.previous})",
    )
