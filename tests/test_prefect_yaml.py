"""prefect.yaml: the structure `prefect deploy --all` reads, every entrypoint importable, every
default parameter valid for its flow, schedules with a time zone; `serve` builds the same set."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from deployments.serve import PREFECT_YAML, build_deployments, load_flow, read_specs, to_schedules

REQUIRED = {
    "review-export",
    "import-corrections",
    "training-data",
    "pairs",
    "retrain",
    "deploy",
    "rollback",
    "weekly-cycle",
    "retention",
    "monitor",
    "simulate",
    "ab-check",
}
SCHEDULED = {
    "review-export",
    "import-corrections",
    "weekly-cycle",
    "retention",
    "monitor",
    "ab-check",
}


@pytest.fixture(scope="module")
def raw() -> dict[str, object]:
    data = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_the_file_has_the_shape_prefect_deploy_reads(raw: dict[str, object]) -> None:
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(raw)
    names = [d.name for d in model.deployments]
    assert len(names) == len(set(names)) and set(names) == REQUIRED
    for deployment in model.deployments:
        assert deployment.work_pool is not None
        assert deployment.work_pool.name == "prompt-capture-pool"
        assert deployment.entrypoint and ":" in deployment.entrypoint
        assert (PREFECT_YAML.parent / deployment.entrypoint.split(":")[0]).is_file()


@pytest.mark.parametrize("spec", read_specs(), ids=lambda s: s.name)
def test_every_entrypoint_imports_and_its_parameters_validate(spec: object) -> None:
    from prefect import Flow

    flow = load_flow(spec.entrypoint)  # type: ignore[attr-defined]
    assert isinstance(flow, Flow)
    validated = flow.validate_parameters(dict(spec.parameters))  # type: ignore[attr-defined]
    for key, value in spec.parameters.items():  # type: ignore[attr-defined]
        assert validated[key] == value


def test_schedules_are_cron_with_a_time_zone_and_follow_the_weekly_rhythm() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    specs = {s.name: s for s in read_specs()}
    assert {name for name, s in specs.items() if s.schedules} == SCHEDULED
    for name in SCHEDULED:
        (schedule,) = to_schedules(specs[name])
        raw = specs[name].schedules[0]
        assert schedule.cron == raw["cron"] and schedule.active is True
        assert schedule.timezone == raw["timezone"] and ZoneInfo(schedule.timezone)
        # What `prefect deploy` builds from the same entry must be valid too.
        CronSchedule(cron=raw["cron"], timezone=raw["timezone"])
    review = specs["review-export"].schedules[0]["cron"].split()
    cycle = specs["weekly-cycle"].schedules[0]["cron"].split()
    # Weekly (one day of the week), and the cycle runs days after the review export.
    assert review[2:4] == ["*", "*"] and cycle[2:4] == ["*", "*"]
    assert int(cycle[4]) > int(review[4])
    assert specs["retention"].schedules[0]["cron"].split()[2:] == ["*", "*", "*"]  # daily
    assert specs["monitor"].schedules[0]["cron"].split()[1:] == ["*", "*", "*", "*"]  # hourly


def test_review_export_follows_the_code_default_strategy() -> None:
    from tasks.review_select import DEFAULT_STRATEGY

    review = next(s for s in read_specs() if s.name == "review-export")
    flow = load_flow(review.entrypoint)
    validated = flow.validate_parameters(dict(review.parameters))
    assert validated.get("strategy", DEFAULT_STRATEGY) == DEFAULT_STRATEGY
    assert flow.parameters.properties["strategy"]["default"] == DEFAULT_STRATEGY


def test_serve_builds_one_runner_deployment_per_entry() -> None:
    deployments = build_deployments(read_specs())
    # Named apart from what `prefect deploy --all` registers (tests/test_serve.py).
    assert {d.name for d in deployments} == {f"{name}-served" for name in REQUIRED}
    weekly = next(d for d in deployments if d.name == "weekly-cycle-served")
    assert weekly.parameters["deploy"] is True
    assert len(weekly.schedules) == 1


def test_bad_specs_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "prefect.yaml"
    path.write_text("deployments:\n  - name: x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"deployments\[0\]: field 'entrypoint'"):
        read_specs(path)
    with pytest.raises(ValueError, match=r"expected 'path/to/file\.py:flow_function'"):
        load_flow("flows/weekly.py")


REGISTRY_CHANGING = {"retrain", "deploy", "rollback", "weekly-cycle"}


def test_runs_that_change_the_registry_queue_one_at_a_time(raw: dict[str, object]) -> None:
    """A second run of a deployment that changes what serves waits for a slot (ENQUEUE), in
    what `prefect deploy` builds and in what `serve` builds; no other deployment is limited."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    model = PrefectYamlModel.model_validate(raw)
    limited = {d.name for d in model.deployments if d.concurrency_limit is not None}
    assert limited == REGISTRY_CHANGING
    for deployment in model.deployments:
        if deployment.name in REGISTRY_CHANGING:
            limit = deployment.concurrency_limit
            assert not isinstance(limit, int) and limit is not None
            assert (limit.limit, limit.collision_strategy) == (1, "ENQUEUE")
            assert ConcurrencyLimitConfig.model_validate(limit.model_dump()).collision_strategy == (
                ConcurrencyLimitStrategy.ENQUEUE
            )
    served = {d.name.removesuffix("-served"): d for d in build_deployments(read_specs())}
    for name, deployment in served.items():
        if name in REGISTRY_CHANGING:
            assert deployment.concurrency_limit == 1
            assert deployment.concurrency_options is not None
            assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
        else:
            assert deployment.concurrency_limit is None
