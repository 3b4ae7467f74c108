"""The model registry: versions, atomic `current` pointer, deploy, rollback, listing."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from capture.files import write_json_atomic
from capture.model_dir import ModelMetadata
from tasks import registry
from tasks.ab_candidate import set_candidate
from tasks.layout import HomeLayout


def stub_metadata(version: str, labels: tuple[str, ...] = ("a", "b")) -> ModelMetadata:
    """Valid metadata of a tiny stand-in model (16 tokens, 4-dim embeddings, no threshold)."""
    return ModelMetadata(
        version=version,
        labels=labels,
        oos_label="oos",
        oos_threshold=None,
        temperature=1.0,
        base_model="base",
        parent_version=None,
        created_at="2026-01-05T00:00:00+00:00",
        hyperparameters={},
        metrics={},
        max_seq_length=16,
        embedding_dim=4,
    )


def fake_model(path: Path, *, labels: tuple[str, ...] = ("a", "b"), onnx: bool = True) -> Path:
    """A model directory with the serving files (valid metadata; the rest is not a real model)."""
    path.mkdir(parents=True)
    stub_metadata("trained-hash", labels).write(path)
    if onnx:
        tiny_onnx(path / "model.onnx", version="trained-hash")
        (path / "tokenizer.json").write_text("{}", encoding="utf-8")
    return path


def tiny_onnx(path: Path, *, version: str) -> None:
    """A valid one-node ONNX file with a version in its metadata."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    entry = model.metadata_props.add()
    entry.key, entry.value = "version", version
    onnx.save(model, str(path))


def onnx_version(path: Path) -> str:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}["version"]


def test_versions_count_up_and_publish_records_the_version(tmp_path: Path) -> None:
    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    assert registry.versions(models) == []
    assert registry.next_version(models) == "1"
    target = registry.publish(
        fake_model(tmp_path / "m1", onnx=False),
        models,
        metrics={"accuracy": 0.9},
        training={"training_data_sha256": "abc", "n_train": 3},
    )
    assert target == models / "1"
    assert json.loads((target / "metadata.json").read_text())["version"] == "1"
    assert json.loads((target / "metrics.json").read_text()) == {"accuracy": 0.9}
    assert json.loads((target / "training.json").read_text())["n_train"] == 3
    assert (tmp_path / "m1").exists()  # copied, not moved
    moved = registry.publish(fake_model(tmp_path / "m2", onnx=False), models, move=True)
    assert moved == models / "2" and not (tmp_path / "m2").exists()
    for i in range(3, 11):
        registry.publish(fake_model(tmp_path / f"m{i}", onnx=False), models)
    assert registry.versions(models) == [str(i) for i in range(1, 11)]  # numeric order
    assert registry.next_version(models) == "11"
    with pytest.raises(registry.RegistryError, match="already exists"):
        registry.publish(fake_model(tmp_path / "again", onnx=False), models, version="3")
    with pytest.raises(registry.RegistryError, match="positive integers"):
        registry.publish(fake_model(tmp_path / "bad", onnx=False), models, version="latest")


def test_deploy_switches_current_and_refuses_unexported_versions(tmp_path: Path) -> None:
    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    registry.publish(fake_model(tmp_path / "m1"), models)
    registry.publish(fake_model(tmp_path / "m2", onnx=False), models)
    assert registry.current_version(models) is None
    assert registry.deploy(models, "1") is None
    assert (models / "current").read_text() == "1\n"
    assert registry.current_model_dir(models) == models / "1"
    assert onnx_version(models / "1" / "model.onnx") == "1"  # kept equal to the registry
    with pytest.raises(registry.RegistryError, match=r"missing model\.onnx, tokenizer\.json"):
        registry.deploy(models, "2")
    with pytest.raises(registry.RegistryError, match="not in the registry"):
        registry.deploy(models, "7")
    assert registry.current_version(models) == "1"
    assert [h["version"] for h in registry.history(models)] == ["1"]
    # Only the pointer, the history, the registry lock and version directories: no temporary
    # files left behind.
    assert sorted(p.name for p in models.iterdir()) == [
        ".registry.lock",
        "1",
        "2",
        "current",
        "history.jsonl",
    ]


