"""The model directory format (capture/model_dir.py): metadata, head, ONNX props, the pointer."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from capture.errors import UserError
from capture.files import shared_file_mode
from capture.model_dir import (
    ENCODER_DIR,
    HEAD_FILE,
    METADATA_FILE,
    Head,
    ModelDirError,
    ModelMetadata,
    OnnxMetadata,
    read_trained,
)
from capture.pointers import POINTER_FILE, read_pointer, write_pointer

METADATA = ModelMetadata(
    version="20260105T000000Z-0123abcd",
    labels=("banking", "calendar", "oos"),
    oos_label="oos",
    oos_threshold=0.42,
    temperature=1.7,
    base_model="sentence-transformers/all-MiniLM-L6-v2",
    parent_version=None,
    created_at="2026-01-05T00:00:00+00:00",
    hyperparameters={"seed": 0, "loss": "ce+mnrl"},
    metrics={"val": {"accuracy": 0.9}},
    max_seq_length=48,
    embedding_dim=4,
)


def written(tmp_path: Path, **changes: Any) -> Path:
    """A metadata.json with ``changes`` applied to the valid one (``...`` deletes a field)."""
    data = METADATA.to_dict()
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    (tmp_path / METADATA_FILE).write_text(json.dumps(data), encoding="utf-8")
    return tmp_path


def test_metadata_round_trip_keeps_every_field_and_unknown_keys(tmp_path: Path) -> None:
    path = METADATA.write(tmp_path)
    assert path == tmp_path / METADATA_FILE
    assert ModelMetadata.read(tmp_path) == METADATA
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["labels"] == ["banking", "calendar", "oos"]  # a JSON list, as documented
    assert set(data) == {f.name for f in dataclasses.fields(ModelMetadata)} - {"extra"}
    # Shared, like every registry file: the umask's mode, not 0600.
    assert stat.S_IMODE(path.stat().st_mode) == shared_file_mode()

    # Keys the format does not define survive a rewrite (the registry rewrites the version).
    written(tmp_path, train_seconds=12.5)
    again = ModelMetadata.read(tmp_path)
    assert again.extra == {"train_seconds": 12.5}
    dataclasses.replace(again, version="7").write(tmp_path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["version"] == "7" and data["train_seconds"] == 12.5
    assert sorted(p.name for p in tmp_path.iterdir()) == [METADATA_FILE]  # no temporary files


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", ""),
        ("version", ...),
        ("labels", []),
        ("labels", ["a", "a"]),
        ("labels", "banking"),
        ("labels", ["a", 3]),
        ("oos_label", None),
        ("oos_threshold", 1.5),
        ("oos_threshold", "0.3"),
        ("oos_threshold", True),
        ("temperature", 0),
        ("temperature", -1.0),
        ("temperature", ...),
        ("base_model", 3),
        ("parent_version", ""),
        ("created_at", "last tuesday"),
        ("created_at", ...),
        ("hyperparameters", []),
        ("metrics", None),
        ("max_seq_length", 0),
        ("max_seq_length", 48.0),
        ("embedding_dim", "384"),
        ("embedding_dim", True),
    ],
)
def test_each_bad_field_is_refused_naming_file_and_field(
    tmp_path: Path, field: str, value: object
) -> None:
    written(tmp_path, **{field: value})
    with pytest.raises(ModelDirError) as caught:
        ModelMetadata.read(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / METADATA_FILE) in message
    assert f"field {field!r}" in message
    assert ("is missing" if value is ... else "must be") in message
    assert "train the model again" in message  # the fix
    # One base class of user-fixable errors; a ValueError for callers that catch those.
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)


def test_malformed_or_missing_metadata_file(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match=r"metadata\.json: missing; expected a model dir"):
        ModelMetadata.read(tmp_path)
    (tmp_path / METADATA_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelDirError, match=r"metadata\.json: not valid UTF-8 JSON"):
        ModelMetadata.read(tmp_path)
    (tmp_path / METADATA_FILE).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ModelDirError, match=r"metadata\.json: expected a JSON object, found list"):
        ModelMetadata.read(tmp_path)


def test_write_refuses_invalid_metadata_before_writing(tmp_path: Path) -> None:
    bad = dataclasses.replace(METADATA, temperature=float("nan"))
    with pytest.raises(ModelDirError, match="field 'temperature' must be > 0"):
        bad.write(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_onnx_props_round_trip_and_one_parser(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    props = METADATA.onnx_props(quantization="none", extra={"export_agreement": "1.0"})
    assert all(isinstance(v, str) for v in props.values())
    parsed = OnnxMetadata.from_props(props, source)
    assert (parsed.version, parsed.labels, parsed.oos_label) == (
        METADATA.version,
        METADATA.labels,
        "oos",
    )
    assert parsed.oos_threshold == 0.42 and parsed.temperature == 1.7
    assert parsed.quantization == "none" and parsed.props["export_agreement"] == "1.0"

    with pytest.raises(
        ModelDirError, match=r"model\.onnx: metadata_props \['version'\] are missing"
    ):
        OnnxMetadata.from_props({k: v for k, v in props.items() if k != "version"}, source)
    with pytest.raises(ModelDirError, match="metadata_props 'labels' must be JSON"):
        OnnxMetadata.from_props({**props, "labels": "[banking"}, source)
    with pytest.raises(ModelDirError, match="'oos_threshold' must be null or a number in"):
        OnnxMetadata.from_props({**props, "oos_threshold": "2"}, source)
    with pytest.raises(ModelDirError, match="export the model again"):
        OnnxMetadata.from_props({**props, "labels": "[]"}, source)


def test_head_round_trip_and_checks_against_the_metadata(tmp_path: Path) -> None:
    weight = np.arange(12, dtype=np.float64).reshape(3, 4)
    Head(weight, np.ones(3)).write(tmp_path)
    head = Head.read(tmp_path, METADATA)
    assert head.weight.dtype == np.float32 and head.bias.dtype == np.float32
    np.testing.assert_array_equal(head.weight, weight)

    narrow = dataclasses.replace(METADATA, embedding_dim=5)
    with pytest.raises(ModelDirError, match=r"head\.npz: expected W \(3, 5\) and b \(3,\)"):
        Head.read(tmp_path, narrow)
    (tmp_path / HEAD_FILE).write_bytes(b"not a zip file")
    with pytest.raises(ModelDirError, match=r"head\.npz: expected an \.npz with arrays W and b"):
        Head.read(tmp_path, METADATA)


def test_read_trained_names_the_first_missing_part(tmp_path: Path) -> None:
    METADATA.write(tmp_path)
    with pytest.raises(ModelDirError, match=r"head\.npz: missing; a model directory needs"):
        read_trained(tmp_path)
    Head(np.zeros((3, 4)), np.zeros(3)).write(tmp_path)
    with pytest.raises(ModelDirError, match=r"encoder: missing"):
        read_trained(tmp_path)
    (tmp_path / ENCODER_DIR).mkdir()
    metadata, head = read_trained(tmp_path)
    assert metadata == METADATA and head.weight.shape == (3, 4)


def test_pointer_write_and_read(tmp_path: Path) -> None:
    assert read_pointer(tmp_path) is None  # nothing deployed
    path = write_pointer(tmp_path, "3")
    assert path == tmp_path / POINTER_FILE and path.read_text(encoding="utf-8") == "3\n"
    assert stat.S_IMODE(path.stat().st_mode) == shared_file_mode()
    first = read_pointer(tmp_path)
    assert first is not None and first.version == "3"
    write_pointer(tmp_path, "4")
    second = read_pointer(tmp_path)
    assert second is not None and second.version == "4" and second != first
    assert sorted(p.name for p in tmp_path.iterdir()) == [POINTER_FILE]  # no temporary files

    for bad in ("../elsewhere", "", "a/b", ".."):
        with pytest.raises(ModelDirError, match="expected one line naming a version directory"):
            write_pointer(tmp_path, bad)
    unchanged = read_pointer(tmp_path)
    assert unchanged is not None and unchanged.version == "4"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ModelDirError, match=r"current: not UTF-8 text"):
        read_pointer(tmp_path)
    path.write_text("1\n2\n", encoding="utf-8")
    with pytest.raises(ModelDirError, match="expected one line naming a version directory"):
        read_pointer(tmp_path)


def test_pointer_readers_never_see_a_partial_write(tmp_path: Path) -> None:
    write_pointer(tmp_path, "1")
    seen: set[str] = set()
    errors: list[Exception] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                pointer = read_pointer(tmp_path)
            except Exception as exc:  # any failure is the test's finding
                errors.append(exc)
                return
            seen.add(pointer.version if pointer else "<none>")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            write_pointer(tmp_path, "22" if i % 2 == 0 else "1")
    finally:
        stop.set()
        reader.join()
    assert errors == [] and seen <= {"1", "22"}
    assert [p.name for p in tmp_path.iterdir()] == [POINTER_FILE]


def test_registry_refuses_a_model_directory_with_malformed_metadata(tmp_path: Path) -> None:
    from tasks import registry

    (tmp_path / "model").mkdir()
    model = written(tmp_path / "model", labels="banking")
    models = tmp_path / "models"
    with pytest.raises(registry.RegistryError) as caught:
        registry.publish(model, models)
    assert f"{model / METADATA_FILE}: field 'labels' must be" in str(caught.value)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, RuntimeError)
    assert not models.exists() or not any(models.iterdir())  # nothing was copied in


def test_torch_model_refuses_malformed_metadata_before_loading_the_encoder(tmp_path: Path) -> None:
    from tasks.evaluate import TorchModel

    written(tmp_path, oos_threshold=7)
    Head(np.zeros((3, 4)), np.zeros(3)).write(tmp_path)
    (tmp_path / ENCODER_DIR).mkdir()  # empty: loading it would fail differently
    with pytest.raises(ModelDirError, match=r"metadata\.json: field 'oos_threshold' must be"):
        TorchModel.load(tmp_path)
    os.remove(tmp_path / METADATA_FILE)
    with pytest.raises(ModelDirError, match=r"metadata\.json: missing"):
        TorchModel.load(tmp_path)
