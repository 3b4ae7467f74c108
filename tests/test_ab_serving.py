"""Production A/B serving: the candidate pointer, sticky canary arms, the shadow worker, and a
candidate that cannot load or is cleared while prompts are answered (docs/AB_TESTING.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from capture import db
from capture import shadow as shadow_module
from capture.ab_routing import CandidateServing, in_canary
from capture.classifier import HotReloadingClassifier, ModelLoadError
from capture.model_dir import ModelDirError
from capture.pointers import CandidatePointer, read_candidate, write_candidate
from capture.service import create_nlu_service
from capture.shadow import SHADOW_TABLE, ShadowWorker, shadow_predictions
from capture.types import Classifier, Prediction
from tasks.ab_candidate import clear_candidate, promote_candidate, set_candidate
from tasks.registry import RegistryError, current_version, history
from tests.capture_helpers import (
    FixedClassifier,
    aware,
    capture_settings,
    fake_registry,
    fetch_rows,
)
from tests.model_fixtures import (  # noqa: F401
    FIXTURE_LABELS,
    V2_LABELS,
    clone_serving_dir,
    exported_model_dir,
    small_model_dir,
    two_version_registry,
)
from tests.shadow_fakes import Gate, GatedLoader


def clean_shadow(url: str) -> None:
    with db.get_sync_engine(url).begin() as conn:
        conn.execute(text(f"DELETE FROM {SHADOW_TABLE}"))


def shadow_rows(url: str) -> list[dict[str, Any]]:
    with db.get_sync_engine(url).connect() as conn:
        rows = conn.execute(select(shadow_predictions))
        return [dict(r._mapping) for r in rows]


class FakeLoader:
    """Builds synthetic candidates by version (no ONNX); raises ModelLoadError for ``broken``."""

    def __init__(self, **classifiers: Classifier) -> None:
        self.classifiers = classifiers
        self.broken: set[str] = set()

    def __call__(self, path: Path) -> Classifier:
        if path.name in self.broken:
            raise ModelLoadError(f"{path}/model.onnx: corrupt")
        return self.classifiers[path.name]


def three_version_registry(root: Path) -> Path:
    """A registry with version dirs 1, 2 and 3 that look deployable (the loader is fake)."""
    return fake_registry(root, ("1", "2", "3"))


# The pointer format and the registry's candidate commands.


def test_candidate_pointer_roundtrip_and_validation(tmp_path: Path) -> None:
    assert read_candidate(tmp_path) is None
    write_candidate(tmp_path, "2", "canary", 0.25)
    pointer = read_candidate(tmp_path)
    assert pointer is not None and (pointer.version, pointer.mode, pointer.share) == (
        "2",
        "canary",
        0.25,
    )
    with pytest.raises(ModelDirError, match="mode one of"):
        write_candidate(tmp_path, "2", "blue-green", 0.1)
    with pytest.raises(ModelDirError, match=r"share a number in \[0, 1\]"):
        write_candidate(tmp_path, "2", "canary", 1.5)
    (tmp_path / "candidate").write_text("not json")
    with pytest.raises(ModelDirError, match="candidate clear"):
        read_candidate(tmp_path)


def test_registry_candidate_set_clear_promote(tmp_path: Path) -> None:
    models = three_version_registry(tmp_path)
    with pytest.raises(RegistryError, match="is the serving champion"):
        set_candidate(models, "1", mode="shadow")
    with pytest.raises(RegistryError, match="not in the registry"):
        set_candidate(models, "9", mode="shadow")
    (models / "3" / "model.onnx").unlink()
    with pytest.raises(RegistryError, match=r"cannot serve: missing model\.onnx"):
        set_candidate(models, "3", mode="canary")
    with pytest.raises(RegistryError, match="--share: applies to --mode canary only"):
        set_candidate(models, "2", mode="shadow", share=0.5)  # shadow answers nobody
    pointer = set_candidate(models, "2", mode="shadow")
    assert (pointer.mode, pointer.share) == ("shadow", 0.0)
    pointer = set_candidate(models, "2", mode="canary")
    assert pointer.share == 0.1
    cleared = clear_candidate(models, reason="test")
    assert cleared is not None and cleared.version == "2"
    assert read_candidate(models) is None and clear_candidate(models) is None
    set_candidate(models, "2", mode="canary", share=0.2)
    assert promote_candidate(models, expected="2") == {"promoted": "2", "previous": "1"}
    assert current_version(models) == "2" and read_candidate(models) is None
    actions = [row["action"] for row in history(models)]
    assert actions == [
        "candidate-set",
        "candidate-set",
        "candidate-clear",
        "candidate-set",
        "deploy",
        "candidate-promote",
    ]


# Sticky assignment.


def test_sticky_share_on_10k_users() -> None:
    salt = b"candidate-2"
    users = [uuid.uuid4().bytes for _ in range(10_000)]
    for share in (0.05, 0.1, 0.5):
        arms = [in_canary(user, share, salt) for user in users]
        assert abs(sum(arms) / len(users) - share) <= 0.02
        assert arms == [in_canary(user, share, salt) for user in users]  # sticky
    assert not in_canary(None, 1.0, salt)  # no user, no conversation: the champion


async def test_canary_is_sticky_per_user_and_logged(db_url: str, tmp_path: Path) -> None:
    models = three_version_registry(tmp_path)
    candidate_model = FixedClassifier(prediction=Prediction("calendar_v2", 0.9), version="2")
    write_candidate(models, "2", "canary", 0.3)
    ab = CandidateServing(models, loader=FakeLoader(**{"2": candidate_model}), watch=False)
    champion = FixedClassifier(prediction=Prediction("calendar", 0.8), version="1")
    service = create_nlu_service(
        champion, url=db_url, settings=capture_settings(db_url, tmp_path / "home"), candidate=ab
    )
    users = [uuid.uuid4() for _ in range(400)]
    arms: dict[uuid.UUID, set[str | None]] = {}
    for round_ in range(3):
        for user in users:
            result = await service.process_message("book a room", user_id=user)
            assert (result.intent == "calendar_v2") == (result.model_version == "2")
            arms.setdefault(user, set()).add(result.model_version)
        if round_ == 0:  # a conversation without a user is sticky on the conversation
            conversation = uuid.uuid4()
            first = await service.process_message("hi", conversation_id=conversation)
            again = await service.process_message("hi", conversation_id=conversation)
            assert first.model_version == again.model_version
    await service.aclose()
    assert all(len(versions) == 1 for versions in arms.values())
    share = sum("2" in v for v in arms.values()) / len(users)
    assert 0.2 <= share <= 0.4  # 400 users: about 4.6 standard errors either side
    rows = fetch_rows(db_url).values()
    by_user: dict[object, set[object]] = {}
    for row in rows:
        if row["user_id"] is not None:
            by_user.setdefault(row["user_id"], set()).add(row["model_version"])
    assert all(len(v) == 1 for v in by_user.values()) and len(by_user) == 400
    assert service.shadow is not None and service.shadow.stats().offered == 0  # canary only


# Shadow: logged, and never on the request path (the candidate predicts in another process).


def shadow_service(db_url: str, tmp_path: Path, gate: Gate, **worker: Any) -> Any:
    """A service answering with a fixed champion (version 1) and candidate 2 in shadow mode,
    whose worker process builds :class:`GatedCandidate` s that wait for ``gate``. The worker
    runs without ``idle_priority`` unless asked (on a busy machine the production setting may
    starve it for minutes; :func:`test_worker_yields_the_cpu` checks that setting)."""
    worker.setdefault("idle_priority", False)
    models = three_version_registry(tmp_path)
    write_candidate(models, "2", "shadow", 0.0)
    ab = CandidateServing(models, loader=GatedLoader(gate), watch=False)
    champion = FixedClassifier(prediction=Prediction("calendar", 0.8), version="1")
    service = create_nlu_service(
        champion, url=db_url, settings=capture_settings(db_url, tmp_path / "home"), candidate=ab
    )
    assert service.shadow is not None and service.shadow.isolation == "process"
    for name, value in worker.items():
        setattr(service.shadow, name, value)
    return service


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_shadow_prediction_is_made_after_answering(db_url: str, tmp_path: Path) -> None:
    clean_shadow(db_url)
    gate = Gate(tmp_path / "gate")
    service = shadow_service(db_url, tmp_path, gate)
    try:
        results = [await service.process_message(f"prompt {i}") for i in range(5)]
        # Every answer came back and was logged while the candidate is still blocked, in the
        # worker process (not this one).
        pid = gate.wait_entered(60)
        assert pid is not None and pid != os.getpid() and pid == service.shadow.pid
        assert not gate.is_open()
        assert {(r.intent, r.model_version) for r in results} == {("calendar", "1")}
        await service.flush(timeout=30)
        assert len(fetch_rows(db_url)) == 5
        assert shadow_rows(db_url) == []
    finally:
        gate.open()
    assert service.shadow.flush(60)
    rows = shadow_rows(db_url)
    assert {uuid.UUID(str(r["log_id"])) for r in rows} == {r.log_id for r in results}
    assert {(r["candidate_version"], r["champion_version"]) for r in rows} == {("2", "1")}
    assert {(r["predicted_intent"], r["confidence"]) for r in rows} == {("calendar_v2", 0.75)}
    logged = fetch_rows(db_url)
    for row in rows:  # keyed by the log row's id and created_at
        log = logged[uuid.UUID(str(row["log_id"]))]
        assert aware(row["log_created_at"]) == aware(log["created_at"])
    stats = service.shadow.stats()
    assert (stats.offered, stats.written, stats.dropped_full, stats.coverage) == (5, 5, 0, 1.0)
    assert (stats.loads, stats.failed_loads, stats.lost) == (1, 0, 0)
    await service.aclose()


async def test_full_shadow_queue_drops_and_counts(db_url: str, tmp_path: Path) -> None:
    clean_shadow(db_url)
    gate = Gate(tmp_path / "gate")
    service = shadow_service(db_url, tmp_path, gate, queue_size=3, batch=1, in_flight=1)
    try:
        await service.process_message("first")
        assert gate.wait_entered(60) is not None  # the worker holds one prompt, blocked
        for i in range(10):
            await service.process_message(f"more {i}")
        stats = service.shadow.stats()
        assert (stats.in_flight, stats.queued, stats.dropped_full) == (1, 3, 7)
    finally:
        gate.open()
    assert service.shadow.flush(60)
    stats = service.shadow.stats()
    assert stats.dropped_full == 7 and stats.written == 4 and stats.offered == 11
    assert stats.coverage == pytest.approx(4 / 11)
    assert len(shadow_rows(db_url)) == 4
    await service.aclose()


async def test_closing_the_service_stops_the_worker_process(db_url: str, tmp_path: Path) -> None:
    clean_shadow(db_url)
    gate = Gate(tmp_path / "gate")
    gate.open()
    service = shadow_service(db_url, tmp_path, gate)
    for i in range(3):
        await service.process_message(f"prompt {i}")
    assert service.shadow.flush(60)
    pid = service.shadow.pid
    assert pid is not None and pid != os.getpid()
    await service.aclose()
    assert service.shadow.exitcode == 0  # it read to the end of its pipe and returned
    assert service.shadow.pid is None and process_gone(pid)
    assert pid not in {p.pid for p in multiprocessing.active_children()}
    assert service.shadow.stats().written == 3 and len(shadow_rows(db_url)) == 3


async def test_closing_stops_a_blocked_worker_and_counts_what_it_held(
    db_url: str, tmp_path: Path
) -> None:
    clean_shadow(db_url)
    gate = Gate(tmp_path / "gate")  # never opened: the candidate never finishes
    service = shadow_service(db_url, tmp_path, gate, batch=1, in_flight=1)
    for i in range(4):
        await service.process_message(f"prompt {i}")
    pid = gate.wait_entered(60)
    assert pid is not None
    await asyncio.to_thread(service.shadow.close, 0.5)
    assert service.shadow.exitcode == -signal.SIGTERM  # terminated after the timeout
    assert process_gone(pid) and pid not in {p.pid for p in multiprocessing.active_children()}
    stats = service.shadow.stats()
    assert (stats.offered, stats.written, stats.lost, stats.queued) == (4, 0, 4, 0)
    assert stats.coverage == 0.0
    await service.aclose()  # closing again is harmless
    assert len(fetch_rows(db_url)) == 4 and shadow_rows(db_url) == []


async def test_worker_yields_the_cpu(db_url: str, tmp_path: Path) -> None:
    """The production setting: niceness 19 and, on Linux, SCHED_IDLE in a scheduling group of
    its own (its CPU time is never charged to the service's group)."""
    gate = Gate(tmp_path / "gate")
    gate.open()
    service = shadow_service(db_url, tmp_path, gate, idle_priority=True)
    await service.process_message("hello")
    pid = None
    for _ in range(6000):  # set as the worker starts, before it loads the candidate
        pid = service.shadow.pid
        if pid is not None and hasattr(os, "SCHED_IDLE"):
            with contextlib.suppress(ProcessLookupError):
                if os.sched_getscheduler(pid) == os.SCHED_IDLE:
                    break
        await asyncio.sleep(0.01)
    assert pid is not None and pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pid) == 19
    if hasattr(os, "SCHED_IDLE"):
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    autogroup = Path(f"/proc/{pid}/autogroup")
    if autogroup.exists():
        assert os.getsid(pid) == pid and autogroup.read_text().split()[-1] == "19"
    await asyncio.to_thread(service.shadow.close, 5)
    # A starved worker may not reach the end of its pipe in time: then it is terminated.
    assert service.shadow.exitcode in {0, -signal.SIGTERM}
    assert process_gone(pid) and pid not in {p.pid for p in multiprocessing.active_children()}
    await service.aclose()