def test_rollback_goes_to_the_previous_good_version(tmp_path: Path) -> None:
    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    for i in (1, 2, 3, 4):
        registry.publish(fake_model(tmp_path / f"m{i}"), models)
    write_json_atomic(models / "3" / "gate.json", {"promote": False})
    registry.deploy(models, "4")
    previous, now = registry.rollback(models)
    assert (previous, now) == ("4", "2")  # 3 was rejected by the gate: skipped
    assert registry.current_version(models) == "2"
    previous, now = registry.rollback(models, to="4")
    assert (previous, now) == ("2", "4")
    registry.deploy(models, "1")
    with pytest.raises(registry.RegistryError, match=r"from version 1 .*: no older deployable"):
        registry.rollback(models)
    actions = [(h["action"], h["version"], h["previous"]) for h in registry.history(models)]
    assert actions == [
        ("deploy", "4", None),
        ("rollback", "2", "4"),
        ("rollback", "4", "2"),
        ("deploy", "1", "4"),
    ]


def test_switching_to_the_serving_version_writes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``rollback --to 2`` (or ``deploy 2``) while 2 serves: no history row, no log line."""
    models = HomeLayout(tmp_path).create_registry()
    for i in (1, 2):
        registry.publish(fake_model(tmp_path / f"m{i}"), models)
    registry.deploy(models, "2")
    pointer = (models / "current").read_bytes()
    caplog.set_level("INFO", logger="tasks.registry")
    caplog.clear()  # only what the no-op switches log
    assert registry.rollback(models, to="2") == ("2", "2")
    assert registry.deploy(models, "2") == "2"
    assert [h["action"] for h in registry.history(models)] == ["deploy"]
    assert (models / "current").read_bytes() == pointer
    assert "serving version" not in caplog.text


def test_rollback_with_nothing_deployed_says_so(tmp_path: Path) -> None:
    """An empty registry, or one where nothing serves yet: nothing to go back from (no "from
    version none"); ``to`` still serves a version."""
    models = HomeLayout(tmp_path).create_registry()
    for publish_first in (False, True):
        if publish_first:
            registry.publish(fake_model(tmp_path / "m1"), models)
        with pytest.raises(registry.RegistryError) as info:
            registry.rollback(models)
        assert str(info.value) == (
            f"nothing to roll back: no version is deployed in {models} yet, so there is no "
            "earlier one; deploy one with `prompt-capture deploy VERSION` (`prompt-capture "
            "models` lists them)"
        )
        assert registry.current_version(models) is None and registry.history(models) == []
    assert registry.rollback(models, to="1") == (None, "1")


def test_list_models_reports_serving_gate_and_metrics(tmp_path: Path) -> None:
    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    registry.publish(fake_model(tmp_path / "m1"), models, metrics={"accuracy": 0.8})
    registry.publish(fake_model(tmp_path / "m2", onnx=False), models)
    write_json_atomic(models / "2" / "gate.json", {"promote": False})
    registry.publish(fake_model(tmp_path / "m3"), models)
    write_json_atomic(models / "3" / "gate.json", {"promote": True})
    registry.deploy(models, "3")
    entries = {e.version: e for e in registry.list_models(models)}
    assert [e.serving for e in entries.values()] == [False, False, True]
    assert (entries["1"].gate, entries["2"].gate, entries["3"].gate) == (
        None,
        "rejected",
        "promoted",
    )
    assert entries["1"].metrics == {"accuracy": 0.8}
    assert entries["2"].deployable is False and entries["1"].deployable is True
    assert registry.model_labels(models / "1") == ["a", "b"]
    assert [e.candidate for e in entries.values()] == [None, None, None]
    set_candidate(models, "1", mode="canary", share=0.25)
    entries = {e.version: e for e in registry.list_models(models)}
    under_test = entries["1"].candidate
    assert under_test is not None and (under_test.mode, under_test.share) == ("canary", 0.25)
    assert entries["2"].candidate is None and entries["3"].candidate is None


def test_readers_never_see_a_partial_pointer(tmp_path: Path) -> None:
    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    for i in (1, 2):
        registry.publish(fake_model(tmp_path / f"m{i}"), models)
    registry.deploy(models, "1")
    seen: set[str | None] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(registry.current_version(models))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            registry.deploy(models, "2" if i % 2 == 0 else "1")
    finally:
        stop.set()
        reader.join()
    assert seen <= {"1", "2"}
    assert "1" in seen


def test_history_is_rewritten_whole_and_survives_a_torn_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = HomeLayout(tmp_path).create_registry()  # the lock never creates it
    for i in (1, 2):
        registry.publish(fake_model(tmp_path / f"m{i}"), models)
    registry.deploy(models, "2")
    with (models / "history.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"action": "deploy", "vers')  # an append cut short by an older version
    registry.rollback(models, "1")
    assert "line 2 is not a JSON object" in caplog.text
    assert [h["action"] for h in registry.history(models)] == ["deploy", "rollback"]
    lines = (models / "history.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)
