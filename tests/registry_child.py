"""Child process for tests/test_registry_lock.py: ``python -m tests.registry_child RUN_DIR NAME
MODE ARGS...``.

Every mode first waits at the test's barrier (``tests.barrier.wait_for_go``: the children start
together), then:

- ``hold MODELS SECONDS``: holds the registry lock for SECONDS and records its enter and exit
  times (``time.time()``) in ``RUN_DIR/<NAME>.json``;
- ``switch MODELS N PLAN``: N times, each step of PLAN (``deploy:2,rollback,deploy:3``) through
  ``tasks.registry`` (each takes the lock), as the CLI's ``rollback`` does;
- ``cycle HOME DB_URL``: one weekly-cycle flow run (tiny training, a gate that promotes, fp32
  export, deploy) against the Prefect API in ``PREFECT_API_URL``; writes what it did to
  ``RUN_DIR/<NAME>.json``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from capture.files import write_json_atomic
from tests.barrier import wait_for_go

TINY = {"min_steps": 1, "max_steps": 1, "batch_size": 4, "seed": 0}


def hold(run_dir: Path, name: str, models: Path, seconds: float) -> None:
    from tasks.registry import registry_lock

    with registry_lock(models, run=f"hold {name}"):
        entered = time.time()
        time.sleep(seconds)
        left = time.time()
    write_json_atomic(run_dir / f"{name}.json", {"entered": entered, "left": left})


def switch(run_dir: Path, name: str, models: Path, n: int, plan: str) -> None:
    """Run ``plan`` ``n`` times; record how many steps changed what serves (a switch to the
    version already serving writes no history row)."""
    from tasks import registry

    switched = 0
    for _ in range(n):
        for step in plan.split(","):
            action, _, version = step.partition(":")
            if action == "deploy":
                switched += registry.deploy(models, version) != version
            else:
                before, now = registry.rollback(models, version or None)
                switched += before != now
    write_json_atomic(run_dir / f"{name}.json", {"switched": switched})


def cycle(run_dir: Path, name: str, home: Path, url: str) -> None:
    from flows.weekly import weekly_cycle

    result = weekly_cycle(
        days=30,
        holdout_fraction=0.0,
        import_inbox=False,
        hyperparameters=TINY,
        max_overall_drop=1.0,  # a gate that promotes: both challengers are deployed
        max_intent_drop=1.0,
        min_support=1,
        quantize=False,
        deploy_mode="direct",  # both challengers deployed at once (not put under A/B test)
        home=str(home),
        database_url=url,
    )
    write_json_atomic(
        run_dir / f"{name}.json",
        {
            "version": result.retrain.version,
            "champion": result.retrain.champion_version,
            "promote": result.retrain.promote,
            "deployed": result.deployed.version if result.deployed else None,
            "previous": result.deployed.previous if result.deployed else None,
        },
    )


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    run_dir, name, mode = Path(argv[0]), argv[1], argv[2]
    if mode == "cycle":
        from flows.weekly import weekly_cycle  # noqa: F401  (import before the barrier)
    wait_for_go(run_dir, name)
    if mode == "hold":
        hold(run_dir, name, Path(argv[3]), float(argv[4]))
    elif mode == "switch":
        switch(run_dir, name, Path(argv[3]), int(argv[4]), argv[5])
    elif mode == "cycle":
        cycle(run_dir, name, Path(argv[3]), argv[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
