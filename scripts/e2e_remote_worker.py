"""End to end: a Prefect worker with no checkout of the project runs a ``weekly-cycle``.

Proves the worker setup of README "A worker on another machine" on one host, every step real:

1. **repository** - a local bare clone of this checkout (``git clone --bare``); with
   ``--from-working-tree``, of a snapshot commit of the working tree (tracked and untracked,
   non-ignored files) made in a scratch clone, to try uncommitted work. This checkout is never
   changed;
2. **server** - ``prefect server start --host 127.0.0.1`` on a free port, with its own
   PREFECT_HOME;
3. **shared home** - ``prompt-capture demo`` (small training budgets) in a fresh
   PROMPT_CAPTURE_HOME: a registry with a serving model, the base files, a week of traffic in
   the home's SQLite database (``--reuse-home DIR`` copies one a kept run prepared instead);
4. **operator** - the Prefect variable ``prompt_capture_repo`` = the bare clone, the process
   work pools ``prompt-capture-pool`` and ``prompt-capture-gpu``, and ``prefect deploy --name
   weekly-cycle --name retrain`` from a clone of the bare repository (prefect.yaml's build step
   records its commit, the pull step clones it);
5. **worker machine** - another folder with its own virtualenv: the project installed from the
   bare clone with pip (``prompt-capture[train] @ git+file://...@<commit>``; pip takes
   ``torch==2.13.0`` from the local wheel folder it is configured with), then the
   ``prompt-capture`` distribution removed again (``--keep-installed`` keeps it) so that the
   code a run executes can only come from the pull step's clone; no checkout; HF_HUB_OFFLINE=1;
   ``prefect worker start --pool prompt-capture-pool`` there, PROMPT_CAPTURE_HOME = the home;
6. **run** - a ``weekly-cycle`` run with a small training budget: waits for it, checks it ended
   COMPLETED (a challenger the gate rejects ends Completed in a state named Rejected), the
   registry got the challenger's version and the run's logs show the clone;
7. **wrong home** - a run whose ``home`` does not exist must fail naming it (no new registry);
8. stops the worker and the server (their process groups) and removes the folder (unless
   ``--keep``).

Prints one JSON object (run id, final state, wall times, checks); exit code 0 when every check
passed. Slow (a virtualenv with torch, two short trainings): not part of the test suite.

    nice -n 10 .venv/bin/python scripts/e2e_remote_worker.py --from-working-tree
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("e2e_remote_worker")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the operator's environment: this checkout's virtualenv
POOL = "prompt-capture-pool"
GPU_POOL = "prompt-capture-gpu"
REPO_VARIABLE = "prompt_capture_repo"
DEPLOYMENT = "weekly-cycle/weekly-cycle"
# A small run: a few optimiser steps, no int8 quantisation, deployed at once.
RUN_PARAMETERS: dict[str, Any] = {
    "hyperparameters": {"min_steps": 5, "max_steps": 5, "batch_size": 16, "seed": 0},
    "max_pairs": 200,
    "quantize": False,
    "deploy_mode": "direct",
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class E2EError(RuntimeError):
    """A step of the end-to-end run failed; the message names it (logs under the work folder)."""


@dataclass
class Procs:
    """The long-running processes this script started (each leads its own process group)."""

    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def stop(self) -> None:
        for name, proc in reversed(self.started):
            if proc.poll() is None:
                logger.info("stopping %s (pid %d)", name, proc.pid)
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this checkout's virtualenv, Prefect or Prompt Capture settings
    (what a fresh shell on another machine has), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "PROMPT_CAPTURE_"))
        and k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and not p.startswith(str(REPO))
    )
    env.update(extra)
    return env


def run(cmd: list[str], *, env: dict[str, str], cwd: Path, log: Path | None = None) -> str:
    """Run ``cmd`` to completion; its output (stdout and stderr) is returned and, with ``log``,
    kept there. Raises :class:`E2EError` with the output's tail when it fails."""
    logger.info("$ %s", " ".join(cmd))
    done = subprocess.run(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False
    )
    out = done.stdout.decode(errors="replace")
    if log is not None:
        with log.open("a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n{out}\n")
    if done.returncode != 0:
        raise E2EError(f"{cmd[0]} {' '.join(cmd[1:3])} exited {done.returncode}:\n{out[-3000:]}")
    return out


def git(*args: str, cwd: Path) -> str:
    env = clean_env(
        GIT_AUTHOR_NAME="e2e",
        GIT_AUTHOR_EMAIL="e2e@example.com",
        GIT_COMMITTER_NAME="e2e",
        GIT_COMMITTER_EMAIL="e2e@example.com",
    )
    return run(["git", *args], env=env, cwd=cwd).strip()


