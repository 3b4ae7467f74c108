"""Registry files get the process umask's modes, whatever the modes of what was copied or moved
in: an NLU service running as another Unix user reads the model when the umask lets it (022:
everyone, 027: the group), and a 077 umask keeps everything owner-only, consistently."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from capture.files import write_json_atomic
from capture.model_dir import Head
from tasks import registry
from tests.test_registry import fake_model, stub_metadata


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=["umask022", "umask027", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def make_private(root: Path) -> Path:
    """What mkdtemp and a private copy leave: folders 0700, files 0600."""
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o700)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o600)
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o700)
    return root


def modes(root: Path) -> dict[str, int]:
    """{path relative to root: permission bits} of root and everything under it."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return out


def readable_by(root: Path, path: Path, who: str) -> bool:
    """Whether a user in class ``who`` ("group" or "other") can reach and read ``path``."""
    read, search = (stat.S_IRGRP, stat.S_IXGRP) if who == "group" else (stat.S_IROTH, stat.S_IXOTH)
    folder = path.parent
    while True:
        if not folder.stat().st_mode & search:
            return False
        if folder == root:
            break
        folder = folder.parent
    return bool(path.stat().st_mode & read)


def test_everything_the_service_reads_follows_the_umask(tmp_path: Path, umask: int) -> None:
    models = tmp_path / "models"
    models.mkdir(mode=0o777)
    os.chmod(models, 0o777 & ~umask)
    copied = make_private(fake_model(tmp_path / "copied"))
    moved = make_private(fake_model(tmp_path / "moved"))
    (moved / "encoder").mkdir()
    (moved / "encoder" / "config.json").write_text("{}", encoding="utf-8")
    make_private(moved)
    registry.publish(copied, models, metrics={"accuracy": 0.9}, training={"n_train": 3})
    registry.publish(moved, models, move=True, metrics={}, training={})
    write_json_atomic(models / "2" / "gate.json", {"promote": True})
    (models / "2" / "card.md").write_text("# card\n", encoding="utf-8")
    registry.deploy(models, "1")
    registry.deploy(models, "2")
    registry.rollback(models, "1")

    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    found = modes(models)
    expected = {name: dir_mode if (models / name).is_dir() else file_mode for name in found}
    assert found == expected
    for name in (
        "current",
        "history.jsonl",
        "1/metadata.json",
        "1/model.onnx",
        "1/tokenizer.json",
        "1/metrics.json",
        "1/training.json",
        "2/encoder/config.json",
        "2/gate.json",
        "2/card.md",
    ):
        path = models / name
        assert readable_by(models, path, "group") == (umask & 0o050 == 0), name
        assert readable_by(models, path, "other") == (umask & 0o005 == 0), name
    # What the umask allows, spelt out: 022 everyone, 027 the group, 077 the owner only.
    assert modes(models)["1/model.onnx"] == {0o022: 0o644, 0o027: 0o640, 0o077: 0o600}[umask]
    assert modes(models)["1"] == {0o022: 0o755, 0o027: 0o750, 0o077: 0o700}[umask]


class FakeEncoder:
    def save(self, path: str) -> None:
        os.makedirs(path)
        Path(path, "modules.json").write_text("[]", encoding="utf-8")


def test_a_trained_model_directory_is_not_left_private(tmp_path: Path, umask: int) -> None:
    from tasks.train import _write_model_dir

    metadata = stub_metadata("v")
    head = Head(np.zeros((2, 4), np.float32), np.zeros(2, np.float32))
    out = tmp_path / "work" / "candidate-2"
    _write_model_dir(out, FakeEncoder(), head, metadata)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    found = modes(out)
    assert found == {name: dir_mode if (out / name).is_dir() else file_mode for name in found}
    assert set(found) == {".", "encoder", "encoder/modules.json", "head.npz", "metadata.json"}
