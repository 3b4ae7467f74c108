"""Training: a tiny real run (6 intents x 8 examples, a few steps) and its model directory."""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.evaluate import (
    EvalReport,
    TorchModel,
    compute_report,
    expected_calibration_error,
    softmax,
)
from tasks.fine_tune import distinct_label_batches, plan_steps
from tasks.pairs import Pair, build_pairs
from tasks.records import Record
from tasks.train import BUNDLED_BASE_NAME, TrainConfig, TrainResult, train_model
from tests.tiny_data import INTENTS, split

TINY = TrainConfig(seed=0, min_steps=6, max_steps=6, batch_size=6, max_seq_length=16, log_every=3)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    train, val, _ = split()
    out = tmp_path_factory.mktemp("models") / "tiny"
    return train_model(train, val, out, config=TINY, progress=False)


def test_model_directory_follows_the_contract(tiny_model: TrainResult) -> None:
    d = tiny_model.model_dir
    assert sorted(p.name for p in d.iterdir()) == ["encoder", "head.npz", "metadata.json"]
    meta = json.loads((d / "metadata.json").read_text(encoding="utf-8"))
    assert meta["labels"] == sorted(INTENTS)  # oos only in val: not a class
    assert meta["oos_label"] == "oos"
    assert isinstance(meta["oos_threshold"], float) and 0.0 <= meta["oos_threshold"] <= 1.0
    assert meta["temperature"] > 0
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", meta["version"])
    assert meta["version"] == tiny_model.version
    assert meta["parent_version"] is None
    assert meta["base_model"] == BUNDLED_BASE_NAME
    assert meta["max_seq_length"] == 16
    assert meta["embedding_dim"] == 384
    assert meta["hyperparameters"] == json.loads(json.dumps(asdict(TINY)))
    val = meta["metrics"]["val"]
    assert val["n"] == 15 and val["oos_recall"] is not None
    assert "val_ece_before_calibration" in meta["metrics"]
    assert meta["created_at"].endswith("+00:00")
    with np.load(d / "head.npz") as head:
        assert head["W"].shape == (6, 384) and head["W"].dtype == np.float32
        assert head["b"].shape == (6,) and head["b"].dtype == np.float32
    assert (d / "encoder" / "modules.json").exists()
    assert tiny_model.steps == 6 and len(tiny_model.history) == 2


