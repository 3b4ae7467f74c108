"""`prompt-capture serve` beside `prefect deploy --all` on one Prefect server (the test harness).

The worker setup's deployments (work pool, pull step, schedule) must come out of a serve
session untouched: serve registers its own `-served` deployments, refuses a name a worker
deployment holds, and when it stops (Ctrl-C) pauses only what it registered.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.serve import (
    PREFECT_YAML,
    REPO_ROOT,
    SERVED_SUFFIX,
    SERVED_TAG,
    ServeConflictError,
    check_deployments_free,
    prepare_served,
    served_name,
)
from tests import run_cli

pytestmark = pytest.mark.usefixtures("prefect_harness")

POOL = "prompt-capture-pool"
PULL_STEP = {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}


def worker_deployment(flow_name: str, name: str, entrypoint: str, cron: str) -> Any:
    """A deployment as `prefect deploy` makes it: work pool, pull step, active cron schedule."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
    from prefect.client.schemas.schedules import CronSchedule

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
        client.create_deployment(
            flow_id=client.create_flow_from_name(flow_name),
            name=name,
            work_pool_name=POOL,
            work_queue_name="default",
            entrypoint=entrypoint,
            pull_steps=[PULL_STEP],
            schedules=[
                DeploymentScheduleCreate(
                    schedule=CronSchedule(cron=cron, timezone="Europe/London"), active=True
                )
            ],
        )
        return client.read_deployment_by_name(f"{flow_name}/{name}")


def read(full_name: str) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(full_name)


def serve_then_stop(deployments: list[Any]) -> None:
    """What `serve` does with its deployments, up to Ctrl-C: register them with a runner that
    pauses on shutdown, then shut it down."""
    from prefect.runner import Runner

    async def session() -> None:
        async with Runner(pause_on_shutdown=True) as runner:
            for deployment in deployments:
                await runner.aadd_deployment(deployment)

    asyncio.run(session())


def test_serve_leaves_the_worker_deployments_alone() -> None:
    before = worker_deployment(
        "weekly-cycle", "weekly-cycle", "flows/weekly.py:weekly_cycle", "0 2 * * 4"
    )
    served = prepare_served(only=["weekly-cycle", "monitor"])
    assert {d.name for d in served} == {"weekly-cycle-served", "monitor-served"}
    assert all(SERVED_TAG in d.tags for d in served)
    # The worker's weekly cycle is scheduled: serve says both would run it (and logs it).
    (warning,) = check_deployments_free(served)
    assert warning.startswith("weekly-cycle/weekly-cycle (work pool prompt-capture-pool)")
    assert "both run weekly-cycle on schedule" in warning

    serve_then_stop(served)

    after = read("weekly-cycle/weekly-cycle")
    assert after.id == before.id
    assert after.pull_steps == [PULL_STEP]
    assert after.work_pool_name == POOL
    assert after.paused is False
    assert [s.active for s in after.schedules] == [True]
    assert after.schedules[0].schedule.cron == "0 2 * * 4"
    # serve's own deployments were registered without a work pool and paused on shutdown.
    for name in ("weekly-cycle/weekly-cycle-served", "monitor/monitor-served"):
        mine = read(name)
        assert mine.work_pool_name is None and not mine.pull_steps
        assert mine.paused is True
    # A second serve session takes its own deployments over again.
    assert {d.name for d in prepare_served(only=["monitor"])} == {"monitor-served"}


def test_serve_refuses_a_served_name_that_a_worker_deployment_holds(tmp_path: Path) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    entry = {
        "name": name,
        "entrypoint": "flows/retention.py:retention_flow",
        "parameters": {"retention_days": 90},
        "schedules": [{"cron": "30 3 * * *", "timezone": "Europe/London", "active": True}],
    }
    spec_file = tmp_path / "prefect.yaml"
    spec_file.write_text(yaml.safe_dump({"deployments": [entry]}), encoding="utf-8")
    taken = worker_deployment(
        "retention", served_name(name), "flows/retention.py:retention_flow", "30 3 * * *"
    )
    with pytest.raises(ServeConflictError) as refused:
        prepare_served(spec_file)
    message = str(refused.value)
    assert f"retention/{name}{SERVED_SUFFIX}" in message
    assert "work pool prompt-capture-pool" in message and "1 pull step" in message
    assert "prefect deployment delete" in message
    untouched = read(f"retention/{served_name(name)}")
    assert untouched.updated == taken.updated and untouched.pull_steps == [PULL_STEP]


def test_the_serve_command_refuses_in_one_line(tmp_path: Path) -> None:
    """The CLI path: a `-served` name held by a worker deployment -> one line, exit 2."""
    from prefect.settings import PREFECT_API_URL

    worker_deployment(
        "review-export", "review-export-served", "flows/review.py:review_export_flow", "0 6 * * 1"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPT_CAPTURE_")}
    env |= {"PREFECT_API_URL": str(PREFECT_API_URL.value()), "PROMPT_CAPTURE_HOME": str(tmp_path)}
    done = run_cli("serve", "--only", "review-export", env=env, cwd=tmp_path, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: deployment review-export/"), lines
    assert "Traceback" not in done.stderr + done.stdout
    assert PREFECT_YAML.is_file()
