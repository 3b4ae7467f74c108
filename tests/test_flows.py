"""The weekly-cycle flows under a Prefect test server, on SQLite and PostgreSQL.

The champion is the shared session fixture model (4 intents, exported to ONNX) published as
version 1. Training budgets are tiny (one optimiser step): the tests check the orchestration,
the gate and the registry, not model quality.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from capture.files import write_json_atomic
from tasks import registry
from tasks.layout import HomeLayout
from tests.cycle_helpers import Log, corrections_in_db, insert_logs
from tests.model_fixtures import (  # noqa: F401  (fixtures)
    FIXTURE_RECORDS,
    clone_serving_dir,
    exported_model_dir,
    small_model_dir,
)
from tests.tiny_data import INTENTS

pytestmark = pytest.mark.usefixtures("prefect_harness")

LABELS = ("banking", "calendar", "music", "weather")
ROTATE = {label: LABELS[(i + 1) % len(LABELS)] for i, label in enumerate(LABELS)}
TINY = {"min_steps": 1, "max_steps": 1, "batch_size": 4, "seed": 0}


def jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows),
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def champion_dir(exported_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The fixture model as registry version 1 (encoder included, for warm starts)."""
    return clone_serving_dir(
        exported_model_dir,
        tmp_path_factory.mktemp("champion") / "1",
        version="1",
        include_encoder=True,
    )


@pytest.fixture
def serving(home: Path, champion_dir: Path) -> Path:
    """A registry under the test's home with the champion deployed as version 1."""
    models = HomeLayout(home).create_registry()  # as `prompt-capture init`; the lock never does
    registry.publish(champion_dir, models, version="1")
    registry.deploy(models, "1")
    data = home / "data"
    jsonl(data / "base_val.jsonl", [(t, lab) for lab in LABELS for t in INTENTS[lab][6:8]])
    jsonl(data / "base_test.jsonl", [(t, lab) for lab in LABELS for t in INTENTS[lab][8:11]])
    return models


def model_card_artifacts() -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["model-card"]))
        )
    return [str(a.data) for a in found]


