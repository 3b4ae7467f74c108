"""prefect.yaml: the structure `prefect deploy --all` reads, every entrypoint importable, every
default parameter valid for its flow, schedules with a time zone; `serve` builds the same set;
the build and pull steps that give a worker anywhere the deployed commit's code; `retrain` on
its own (GPU) work pool."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
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
GPU_POOL = "prompt-capture-gpu"
REPO_VARIABLE = "prompt_capture_repo"
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
        # Training where the GPU is: only `retrain` has a pool of its own.
        expected = GPU_POOL if deployment.name == "retrain" else "prompt-capture-pool"
        assert deployment.work_pool.name == expected
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


def test_retrain_targets_the_gpu_pool_and_names_its_device(raw: dict[str, object]) -> None:
    """`retrain` runs on workers of its own pool and passes TrainConfig.device (auto: CUDA when
    available); everything else, the weekly cycle included, stays on the default pool."""
    from tasks.retrain import train_config

    specs = {s.name: s for s in read_specs()}
    hyperparameters = specs["retrain"].parameters["hyperparameters"]
    assert hyperparameters == {"device": "auto"}
    assert train_config(hyperparameters).device == "auto"  # a name TrainConfig knows
    pools = {d["name"]: d["work_pool"]["name"] for d in raw["deployments"]}  # type: ignore[attr-defined]
    assert {name for name, pool in pools.items() if pool == GPU_POOL} == {"retrain"}


def steps_named(raw: dict[str, object], section: str) -> list[tuple[str, dict[str, Any]]]:
    steps = raw[section]
    assert isinstance(steps, list)
    out = []
    for step in steps:
        ((name, args),) = step.items()
        out.append((name, args))
    return out


def test_a_worker_clones_the_repository_variable_at_the_deployed_commit(
    raw: dict[str, object],
) -> None:
    """The build step records the commit; the one pull step clones the repository named by the
    Prefect variable at that commit. No deployment overrides the pull section."""
    (build,) = steps_named(raw, "build")
    assert build[0] == "prefect.deployments.steps.run_shell_script"
    assert build[1]["script"] == "git rev-parse HEAD" and build[1]["stream_output"] is False
    (pull,) = steps_named(raw, "pull")
    assert pull[0] == "prefect.deployments.steps.git_clone"
    assert pull[1]["repository"] == "{{ prefect.variables." + REPO_VARIABLE + " }}"
    assert pull[1]["commit_sha"] == "{{ " + build[1]["id"] + ".stdout }}"
    for deployment in raw["deployments"]:  # type: ignore[attr-defined]
        assert "pull" not in deployment and "build" not in deployment


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


@pytest.fixture
def repo_variable(prefect_harness: None) -> Iterator[str]:
    from prefect.variables import Variable

    yield REPO_VARIABLE
    Variable.unset(REPO_VARIABLE)


def test_the_build_and_pull_steps_deliver_the_deployed_commit(
    raw: dict[str, object], tmp_path: Path, repo_variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `prefect deploy` and then a worker do with the steps, on a real (bare) repository:
    the build step run in the checkout yields HEAD, `prefect deploy` fills it into the pull
    step and keeps the variable for the run, and the run clones exactly that commit (a later
    commit on the branch is not what it gets)."""
    from prefect.deployments.steps.core import run_steps
    from prefect.utilities.templating import apply_values
    from prefect.variables import Variable

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    git(checkout, "init", "-q", "-b", "main")
    (checkout / "flows").mkdir()
    (checkout / "flows" / "weekly.py").write_text("VERSION = 1\n", encoding="utf-8")
    git(checkout, "add", "-A")
    git(checkout, "commit", "-q", "-m", "one")
    deployed = git(checkout, "rev-parse", "HEAD")
    bare = tmp_path / "repo.git"
    git(tmp_path, "clone", "-q", "--bare", str(checkout), str(bare))

    monkeypatch.chdir(checkout)
    outputs = asyncio.run(run_steps(raw["build"], print_function=lambda *a, **k: None))  # type: ignore[arg-type]
    (build_id,) = [args["id"] for _, args in steps_named(raw, "build")]
    assert outputs[build_id]["stdout"] == deployed
    # As `prefect deploy` stores them: step outputs filled in, the variable left for the run.
    stored = apply_values(raw["pull"], outputs, remove_notset=False)
    assert stored[0]["prefect.deployments.steps.git_clone"]["commit_sha"] == deployed
    assert "prefect.variables" in stored[0]["prefect.deployments.steps.git_clone"]["repository"]

    # The repository moves on after the deploy; the run still gets the deployed commit.
    (checkout / "flows" / "weekly.py").write_text("VERSION = 2\n", encoding="utf-8")
    git(checkout, "commit", "-q", "-am", "two")
    git(checkout, "push", "-q", str(bare), "main")
    Variable.set(repo_variable, bare.as_uri(), overwrite=True)
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    monkeypatch.chdir(worker_dir)
    pulled = asyncio.run(run_steps(stored, print_function=lambda *a, **k: None))
    clone = worker_dir / pulled["directory"]
    assert (clone / "flows" / "weekly.py").read_text(encoding="utf-8") == "VERSION = 1\n"
    assert git(clone, "rev-parse", "HEAD") == deployed