async def test_a_worker_that_dies_is_counted_and_replaced(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shadow_module, "RESTART_BACKOFF_S", 0.1)
    clean_shadow(db_url)
    gate = Gate(tmp_path / "gate")  # closed: the first worker blocks on its first batch
    service = shadow_service(db_url, tmp_path, gate, batch=2, in_flight=1)
    for i in range(2):
        await service.process_message(f"held {i}")
    pid = gate.wait_entered(60)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the worker dies holding a batch of 2
    gate.open()
    for i in range(3):
        await service.process_message(f"after {i}")
    assert service.shadow.flush(60)
    stats = service.shadow.stats()
    assert (stats.offered, stats.lost, stats.written) == (5, 2, 3)
    assert stats.pid is not None and stats.pid != pid and process_gone(pid)
    await service.flush(timeout=30)
    assert sorted(r["log_id"] for r in shadow_rows(db_url)) == sorted(
        r["id"] for r in fetch_rows(db_url).values() if r["prompt"].startswith("after")
    )
    await service.aclose()


async def test_worker_follows_the_pointer_and_never_predicts_with_a_refused_candidate(
    db_url: str, tmp_path: Path
) -> None:
    clean_shadow(db_url)
    gate = Gate(tmp_path / "gate")
    gate.open()
    service = shadow_service(db_url, tmp_path, gate)
    models = service.ab.models_dir
    # The worker's own loader refuses version 3 (as a corrupt model.onnx would be refused).
    await asyncio.to_thread(service.shadow.close, 5)
    service.shadow = ShadowWorker(
        db_url,
        service.ab,
        champion_version="1",
        loader=GatedLoader(gate, refuse=frozenset({"3"})),
        idle_priority=False,
    )

    async def answer(n: int) -> None:
        for i in range(n):
            result = await service.process_message(f"prompt {i}")
            assert result.model_version == "1"  # the champion answers throughout
        assert service.shadow.flush(60)

    await answer(3)
    pid = service.shadow.pid
    write_candidate(models, "3", "shadow", 0.0)
    assert service.ab.reload_now() and service.ab.version == "3"
    await answer(2)
    stats = service.shadow.stats()
    assert (stats.written, stats.skipped, stats.failed_loads) == (3, 2, 1)
    write_candidate(models, "2", "shadow", 0.0)
    assert service.ab.reload_now()
    await answer(2)
    stats = service.shadow.stats()
    assert (stats.written, stats.skipped, stats.loads, stats.pid) == (5, 2, 2, pid)
    versions = [str(r["candidate_version"]) for r in shadow_rows(db_url)]
    assert sorted(versions) == ["2"] * 5  # nothing from the refused version 3
    await service.aclose()