def latest_serving_card() -> str:
    """The newest version of the serving model's card artifact."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        (found,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["serving-model-card"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    return str(found.data)


def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_shuffled_labels_are_rejected_and_the_champion_keeps_serving(
    db_url: str, home: Path, serving: Path
) -> None:
    from capture.classifier import HotReloadingClassifier
    from flows.weekly import weekly_cycle

    # Everything the challenger learns from has its labels rotated: garbage on purpose.
    jsonl(home / "data" / "base_train.jsonl", [(t, ROTATE[lab]) for t, lab in FIXTURE_RECORDS])
    logs = [
        Log(text, label, 0.95, was_successful=True, corrected=ROTATE[label])
        for label in LABELS
        for text in INTENTS[label][6:8]
    ]
    ids = insert_logs(db_url, logs)
    inbox = home / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "week.json").write_text(
        json.dumps([{"id": str(ids[0]), "corrected_intent": ROTATE[ROTATE["banking"]]}]),
        encoding="utf-8",
    )
    classifier = HotReloadingClassifier(serving, interval_s=0.05)
    try:
        state = weekly_cycle(
            days=30,
            holdout_fraction=0.0,
            hyperparameters=TINY,
            min_support=3,
            quantize=False,
            database_url=db_url,
            return_state=True,
        )
        assert state.is_completed(), state.message
        # A rejection is told from a promotion at a glance: the run's state is "Rejected".
        assert state.name == "Rejected"
        assert "challenger 2 rejected by the gate; version 1 keeps serving" in state.message
        summary = state.result()
        result = summary.retrain
        assert result.decision.verdict == "REJECT" and result.promote is False
        assert result.version == "2" and result.champion_version == "1"
        assert result.decision.challenger_accuracy < result.decision.champion_accuracy
        assert "rejected by the gate" in summary.message
        assert "version 1 keeps serving" in summary.message
        assert summary.deployed is None
        # A completed cycle (even with a rejected challenger) publishes the monitoring figures
        # and records its success time for the monitor flow's staleness check.
        from tasks.monitor import last_cycle_success

        assert last_cycle_success(db_url, home) == summary.cycle_success
        assert isinstance(summary.monitoring, dict)
        # The champion keeps serving; the challenger is in the registry, rejected, not exported.
        assert registry.current_version(serving) == "1"
        assert classifier.reload_now() is False and classifier.version == "1"
        challenger = serving / "2"
        assert registry.gate_status(challenger) == "rejected"
        assert not registry.is_deployable(challenger)
        card = (challenger / "card.md").read_text(encoding="utf-8")
        assert "**Decision: REJECT**" in card and "champion 1" in card
        # The same card is a keyed markdown artifact (it versions in the UI).
        assert card in model_card_artifacts()
        training = json.loads((challenger / "training.json").read_text(encoding="utf-8"))
        data_file = Path(training["training_data"])
        assert (
            training["training_data_sha256"]
            == hashlib.sha256(data_file.read_bytes()).digest().hex()
        )
        assert training["warm_start_from"] == "1"
        assert set(training["corrected_ids"]) == {str(i) for i in ids}
        assert training["counts"]["base"] == len(FIXTURE_RECORDS)
        # The inbox was drained through the real import (one row, applied).
        assert (inbox / "processed" / "week.json").exists()
        assert summary.corrections is not None and summary.corrections[0].applied == 1
        assert corrections_in_db(db_url)[ids[0]][0] == ROTATE[ROTATE["banking"]]
    finally:
        classifier.close()


def test_rollback_restores_the_previous_model_and_the_service_reloads(
    home: Path, serving: Path, champion_dir: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from capture.classifier import HotReloadingClassifier
    from deployments.cli import app
    from flows.deploy import deploy_flow, rollback_flow

    second = clone_serving_dir(champion_dir, tmp_path / "second", version="second")
    registry.publish(second, serving, version="2")
    write_json_atomic(serving / "2" / "gate.json", {"promote": True})
    classifier = HotReloadingClassifier(serving, interval_s=0.05)
    try:
        assert classifier.version == "1"
        (serving / "2" / "card.md").write_text("# Model card of version 2\n", encoding="utf-8")
        deployed = deploy_flow()  # the newest promoted version; already exported
        assert (deployed.version, deployed.previous, deployed.export) == ("2", "1", None)
        wait_for(lambda: classifier.version == "2")
        # The serving model's card is findable under its own artifact key.
        card = latest_serving_card()
        assert card.startswith("# Serving: version 2") and "(deploy; before: 1)" in card
        assert "# Model card of version 2" in card
        rolled = rollback_flow()
        assert (rolled.previous, rolled.version) == ("2", "1")
        card = latest_serving_card()
        assert card.startswith("# Serving: version 1") and "(rollback; before: 2)" in card
        assert registry.current_version(serving) == "1"
        wait_for(lambda: classifier.version == "1")
        assert classifier.predict("play the latest album by adele").intent == "music"

        runner = CliRunner()
        listed = runner.invoke(app, ["models", "--json"])
        assert listed.exit_code == 0, listed.output
        versions = {m["version"]: m for m in json.loads(listed.output)}
        assert versions["1"]["serving"] and versions["2"]["gate"] == "promoted"
        result = runner.invoke(app, ["rollback", "--to", "2"])
        assert result.exit_code == 0, result.output
        assert "now serving version 2 (was 1)" in result.output
        wait_for(lambda: classifier.version == "2")
        missing = runner.invoke(app, ["rollback", "--to", "9"])
        assert missing.exit_code == 2 and "not in the registry" in missing.output
    finally:
        classifier.close()


def test_the_corrections_flow_drains_the_inbox_all_or_nothing(
    db_url: str, home: Path, serving: Path
) -> None:
    from flows.corrections import corrections_flow

    ids = insert_logs(
        db_url,
        [Log("pay my bill", "music", 0.4), Log("play jazz", "banking", 0.5)],
    )
    inbox = home / "inbox"
    inbox.mkdir(parents=True)
    good = [{"id": str(ids[0]), "corrected_intent": "banking", "notes": "a bill"}]
    bad = [
        {"id": str(ids[1]), "corrected_intent": "music"},
        {"id": str(ids[1]), "corrected_intent": "jazz_music"},  # not a label of model 1
    ]
    (inbox / "a-good.json").write_text(json.dumps(good), encoding="utf-8")
    (inbox / "b-bad.json").write_text(json.dumps(bad), encoding="utf-8")
    results = corrections_flow(database_url=db_url)
    assert [(Path(r.file).name, r.applied, len(r.rejected)) for r in results] == [
        ("a-good.json", 1, 0),
        ("b-bad.json", 0, 3),  # the same prompt corrected two ways (2 rows) + unknown intent
    ]
    stored = corrections_in_db(db_url)
    assert stored[ids[0]] == ("banking", "a bill")
    assert stored[ids[1]] == (None, None)  # one bad row: nothing from that file
    assert (inbox / "processed" / "a-good.json").exists()
    reason = (inbox / "rejected" / "b-bad.json.reason.txt").read_text(encoding="utf-8")
    assert "'jazz_music' is not a known intent" in reason
    assert "corrected to different intents" in reason
    assert corrections_flow(database_url=db_url) == []  # inbox empty now
    again = corrections_flow(file=str(inbox / "processed" / "a-good.json"), database_url=db_url)
    assert (again[0].applied, again[0].unchanged) == (0, 1)


def test_review_training_data_and_pairs_flows(db_url: str, home: Path, serving: Path) -> None:
    from flows.pairs import pairs_flow
    from flows.review import review_export_flow
    from flows.training_data import training_data_flow
    from tasks.review_file import REVIEW_FIELDS
    from tasks.training_data import read_summary

    insert_logs(
        db_url,
        [
            Log("how much is in my account", "banking", 0.45, secondary=(("music", 0.3),)),
            Log("How much is in my account?", "banking", 0.46),
            Log("play a song", "music", 0.97, was_successful=True),
            Log("play some music", "music", 0.98, was_successful=True),
            Log("rain tomorrow?", "calendar", 0.92, was_successful=False),
            Log("move my meeting", "banking", 0.5, corrected="calendar"),
            Log("book a meeting room", "banking", 0.5, corrected="calendar"),
        ],
    )
    review = review_export_flow(days=7, limit=10, database_url=db_url)
    rows = json.loads(review.path.read_text(encoding="utf-8"))
    assert all(tuple(r) == REVIEW_FIELDS for r in rows)
    # Near-duplicates collapsed with the serving model's embeddings; the failed one is in.
    assert {r["prompt"].lower().rstrip("?") for r in rows} == {
        "how much is in my account",
        "rain tomorrow",
    }
    assert review.reasons["failed"] == 1

    jsonl(home / "data" / "base_train.jsonl", list(FIXTURE_RECORDS))
    data = training_data_flow(days=7, holdout_fraction=0.0, database_url=db_url)
    assert data.counts == {"base": 24, "corrected": 2, "predicted": 2, "holdout": 0}
    sidecar = read_summary(data.path)
    assert sidecar is not None
    assert sidecar["training_data_sha256"] == data.sha256
    pairs = pairs_flow(max_pairs=10)  # the newest export; production rows only
    assert pairs.input == data.path
    assert (pairs.rows, pairs.pairs) == (4, 2)  # one pair per intent with two texts
    lines = pairs.output.read_text(encoding="utf-8").splitlines()
    assert {json.loads(line)["label"] for line in lines} == {"music", "calendar"}


@pytest.mark.slow
def test_a_good_challenger_is_promoted_exported_deployed_and_hot_reloaded(
    sqlite_url: str, home: Path, serving: Path
) -> None:
    from capture.classifier import HotReloadingClassifier
    from flows.weekly import weekly_cycle

    jsonl(
        home / "data" / "base_train.jsonl",
        [(t, lab) for lab in LABELS for t in INTENTS[lab][:8]],
    )
    classifier = HotReloadingClassifier(serving, interval_s=0.05)
    try:
        summary = weekly_cycle(
            days=30,
            hyperparameters={**TINY, "min_steps": 10, "max_steps": 10},
            min_support=3,
            max_intent_drop=0.34,
            deploy_mode="direct",  # today's direct deploy (the default puts it in shadow)
            database_url=sqlite_url,
        )
        assert summary.retrain.decision.verdict == "PROMOTE", summary.retrain.decision.reasons
        assert summary.deployed is not None and summary.deployed.version == "2"
        assert summary.deployed.export is not None
        assert summary.deployed.export.published in {"int8", "fp32"}
        wait_for(lambda: classifier.version == "2")
        assert registry.current_version(serving) == "2"
    finally:
        classifier.close()


def test_cli_export_and_import_corrections(
    db_url: str, home: Path, serving: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from capture.settings import get_settings
    from deployments.cli import app

    monkeypatch.setenv("PROMPT_CAPTURE_DATABASE_URL", db_url)
    get_settings.cache_clear()
    ids = insert_logs(
        db_url,
        [Log("what's my balance", "music", 0.3), Log("play jazz please", "music", 0.45)],
    )
    runner = CliRunner()
    review_path = home / "review.json"
    exported = runner.invoke(
        app, ["export", "--mode", "review", "--days", "7", "--output", str(review_path)]
    )
    assert exported.exit_code == 0, exported.output
    rows = json.loads(review_path.read_text(encoding="utf-8"))
    assert {r["id"] for r in rows} == {str(i) for i in ids}
    for r in rows:
        r["corrected_intent"] = "banking" if r["id"] == str(ids[0]) else "musik"  # a typo
    review_path.write_text(json.dumps(rows), encoding="utf-8")
    rejected = runner.invoke(app, ["import-corrections", str(review_path)])
    assert rejected.exit_code == 2  # a UserError: one line, nothing imported
    assert "'musik' is not a known intent" in rejected.output
    assert corrections_in_db(db_url)[ids[0]] == (None, None)
    for r in rows:
        r["corrected_intent"] = "banking" if r["id"] == str(ids[0]) else "music"
    review_path.write_text(json.dumps(rows), encoding="utf-8")
    applied = runner.invoke(app, ["import-corrections", str(review_path)])
    assert applied.exit_code == 0, applied.output
    assert "applied 2, unchanged 0" in applied.output
    again = runner.invoke(app, ["import-corrections", str(review_path)])
    assert "applied 0, unchanged 2" in again.output
    training = runner.invoke(
        app, ["export", "--mode", "retraining", "--output", str(home / "t.jsonl")]
    )
    assert training.exit_code == 0, training.output
    from tasks.training_data import is_held_out

    texts = {json.loads(x)["text"] for x in (home / "t.jsonl").read_text().splitlines()}
    held = {json.loads(x)["text"] for x in (home / "t.holdout.jsonl").read_text().splitlines()}
    both = {"what's my balance", "play jazz please"}
    assert texts | held == both and not texts & held
    assert held == {t for t in both if is_held_out(t, 0.2)}


def test_retrain_helpers_refuse_bad_input(tmp_path: Path) -> None:
    from tasks.retrain import read_eval_records, train_config, training_info

    with pytest.raises(ValueError, match="unknown name\\(s\\) max_stepz"):
        train_config({"max_stepz": 3})
    assert train_config({"max_steps": 3}).max_steps == 3
    assert read_eval_records(None) == [] and read_eval_records(tmp_path / "missing.jsonl") == []
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert read_eval_records(empty) == []
    data = jsonl(tmp_path / "t.jsonl", [("a", "x"), ("b", "y")])
    info = training_info(data, None)
    assert info["training_data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert info["n_train"] == 2
    with pytest.raises(ValueError, match="the file changed after the export"):
        training_info(data, {"training_data_sha256": "0" * 64})
