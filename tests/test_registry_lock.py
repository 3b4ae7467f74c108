"""The registry lock: one run at a time changes the registry, in threads, real processes released
together by a barrier, and Prefect runs (subflows and tasks re-enter their run's lock)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from capture.errors import UserError
from tasks import registry
from tasks.layout import HomeLayout
from tasks.registry_lock import (
    LOCK_FILE,
    RegistryBusyError,
    describe_holder,
    read_holder,
    registry_lock,
)
from tests.barrier import Children
from tests.model_fixtures import exported_model_dir, small_model_dir  # noqa: F401  (fixtures)
from tests.test_registry import fake_model


@pytest.fixture
def children(tmp_path: Path) -> Any:
    made: list[Children] = []

    def make(env: dict[str, str] | None = None) -> Children:
        made.append(Children("tests.registry_child", tmp_path / f"run{len(made)}", env))
        return made[-1]

    yield make
    for group in made:
        group.kill()


# ---------------------------------------------------------------------------------------------
# one process


def test_reentrant_in_one_thread_and_exclusive_across_threads(tmp_path: Path) -> None:
    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    seen: dict[str, Any] = {}
    with registry_lock(models, run="outer") as outer:
        with registry_lock(models, timeout=0) as inner:  # re-entered: no wait
            assert inner["run"] == outer["run"] == "outer"
            assert (read_holder(models) or {}).get("pid") == os.getpid()

        def other() -> None:
            try:
                with registry_lock(models, timeout=0.2):
                    seen["got"] = True
            except RegistryBusyError as exc:
                seen["error"] = str(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert registry.holds_registry_lock(models)
    assert "got" not in seen
    assert "the model registry is still locked" in seen["error"]
    assert f"pid {os.getpid()}" in seen["error"] and "run 'outer'" in seen["error"]
    # Released: the holder record is gone, the lock file stays (waiters share its inode).
    assert read_holder(models) is None and (models / LOCK_FILE).exists()
    assert not registry.holds_registry_lock(models)
    with registry_lock(models, timeout=0):
        pass


@contextmanager
def held_by_another_run(models: Path, run: str) -> Iterator[None]:
    """The registry lock of ``models`` held for the ``with`` block by another thread, which
    waits for it as another run would, recorded as ``run``."""
    holding, done = threading.Event(), threading.Event()

    def holder() -> None:
        with registry_lock(models, run=run):
            holding.set()
            done.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holding.wait(30)
        yield
    finally:
        done.set()
        thread.join()


def test_registry_changes_take_the_lock(tmp_path: Path) -> None:
    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    registry.publish(fake_model(tmp_path / "m1"), models)
    registry.publish(fake_model(tmp_path / "m2"), models)
    busy: list[str] = []
    with held_by_another_run(models, "someone else"):
        for change in (
            lambda: registry.deploy(models, "1", lock_timeout=0.1),
            lambda: registry.rollback(models, "1", lock_timeout=0.1),
            lambda: registry.publish(fake_model(tmp_path / "m3"), models, lock_timeout=0.1),
        ):
            with pytest.raises(RegistryBusyError, match="run 'someone else'") as info:
                change()
            busy.append(str(info.value))
    assert len(busy) == 3 and registry.current_version(models) is None
    assert registry.versions(models) == ["1", "2"]


# ---------------------------------------------------------------------------------------------
# real processes released together


def test_a_second_process_waits_says_for_whom_and_times_out_clearly(
    tmp_path: Path, children: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The waiting lines have their own logger, which the CLI quiets (an earlier CLI test in this
    # process may have); here they are what is checked, from the first wait on.
    caplog.set_level(logging.INFO, logger="tasks.registry_lock.wait")
    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    kids = children()
    kids.start("holder", "hold", models, 4.0)
    kids.release()
    deadline = time.monotonic() + 60
    while (holder := read_holder(models)) is None:
        assert time.monotonic() < deadline, kids.log("holder")
        time.sleep(0.02)
    child_pid = kids.procs["holder"].pid
    assert holder["pid"] == child_pid and holder["run"] == "hold holder"
    assert holder["host"] and holder["since"]
    with pytest.raises(RegistryBusyError) as info, registry_lock(models, timeout=0.3):
        pass
    message = str(info.value)
    assert message.startswith(f"{models / LOCK_FILE}: the model registry is still locked after")
    assert describe_holder(holder) in message
    assert "Wait for it to finish" in message
    caplog.set_level(logging.INFO, logger="tasks.registry_lock")
    with registry_lock(models, timeout=120):
        entered = time.time()
    kids.wait()
    held = kids.result("holder")
    assert entered >= held["left"]
    waiting = [r.getMessage() for r in caplog.records if "is busy: waiting" in r.getMessage()]
    assert len(waiting) == 2  # the one that timed out, and the one that waited
    assert "(up to 0.3 s)" in waiting[0] and "(up to 2 min)" in waiting[1]
    assert f"pid {child_pid}" in waiting[1]
    assert "run 'hold holder'" in waiting[0]


def test_two_processes_never_hold_the_lock_at_once(tmp_path: Path, children: Any) -> None:
    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    kids = children()
    for name in ("a", "b"):
        kids.start(name, "hold", models, 1.0)
    kids.release()
    kids.wait()
    first, second = sorted((kids.result("a"), kids.result("b")), key=lambda r: r["entered"])
    assert second["entered"] >= first["left"]
    assert "is busy: waiting" in kids.log("a") + kids.log("b")


def test_concurrent_deploys_and_rollbacks_keep_pointer_and_history_consistent(
    tmp_path: Path, children: Any
) -> None:
    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    for i in (1, 2, 3):
        registry.publish(fake_model(tmp_path / f"m{i}"), models)
    registry.deploy(models, "1")
    kids = children()
    rounds = 15
    kids.start("deployer", "switch", models, rounds, "deploy:2,deploy:3")
    kids.start("rollbacker", "switch", models, rounds, "rollback:1,deploy:3")
    kids.release()
    kids.wait()
    entries = registry.history(models)
    switched = kids.result("deployer")["switched"] + kids.result("rollbacker")["switched"]
    assert switched > rounds  # the two really interleave and switch
    assert len(entries) == 1 + switched  # no switch lost, no row for a no-op
    for before, after in itertools.pairwise(entries):
        assert after["previous"] == before["version"], (before, after)
    assert registry.current_version(models) == entries[-1]["version"]
    assert {e["action"] for e in entries} == {"deploy", "rollback"}


# ---------------------------------------------------------------------------------------------
# Prefect runs


@pytest.mark.usefixtures("prefect_harness")
def test_subflows_and_tasks_of_a_run_reenter_its_lock(tmp_path: Path) -> None:
    """Prefect 3 runs a sync subflow and a sync task in the caller's thread: the weekly cycle's
    retrain and deploy subflows re-enter the lock it holds instead of waiting for it."""
    from prefect import flow, task

    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    registry.publish(fake_model(tmp_path / "m1"), models)

    @task
    def deploy_in_a_task() -> tuple[int, str | None]:
        registry.deploy(models, "1", lock_timeout=0.5)
        return threading.get_ident(), (read_holder(models) or {}).get("run")

    @flow(name="inner-subflow")
    def inner() -> tuple[int, str | None]:
        with registry_lock(models, timeout=0.5) as holder:
            return threading.get_ident(), holder.get("run")

    @flow(name="outer-flow")
    def outer() -> dict[str, Any]:
        with registry_lock(models, timeout=0.5) as holder:
            return {
                "outer": (threading.get_ident(), holder["run"]),
                "subflow": inner(),
                "task": deploy_in_a_task(),
            }

    seen = outer()
    thread, run = seen["outer"]
    assert run.startswith("outer-flow/")
    assert seen["subflow"] == (thread, run)
    assert seen["task"] == (thread, run)
    assert registry.current_version(models) == "1"
    assert read_holder(models) is None


@pytest.mark.usefixtures("prefect_harness")
def test_two_weekly_cycles_at_once_train_distinct_versions_each_gated_against_what_served(
    tmp_path: Path,
    children: Any,
    exported_model_dir: Path,  # noqa: F811
) -> None:
    """Two `weekly-cycle` runs in two processes against one home, released together: the
    second waits for the first, trains the next version against the champion the first
    deployed, and nothing collides (no `Directory not empty`)."""
    import prefect.settings

    from capture import db
    from tests.cycle_helpers import Log, insert_logs
    from tests.model_fixtures import clone_serving_dir
    from tests.tiny_data import INTENTS

    labels = ("banking", "calendar", "music", "weather")  # the fixture model's

    def jsonl(path: Path, rows: list[tuple[str, str]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows),
            encoding="utf-8",
        )

    home = tmp_path / "home"
    models = HomeLayout(home).create_registry()
    champion = clone_serving_dir(
        exported_model_dir, tmp_path / "champion" / "1", version="1", include_encoder=True
    )
    registry.publish(champion, models, version="1")
    registry.deploy(models, "1")
    data = home / "data"
    jsonl(data / "base_train.jsonl", [(t, lab) for lab in labels for t in INTENTS[lab][:6]])
    jsonl(data / "base_val.jsonl", [(t, lab) for lab in labels for t in INTENTS[lab][6:8]])
    jsonl(data / "base_test.jsonl", [(t, lab) for lab in labels for t in INTENTS[lab][8:11]])
    url = f"sqlite:///{tmp_path / 'capture.db'}"
    db.upgrade(url)
    insert_logs(url, [Log(t, lab, 0.97) for lab in labels for t in INTENTS[lab][6:8]])
    kids = children(
        {
            "PREFECT_API_URL": str(prefect.settings.PREFECT_API_URL.value()),
            "PROMPT_CAPTURE_HOME": str(home),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    for name in ("a", "b"):
        kids.start(name, "cycle", home, url)
    kids.release()
    kids.wait(timeout=900)
    logs = kids.log("a") + kids.log("b")
    try:
        results = sorted((kids.result("a"), kids.result("b")), key=lambda r: int(r["version"]))
        # Distinct versions; each challenger was gated against the champion serving when it was
        # trained, and deployed over exactly that champion.
        assert [r["version"] for r in results] == ["2", "3"]
        assert [r["champion"] for r in results] == ["1", "2"]
        assert all(r["promote"] for r in results)
        assert [(r["deployed"], r["previous"]) for r in results] == [("2", "1"), ("3", "2")]
        assert registry.current_version(models) == "3"
        for version in ("2", "3"):
            assert registry.gated_against(models / version) == str(int(version) - 1)
        history = [(h["action"], h["version"], h["previous"]) for h in registry.history(models)]
        assert history == [("deploy", "1", None), ("deploy", "2", "1"), ("deploy", "3", "2")]
        assert registry.versions(models) == ["1", "2", "3"]
        assert not list((home / "work").glob("candidate-*"))  # moved into the registry
        assert "Directory not empty" not in logs
        assert logs.count("is busy: waiting") == 1  # the second cycle said whom it waited for
    except AssertionError as exc:  # say what the children did
        raise AssertionError(f"{exc}\n--- the cycles' logs ---\n{logs[-8000:]}") from exc


def test_the_lock_never_creates_the_registry(tmp_path: Path) -> None:
    from tasks.ab_candidate import clear_candidate, set_candidate

    models = tmp_path / "home" / "models"
    attempts: list[Any] = [
        lambda: registry_lock(models, timeout=0).__enter__(),
        lambda: registry.publish(fake_model(tmp_path / "m1"), models),
        lambda: registry.deploy(models, "1"),
        lambda: registry.rollback(models),
        lambda: set_candidate(models, "1"),
        lambda: clear_candidate(models),
    ]
    for attempt in attempts:
        with pytest.raises(registry.NoRegistryError, match="there is no registry at") as info:
            attempt()
        assert str(models) in str(info.value) and "`prompt-capture init`" in str(info.value)
        assert isinstance(info.value, UserError)
    assert not (tmp_path / "home").exists()  # deploy and the flows still refuse this home
    assert not registry.holds_registry_lock(models)