async def test_unpicklable_candidate_predicts_in_a_thread(db_url: str, tmp_path: Path) -> None:
    """A synthetic candidate made in the test (a lambda loader) cannot be rebuilt in another
    process: the worker says so and predicts in a thread; the rows are the same."""
    clean_shadow(db_url)
    models = three_version_registry(tmp_path)
    write_candidate(models, "2", "shadow", 0.0)
    candidate = FixedClassifier(prediction=Prediction("calendar_v2", 0.5), version="2")
    ab = CandidateServing(models, loader=lambda path: candidate, watch=False)
    service = create_nlu_service(
        FixedClassifier(),
        url=db_url,
        settings=capture_settings(db_url, tmp_path / "home"),
        candidate=ab,
    )
    assert service.shadow is not None and service.shadow.isolation == "thread"
    for i in range(4):
        await service.process_message(f"prompt {i}")
    assert service.shadow.flush(30)
    assert service.shadow.pid is None and candidate.seen == [f"prompt {i}" for i in range(4)]
    assert [r["predicted_intent"] for r in shadow_rows(db_url)] == ["calendar_v2"] * 4
    await service.aclose()


# Real ONNX candidates: a corrupt one never serves; clearing is atomic under load.


@pytest.fixture
def onnx_registry(exported_model_dir: Path, tmp_path: Path) -> Iterator[Path]:  # noqa: F811
    yield two_version_registry(exported_model_dir, tmp_path / "models", "1", "2")


