"""Training: the default recipe, the device rule, and a tiny real run (6 intents x 8 examples, a
few steps) and its model directory."""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.calibration import expected_calibration_error, softmax
from tasks.evaluate import EvalReport, TorchModel, compute_report
from tasks.fine_tune import epochs_for, plan_steps, text_batches
from tasks.pairs import Pair
from tasks.records import Record
from tasks.train import BUNDLED_BASE_NAME, TrainConfig, TrainResult, train_model
from tasks.train_inputs import TrainConfigError, resolve_device
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
    assert sorted(meta["metrics"]["val_heads"]) == ["cosine", "ensemble", "logreg"]
    assert meta["metrics"]["device"] == "cpu" and meta["metrics"]["fine_tune_texts"] == 48
    published = tiny_model.candidate_heads["ensemble"]  # the default head
    with np.load(d / "head.npz") as head:
        np.testing.assert_array_equal(head["W"], published.head.weight)
        np.testing.assert_array_equal(head["b"], published.head.bias)
    assert meta["temperature"] == published.temperature


def test_word_embeddings_stay_frozen_and_the_ensemble_averages_both_heads(
    tiny_model: TrainResult,
) -> None:
    from tasks.evaluate import bundled_base_model, load_encoder

    def word_embeddings(path: str) -> np.ndarray:
        encoder = load_encoder(path)
        (matrix,) = [p for n, p in encoder.named_parameters() if "word_embeddings" in n]
        return matrix.detach().numpy()

    np.testing.assert_array_equal(
        word_embeddings(str(tiny_model.model_dir / "encoder")),
        word_embeddings(bundled_base_model()),
    )
    heads = tiny_model.candidate_heads
    cos, lr, ens = heads["cosine"].head, heads["logreg"].head, heads["ensemble"].head
    # ensemble = (cos / T_cos + lr / T_lr) / 2 with positive temperatures: a positive mix of both
    a = np.linalg.lstsq(
        np.stack([cos.weight.ravel(), lr.weight.ravel()], axis=1), ens.weight.ravel(), rcond=None
    )[0]
    assert (a > 0).all()
    np.testing.assert_allclose(a[0] * cos.weight + a[1] * lr.weight, ens.weight, atol=1e-4)


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
    # The LR head of the same run, raw: the published ensemble mixes heads already divided by
    # their temperatures, so its own temperature has little left to correct on this tiny set.
    lr = tiny_model.candidate_heads["logreg"]
    logits = model.embed([r.text for r in rows]) @ lr.head.weight.T + lr.head.bias
    raw, calibrated = softmax(logits), softmax(logits / lr.temperature)
    ece_raw = expected_calibration_error(raw.max(axis=1), raw.argmax(axis=1) == targets)
    ece_cal = expected_calibration_error(
        calibrated.max(axis=1), calibrated.argmax(axis=1) == targets
    )
    assert lr.temperature != 1.0 and model.temperature > 0
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

    one_each = list({r.label: r for r in train}.values())  # one example per intent is enough
    child = train_model(
        one_each,
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
    assert meta["metrics"]["train_examples"] == len(INTENTS) == 6


def test_given_pairs_replace_the_training_texts_and_set_the_budget(tmp_path: Path) -> None:
    train, val, _ = split()
    by_label: dict[str, list[str]] = {}
    for record in train:
        by_label.setdefault(record.label, []).append(record.text)
    pairs = [Pair(texts[0], texts[1], label) for label, texts in sorted(by_label.items())][:4]
    config = TrainConfig(epochs=2.0, few_shot_epochs=2.0, batch_size=2, max_seq_length=16)
    result = train_model(
        train, val, tmp_path / "budget", config=config, pairs=pairs, progress=False
    )
    assert result.metrics["fine_tune_texts"] == 8  # the pairs' 8 distinct texts, not 48 rows
    assert result.steps == plan_steps(8, 6, config) == 8  # 2 passes over 8 texts in 2s
    assert result.steps < plan_steps(len(train), 6, config)
    assert result.metrics["train_examples"] == len(train)  # the head still sees every row
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


def test_each_pass_uses_every_text_once_in_length_sorted_batches() -> None:
    texts = [f"text {'x' * (i % 7)} {i}" for i in range(50)]
    batches = text_batches(texts, 8, 7, random.Random(0))  # one pass: 50 texts = 6 x 8 + 2
    assert [len(b) for b in batches].count(8) == 6 and sorted(map(len, batches))[0] == 2
    assert sorted(i for b in batches for i in b) == list(range(50))
    for batch in batches:
        lengths = [len(texts[i]) for i in batch]
        assert lengths == sorted(lengths)
    assert len(text_batches(texts, 8, 20, random.Random(0))) == 20  # passes repeat as needed
    lone = text_batches(["a", "b", "c"], 2, 5, random.Random(0))
    assert all(len(b) == 2 for b in lone)  # a batch of one text is dropped
    with pytest.raises(ValueError, match="at least two training texts"):
        text_batches(["a"], 2, 1, random.Random(0))


def test_the_default_recipe() -> None:
    config = TrainConfig()
    assert (config.epochs, config.few_shot_epochs, config.few_shot_examples) == (2.0, 8.0, 8)
    assert (config.batch_size, config.learning_rate, config.warmup_ratio) == (64, 1e-4, 0.1)
    assert (config.min_steps, config.max_steps, config.max_pairs) == (0, None, None)
    assert config.freeze_word_embeddings is True
    assert (config.label_smoothing, config.scale) == (0.0, 20.0)
    assert (config.head, config.head_c) == ("ensemble", 10.0)
    assert (config.calibrate, config.calibrate_oos_offset, config.oos_as_class) == (
        True,
        True,
        True,
    )
    assert config.device == "auto" and config.torch_threads is None


def test_step_budget_two_passes_and_more_with_few_examples_per_intent() -> None:
    config = TrainConfig()
    assert plan_steps(15_100, 151, config) == 472  # CLINC150 full: 2 passes of 236 batches
    assert plan_steps(8_995, 64, config) == 282  # HWU64 full
    assert epochs_for(8 * 151, 151, config) == 8.0  # 8 per intent: 8 passes
    assert plan_steps(8 * 151, 151, config) == 152
    assert plan_steps(8 * 64, 64, config) == 64
    assert epochs_for(16 * 64, 64, config) == 4.0  # in between: 64 passes per intent
    assert epochs_for(32 * 64, 64, config) == 2.0
    assert epochs_for(3, 3, config) == 8.0  # never more than few_shot_epochs
    assert plan_steps(8_995, 64, TrainConfig(max_steps=100)) == 100
    assert plan_steps(100, 64, TrainConfig(min_steps=10, epochs=1.0, few_shot_epochs=1.0)) == 10
    assert plan_steps(100, 2, TrainConfig(epochs=1.0, few_shot_epochs=1.0)) == 2


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="head: expected 'logreg', 'cosine' or 'ensemble'"):
        TrainConfig(head="mlp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device: expected 'auto', 'cpu' or 'cuda', found 'gpu'"):
        TrainConfig(device="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="epochs and few_shot_epochs"):
        TrainConfig(epochs=4.0, few_shot_epochs=2.0)


def test_device_auto_is_cuda_only_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(TrainConfigError) as info:
        resolve_device("cuda")
    assert str(info.value).startswith(
        "device: 'cuda' was asked but torch.cuda.is_available() is False (torch "
    )
    assert str(info.value).endswith(
        "; use device 'auto' or 'cpu', or install a CUDA build of torch on a machine with a "
        "visible GPU"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda") == "cuda"


def test_cuda_without_cuda_is_refused_before_anything_is_loaded_or_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train, val, _ = split()
    with pytest.raises(TrainConfigError, match="device: 'cuda' was asked"):
        train_model(train, val, tmp_path / "never", config=TrainConfig(device="cuda"))
    assert not (tmp_path / "never").exists()


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