def test_predictions_beat_chance_and_follow_the_head_formula(tiny_model: TrainResult) -> None:
    train, _, test = split()
    model = TorchModel.load(tiny_model.model_dir)
    texts = [r.text for r in train]
    probs = model.predict_proba(texts)
    assert probs.shape == (48, 6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    report = compute_report(model.labels, probs, [r.label for r in train])
    assert report.accuracy >= 0.9  # chance is 1/6
    emb = model.embed(texts[:3])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    logits = emb @ model.W.T + model.b
    np.testing.assert_allclose(
        softmax(logits / model.temperature), model.predict_proba(texts[:3]), atol=1e-5
    )
    pred = model.predict(test[0].text)
    assert pred.intent in {*model.labels, "oos"}
    assert len(pred.secondary_intents) == 2
    pred.validate()


def test_temperature_improves_calibration_on_held_out_data(tiny_model: TrainResult) -> None:
    _, _, test = split()
    model = TorchModel.load(tiny_model.model_dir)
    rows = [r for r in test if r.label in model.labels]
    targets = np.array([model.labels.index(r.label) for r in rows])
    logits = model.logits([r.text for r in rows])
    raw, calibrated = softmax(logits), softmax(logits / model.temperature)
    ece_raw = expected_calibration_error(raw.max(axis=1), raw.argmax(axis=1) == targets)
    ece_cal = expected_calibration_error(
        calibrated.max(axis=1), calibrated.argmax(axis=1) == targets
    )
    assert model.temperature != 1.0
    assert ece_cal < ece_raw


def test_warm_start_loads_the_parent_and_records_its_version(
    tiny_model: TrainResult, tmp_path: Path
) -> None:
    train, val, _ = split()
    parent = TorchModel.load(tiny_model.model_dir)
    probe = ["play some relaxing jazz", "cancel the timer"]
    seen: dict[str, Any] = {}

    def capture(encoder: Any) -> None:
        from tasks.evaluate import encode_texts

        seen["emb"] = encode_texts(encoder, probe)

    child = train_model(
        train,
        val,
        tmp_path / "child",
        config=TrainConfig(min_steps=2, max_steps=2, batch_size=6, max_seq_length=16),
        base_model=tiny_model.model_dir,
        progress=False,
        on_encoder_ready=capture,
    )
    np.testing.assert_allclose(seen["emb"], parent.embed(probe), atol=1e-5)
    meta = json.loads((child.model_dir / "metadata.json").read_text(encoding="utf-8"))
    assert meta["parent_version"] == tiny_model.version
    assert meta["base_model"] == BUNDLED_BASE_NAME
    assert meta["version"] != tiny_model.version


def test_given_pairs_replace_the_generated_ones_and_set_the_budget(tmp_path: Path) -> None:
    train, val, _ = split()
    by_label: dict[str, list[str]] = {}
    for record in train:
        by_label.setdefault(record.label, []).append(record.text)
    pairs = [Pair(texts[0], texts[1], label) for label, texts in sorted(by_label.items())][:4]
    config = TrainConfig(min_steps=1, epochs=2.0, batch_size=2, max_seq_length=16)
    result = train_model(
        train, val, tmp_path / "budget", config=config, pairs=pairs, progress=False
    )
    assert result.steps == plan_steps(len(pairs), config) == 4  # 2 passes over 4 pairs of 2
    assert result.steps < plan_steps(len(train), config)  # generated pairs would cost more
    stranger = [Pair("hello there", "hi there", "no-such-intent")]
    with pytest.raises(ValueError, match="pairs: expected pairs whose labels occur"):
        train_model(train, val, tmp_path / "never", config=config, pairs=stranger, progress=False)
    assert not (tmp_path / "never").exists()


def test_refuses_non_empty_output_and_writes_nothing_on_bad_input(tmp_path: Path) -> None:
    train, val, _ = split()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x", encoding="utf-8")
    with pytest.raises(FileExistsError, match="not empty"):
        train_model(train, val, busy, config=TINY, progress=False)
    one_label = [Record("a", "x"), Record("b", "x")]
    with pytest.raises(ValueError, match="at least 2 labels"):
        train_model(one_label, None, tmp_path / "never", config=TINY, progress=False)
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_batches_never_repeat_an_intent_and_use_every_pair_once() -> None:
    records = [Record(f"{lab} {i}", lab) for lab in "abcdefgh" for i in range(6 + ord(lab) % 5)]
    pairs = build_pairs(records, max_pairs=80, seed=0)
    batches = distinct_label_batches(pairs, 5, random.Random(0))
    for batch in batches:
        labels = [p.label for p in batch]
        assert len(labels) == len(set(labels)) and 1 <= len(batch) <= 5
    assert sorted(id(p) for b in batches for p in b) == sorted(id(p) for p in pairs)


def test_confusions_rank_the_nearest_other_classes() -> None:
    from tasks.train import _confusions

    centroids = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    emb = centroids[[0, 0, 1, 1, 2, 2]]
    y = np.array([0, 0, 1, 1, 2, 2])
    ranked = _confusions(emb, y, centroids, ["a", "b", "c"], top=2)
    assert ranked == {"a": ["b", "c"], "b": ["a", "c"], "c": ["a", "b"]}


def test_step_budget_scales_with_data() -> None:
    config = TrainConfig(batch_size=32, epochs=1.0, min_steps=150, max_steps=None)
    assert plan_steps(15_000, config) == 469
    assert plan_steps(1_200, config) == 150  # small data: the floor
    assert plan_steps(15_000, TrainConfig(batch_size=32, epochs=2.0, max_steps=500)) == 500


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="triplet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)


# --------------------------------------------------------------------------------------------
# real CLINC150 runs (slow: minutes on 2 cores; run with `pytest -m slow tests/test_train.py`)

CLINC = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "clinc150"


def _clinc() -> tuple[list[Record], list[Record], list[Record]]:
    from tasks.records import load_records

    if not (CLINC / "train.jsonl").exists():
        pytest.fail(f"CLINC150 not found at {CLINC}: the slow accuracy tests need it")
    return tuple(load_records(CLINC / f"{name}.jsonl") for name in ("train", "val", "test"))  # type: ignore[return-value]


def _test_report(model_dir: Path, test: list[Record]) -> EvalReport:
    model = TorchModel.load(model_dir)
    return compute_report(
        model.labels,
        model.predict_proba([r.text for r in test]),
        [r.label for r in test],
        oos_threshold=model.oos_threshold,
    )


@pytest.mark.slow
def test_clinc150_full_data_meets_the_accuracy_targets(tmp_path: Path) -> None:
    train, val, test = _clinc()
    result = train_model(train, val, tmp_path / "clinc", config=TrainConfig())
    report = _test_report(result.model_dir, test)
    assert report.closed_set_accuracy is not None and report.closed_set_accuracy >= 0.965
    assert report.joint_accuracy >= 0.90
    assert report.ece <= 0.03


@pytest.mark.slow
def test_clinc150_eight_shot_beats_frozen_embeddings_with_logistic_regression(
    tmp_path: Path,
) -> None:
    from bench.accuracy import baseline, few_shot, frozen_embeddings

    train, val, test = _clinc()
    shots = few_shot(train, 8, seed=0)
    emb = frozen_embeddings(sorted({r.text for r in (*shots, *val, *test)}), None)
    frozen = baseline(shots, val, test, emb)
    result = train_model(shots, val, tmp_path / "few", config=TrainConfig())
    report = _test_report(result.model_dir, test)
    assert report.closed_set_accuracy is not None
    assert report.closed_set_accuracy > frozen["closed_set_accuracy"]
    assert report.joint_accuracy > frozen["accuracy"]