async def test_corrupt_candidate_never_serves(db_url: str, onnx_registry: Path) -> None:
    models = onnx_registry
    clone_serving_dir(models / "2", models / "3", version="3")
    (models / "3" / "model.onnx").write_bytes(os.urandom(4096))
    champion = HotReloadingClassifier(models, watch=False)
    set_candidate(models, "3", mode="canary", share=1.0)
    ab = CandidateServing(models, watch=False)
    assert ab.route is None and ab.failed_loads == 1 and "model.onnx" in (ab.last_error or "")
    service = create_nlu_service(
        champion, url=db_url, settings=capture_settings(db_url, models.parent / "h"), candidate=ab
    )
    for _ in range(20):
        result = await service.process_message("will it rain", user_id=uuid.uuid4())
        assert result.model_version == "1" and not result.intent.endswith("_v2")
    # A good candidate serves; switching the pointer to the corrupt one stops it at once.
    set_candidate(models, "2", mode="canary", share=1.0)
    assert ab.reload_now() and ab.version == "2"
    result = await service.process_message("will it rain", user_id=uuid.uuid4())
    assert result.model_version == "2" and result.intent.endswith("_v2")
    set_candidate(models, "3", mode="canary", share=1.0)
    ab.reload_now()
    assert ab.route is None
    result = await service.process_message("will it rain", user_id=uuid.uuid4())
    assert result.model_version == "1"
    ab.reload_now()  # not retried until the pointer changes
    assert ab.failed_loads == 2
    await service.aclose()