def make_repository(root: Path, *, from_working_tree: bool) -> tuple[Path, str]:
    """The bare repository workers clone and the commit to deploy."""
    bare = root / "repo.git"
    if not from_working_tree:
        git("clone", "-q", "--bare", str(REPO), str(bare), cwd=root)
        return bare, git("rev-parse", "HEAD", cwd=bare)
    snapshot = root / "snapshot"
    git("clone", "-q", str(REPO), str(snapshot), cwd=root)
    files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO)
    for name in filter(None, files.split("\0")):
        source, target = REPO / name, snapshot / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        elif target.exists():
            target.unlink()  # deleted in the working tree
    git("add", "-A", cwd=snapshot)
    git("commit", "-q", "--allow-empty", "-m", "e2e: snapshot of the working tree", cwd=snapshot)
    git("clone", "-q", "--bare", str(snapshot), str(bare), cwd=root)
    return bare, git("rev-parse", "HEAD", cwd=bare)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    name: str, cmd: list[str], *, env: dict[str, str], cwd: Path, logs: Path, procs: Procs
) -> subprocess.Popen[bytes]:
    logger.info("starting %s: %s", name, " ".join(cmd))
    with (logs / f"{name}.log").open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    procs.started.append((name, proc))
    return proc


def wait_for_server(api_url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise E2EError(f"the Prefect server exited with {proc.returncode} (see server.log)")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise E2EError(f"the Prefect server did not answer {api_url}/health in {timeout_s:.0f}s")


def versions(home: Path) -> list[str]:
    models = home / "models"
    found = [p.name for p in models.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(found, key=int)


def wait_for_run(flow_run_id: Any, worker: subprocess.Popen[bytes], timeout_s: float) -> Any:
    """The flow run once its state is final (:class:`E2EError` after ``timeout_s``)."""
    from prefect import get_client

    deadline = time.monotonic() + timeout_s
    last = None
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            flow_run = client.read_flow_run(flow_run_id)
            state = flow_run.state
            if state is not None and state.name != last:
                logger.info("run %s: %s", flow_run_id, state.name)
                last = state.name
            if state is not None and state.is_final():
                return flow_run
            if worker.poll() is not None:
                raise E2EError(f"the worker exited with {worker.returncode} (see worker.log)")
            time.sleep(3)
    raise E2EError(f"run {flow_run_id} did not finish in {timeout_s:.0f}s (last state {last})")


def run_logs(flow_run_id: Any) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
        )
    return [log.message for log in found]


def stored_pull_steps() -> list[dict[str, Any]]:
    """The pull steps the server holds for the deployment (as a worker will run them)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return list(client.read_deployment_by_name(DEPLOYMENT).pull_steps or [])


def trigger(parameters: dict[str, Any]) -> Any:
    from prefect.deployments import run_deployment

    flow_run: Any = run_deployment(DEPLOYMENT, parameters=parameters, timeout=0)  # sync here
    logger.info("triggered %s run %s", DEPLOYMENT, flow_run.id)
    return flow_run.id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--from-working-tree",
        action="store_true",
        help="deploy a snapshot commit of the working tree (uncommitted work) instead of HEAD",
    )
    parser.add_argument("--workdir", type=Path, help="folder to work in (default: a new temp)")
    parser.add_argument("--worker-venv", type=Path, help="reuse this worker virtualenv")
    parser.add_argument(
        "--reuse-home",
        type=Path,
        help="copy this prepared PROMPT_CAPTURE_HOME (e.g. a kept run's shared-home) instead of "
        "running the demo",
    )
    parser.add_argument("--keep-installed", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    began = time.monotonic()
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="pc-e2e-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    procs = Procs()
    summary: dict[str, Any] = {"workdir": str(root), "checks": {}}
    try:
        summary.update(scenario(root, logs, procs, args, summary))
        summary["ok"] = all(summary["checks"].values())
    except E2EError as exc:
        summary["ok"] = False
        summary["error"] = str(exc)
        logger.error("%s", exc)
    finally:
        procs.stop()
        summary["total_seconds"] = round(time.monotonic() - began, 1)
        if not args.keep and summary.get("ok"):
            shutil.rmtree(root, ignore_errors=True)
    sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    return 0 if summary.get("ok") else 1


def scenario(
    root: Path, logs: Path, procs: Procs, args: argparse.Namespace, summary: dict[str, Any]
) -> dict[str, Any]:
    checks: dict[str, bool] = summary["checks"]
    bare, commit = make_repository(root, from_working_tree=args.from_working_tree)
    summary.update(repository=bare.as_uri(), commit=commit)

    # The server, and this process as the operator's client of it.
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server_env = clean_env(
        PATH=f"{BIN}{os.pathsep}{clean_env()['PATH']}",
        PREFECT_HOME=str(root / "server-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
    )
    server = start(
        "server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env,
        cwd=root,
        logs=logs,
        procs=procs,
    )
    wait_for_server(api_url, server, timeout_s=180)
    operator = clean_env(
        PATH=f"{BIN}{os.pathsep}{clean_env()['PATH']}",
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(root / "operator-prefect-home"),
        **OFFLINE,
    )
    os.environ.update({k: operator[k] for k in ("PREFECT_API_URL", "PREFECT_HOME")})

    # The shared home, prepared beforehand (the demo: registry, base files, traffic), or a copy
    # of one a previous run prepared.
    home = root / "shared-home"
    started = time.monotonic()
    if args.reuse_home:
        shutil.copytree(args.reuse_home, home, symlinks=True)
        summary["home_from"] = str(args.reuse_home)
    else:
        run(
            [str(BIN / "prompt-capture"), "demo", "--first-steps", "10", "--retrain-steps", "5"],
            env={**operator, "PROMPT_CAPTURE_HOME": str(home)},
            cwd=root,
            log=logs / "demo.log",
        )
    summary["home_seconds"] = round(time.monotonic() - started, 1)
    before = versions(home)

    # The operator: variable, pools, deployments from a clone at the deployed commit.
    prefect = str(BIN / "prefect")
    run([prefect, "variable", "set", REPO_VARIABLE, bare.as_uri()], env=operator, cwd=root)
    for pool in (POOL, GPU_POOL):
        run([prefect, "work-pool", "create", pool, "--type", "process"], env=operator, cwd=root)
    deployer = root / "deployer"
    git("clone", "-q", str(bare), str(deployer), cwd=root)
    git("checkout", "-q", commit, cwd=deployer)
    run(
        [prefect, "--no-prompt", "deploy", "--name", "weekly-cycle", "--name", "retrain"],
        env=operator,
        cwd=deployer,
        log=logs / "deploy.log",
    )

    pull = stored_pull_steps()
    summary["pull_steps"] = pull
    clone = pull[0].get("prefect.deployments.steps.git_clone", {}) if pull else {}
    checks["deployed: clone of the variable's repository at the commit"] = clone.get(
        "commit_sha"
    ) == commit and REPO_VARIABLE in str(clone.get("repository"))

    # The worker machine: its own folder and virtualenv, no checkout.
    machine = root / "worker-machine"
    machine.mkdir()
    venv = args.worker_venv.resolve() if args.worker_venv else machine / "venv"
    started = time.monotonic()
    if not (venv / "bin" / "prefect").exists():
        run([sys.executable, "-m", "venv", str(venv)], env=clean_env(), cwd=machine)
        run(  # the pip a fresh venv bundles may be too old for `name[extra] @ git+file://...`
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--upgrade", "pip"],
            env=clean_env(),
            cwd=machine,
            log=logs / "pip.log",
        )
        requirement = f"prompt-capture[train] @ git+{bare.as_uri()}@{commit}"
        run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", requirement],
            env=clean_env(),
            cwd=machine,
            log=logs / "pip.log",
        )
    if not args.keep_installed:
        run(
            [str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "prompt-capture"],
            env=clean_env(),
            cwd=machine,
            log=logs / "pip.log",
        )
    summary["worker_venv_seconds"] = round(time.monotonic() - started, 1)
    worker_env = clean_env(
        PATH=f"{venv / 'bin'}{os.pathsep}{clean_env()['PATH']}",
        VIRTUAL_ENV=str(venv),
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(machine / "prefect-home"),
        PROMPT_CAPTURE_HOME=str(home),
        **OFFLINE,
    )
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import capture"],
        env=worker_env,
        cwd=machine,
        capture_output=True,
        check=False,
    )
    checks["worker has no copy of the project"] = args.keep_installed or probe.returncode != 0
    worker = start(
        "worker",
        [str(venv / "bin" / "prefect"), "worker", "start", "--pool", POOL],
        env=worker_env,
        cwd=machine,
        logs=logs,
        procs=procs,
    )

    # The run.
    started = time.monotonic()
    run_id = trigger(RUN_PARAMETERS)
    flow_run = wait_for_run(run_id, worker, args.timeout)
    state = flow_run.state
    summary.update(
        run_id=str(run_id),
        state_type=state.type.value,
        state_name=state.name,
        state_message=state.message,
        run_seconds=round(time.monotonic() - started, 1),
        versions_before=before,
        versions_after=versions(home),
    )
    messages = run_logs(run_id)
    checks["run COMPLETED"] = state.type.value == "COMPLETED"
    checks["a new version in the shared registry"] = len(summary["versions_after"]) > len(before)
    checks["the run cloned the repository"] = any("git_clone" in m for m in messages)

    # A run on a home that does not exist fails at its entry, naming the home.
    missing = root / "not-mounted"
    wrong_id = trigger({**RUN_PARAMETERS, "home": str(missing)})
    wrong = wait_for_run(wrong_id, worker, 600)
    summary.update(
        wrong_home_run_id=str(wrong_id),
        wrong_home_state=wrong.state.name,
        wrong_home_message=wrong.state.message,
    )
    checks["a run on a home nobody set up fails"] = (
        wrong.state.type.value == "FAILED"
        and f"PROMPT_CAPTURE_HOME: {missing} does not exist" in (wrong.state.message or "")
        and not missing.exists()
    )
    return {}


if __name__ == "__main__":
    sys.exit(main())