async def test_clear_is_atomic_under_concurrent_predicts(db_url: str, onnx_registry: Path) -> None:
    models = onnx_registry
    champion = HotReloadingClassifier(models, watch=False)
    set_candidate(models, "2", mode="canary", share=0.5)
    ab = CandidateServing(models, watch=False)
    service = create_nlu_service(
        champion, url=db_url, settings=capture_settings(db_url, models.parent / "h"), candidate=ab
    )
    users = [uuid.uuid4() for _ in range(64)]
    cleared = threading.Event()
    stop = threading.Event()
    errors: list[BaseException] = []
    after_clear: list[str | None] = []

    def worker(offset: int) -> None:  # the request path's read, from other threads
        i = offset
        while not stop.is_set():
            route = ab.route
            user = users[i % len(users)].bytes
            was_cleared = cleared.is_set()
            try:
                if route is not None and route.answers(user, None):
                    prediction, version = route.classifier.predict("rain tomorrow?"), "2"
                else:
                    prediction, version = champion.predict("rain tomorrow?"), "1"
                assert prediction.intent.endswith("_v2") == (version == "2")
            except BaseException as exc:  # collected, asserted empty below
                errors.append(exc)
                return
            if was_cleared:
                after_clear.append(version)
            i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    answered = []
    for n in range(30):
        result = await service.process_message("rain tomorrow?", user_id=users[n % len(users)])
        answered.append(result.model_version)
        assert result.intent.endswith("_v2") == (result.model_version == "2")
        await asyncio.sleep(0.001)
    assert "2" in answered and "1" in answered
    clear_candidate(models, reason="rollback under load")
    assert not (models / "candidate").exists()
    ab.reload_now()
    cleared.set()
    for user in users:
        result = await service.process_message("rain tomorrow?", user_id=user)
        assert result.model_version == "1"
    await asyncio.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert after_clear and set(after_clear) == {"1"}
    await service.aclose()
    rows = fetch_rows(db_url).values()
    assert all(r["predicted_intent"].endswith("_v2") == (r["model_version"] == "2") for r in rows)


def test_mode_change_keeps_the_loaded_model(tmp_path: Path) -> None:
    models = three_version_registry(tmp_path)
    loader = FakeLoader(**{"2": FixedClassifier(version="2")})
    write_candidate(models, "2", "shadow", 0.0)
    ab = CandidateServing(models, loader=loader, watch=False)
    first = ab.route
    assert first is not None and first.threshold == 0
    write_candidate(models, "2", "canary", 0.5)
    assert ab.reload_now()
    assert ab.route is not None and ab.route.classifier is first.classifier
    assert ab.loads == 1 and ab.route.pointer.mode == "canary"
    assert json.loads((models / "candidate").read_text())["share"] == 0.5
    assert isinstance(ab.route.pointer, CandidatePointer)


async def test_demo_traffic_answers_with_the_registry_and_its_canary(
    sqlite_url: str, onnx_registry: Path
) -> None:
    from capture.demo_traffic import run_demo_traffic

    models = onnx_registry
    settings = capture_settings(sqlite_url, models.parent)  # HOME/models is the registry
    assert settings.models_dir == models
    set_candidate(models, "2", mode="canary", share=0.5)
    with db.get_sync_engine(sqlite_url).begin() as conn:
        conn.execute(text("DELETE FROM nlu_prompt_logs"))
    report = await run_demo_traffic(count=300, seed=1, settings=settings, users=200)
    assert report.sent == 300
    rows = list(fetch_rows(sqlite_url).values())
    assert {r["model_version"] for r in rows} == {"1", "2"}
    for r in rows:  # each answer came from the model its row names (or is out of scope)
        allowed = set(V2_LABELS if r["model_version"] == "2" else FIXTURE_LABELS) | {"oos"}
        assert r["predicted_intent"] in allowed
    assert len({r["user_id"] for r in rows}) > 100
