"""The serving classifier (ONNX Runtime, no torch) and its hot reload."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from capture.classifier import (
    HotReloadingClassifier,
    ModelLoadError,
    OnnxClassifier,
    load_serving_classifier,
)
from capture.settings import get_settings
from capture.types import RUNNERS_UP, Classifier, Prediction
from tests.model_fixtures import (  # noqa: F401  (fixtures)
    FIXTURE_LABELS,
    V2_LABELS,
    base_model_path,
    clone_serving_dir,
    exported_model_dir,
    small_model_dir,
    two_version_registry,
)

PROMPTS = (
    "will it be sunny in rome tomorrow",
    "add a call with the bank manager to my calendar",
    "what's my balance",
    "play the new taylor swift album",
)
EXPECTED = ("weather", "calendar", "banking", "music")


@pytest.fixture(scope="module")
def classifier(exported_model_dir: Path) -> OnnxClassifier:  # noqa: F811
    return OnnxClassifier(exported_model_dir)


def write_pointer(models_dir: Path, version: str) -> None:
    """What deploy/rollback do: write a temporary file, then os.replace it onto ``current``."""
    tmp = models_dir / f".current.{version}.tmp"
    tmp.write_text(version + "\n", encoding="utf-8")
    os.replace(tmp, models_dir / "current")


@pytest.fixture
def models_dir(exported_model_dir: Path, tmp_path: Path) -> Path:  # noqa: F811
    """A registry with v1 (the fixture model) and v2 (same weights, renamed labels) serving v1."""
    return two_version_registry(exported_model_dir, tmp_path / "models", "v1", "v2")


# OnnxClassifier


def test_loads_metadata_and_predicts_the_right_intents(classifier: OnnxClassifier) -> None:
    assert isinstance(classifier, Classifier)
    assert classifier.version == "fixture-v1"
    assert classifier.labels == FIXTURE_LABELS
    assert (classifier.oos_label, classifier.oos_threshold) == ("oos", 0.3)
    assert classifier.quantization == "int8-dynamic-per-channel"
    for prompt, expected in zip(PROMPTS, EXPECTED, strict=True):
        prediction = classifier.predict(prompt)
        prediction.validate()
        assert prediction.intent == expected, prompt
        probs = classifier.predict_proba([prompt])[0]
        assert prediction.confidence == pytest.approx(float(probs.max()))
        # The default top_k (1 + RUNNERS_UP): three runners-up, ranked, never the intent.
        assert len(prediction.secondary_intents) == RUNNERS_UP == 3
        names = [name for name, _ in prediction.secondary_intents]
        confs = [conf for _, conf in prediction.secondary_intents]
        assert expected not in names and confs == sorted(confs, reverse=True)
        assert confs[0] <= prediction.confidence
        order = np.argsort(-probs)
        assert names == [FIXTURE_LABELS[i] for i in order[1 : 1 + RUNNERS_UP]]


def test_batch_matches_single_predictions(classifier: OnnxClassifier) -> None:
    texts = [*PROMPTS, "", "x " * 400]
    batch = classifier.predict_batch(texts)
    singles = [classifier.predict(t) for t in texts]
    # int8 activations are quantised per batch, so batch-mates move the numbers a little
    # (enough to flip near-ties such as the nonsense prompt): compare the clear cases.
    n = len(PROMPTS)
    assert [p.intent for p in batch[:n]] == [p.intent for p in singles[:n]] == list(EXPECTED)
    for b, s in zip(batch[:n], singles[:n], strict=True):
        assert b.confidence == pytest.approx(s.confidence, abs=0.05)
    probs = classifier.predict_proba(texts)
    assert probs.shape == (len(texts), 4) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    embeddings = classifier.embed(texts)
    assert embeddings.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
    # Similar prompts are closer than unrelated ones.
    a, b, c = classifier.embed(["is it raining", "will it rain today", "transfer money"])
    assert a @ b > a @ c


def test_empty_inputs_and_bad_types(classifier: OnnxClassifier) -> None:
    assert classifier.predict_batch([]) == []
    assert classifier.predict_proba([]).shape == (0, 4)
    assert classifier.embed([]).shape == (0, 384)
    with pytest.raises(TypeError, match=r"texts\[1\]: expected str, found int"):
        classifier.predict_batch(["ok", 3])  # type: ignore[list-item]


def test_top_k_and_threads(exported_model_dir: Path, classifier: OnnxClassifier) -> None:  # noqa: F811
    one = OnnxClassifier(exported_model_dir, top_k=1, threads=2)
    assert one.threads == 2
    prediction = one.predict(PROMPTS[0])
    assert prediction.secondary_intents == ()
    assert prediction.intent == "weather"
    assert np.allclose(one.predict_proba(PROMPTS), classifier.predict_proba(PROMPTS), atol=1e-5)
    everything = OnnxClassifier(exported_model_dir, top_k=10).predict(PROMPTS[0])
    assert len(everything.secondary_intents) == 3  # all other labels, no more
    with pytest.raises(ValueError, match="threads"):
        OnnxClassifier(exported_model_dir, threads=0)
    # A batch split into length-sorted sub-batches keeps the input order.
    texts = [*PROMPTS, *reversed(PROMPTS), "ok"]
    in_turn = OnnxClassifier(exported_model_dir, sub_batch=2)
    split = in_turn.predict_batch(texts)
    assert [p.intent for p in split[:8]] == [*EXPECTED, *reversed(EXPECTED)]
    # With two threads the sub-batches run side by side: the same sub-batches (int8 activations
    # are quantised per run, so the sub-batches decide the numbers), the same rows and order.
    side_by_side = OnnxClassifier(exported_model_dir, sub_batch=2, threads=2)
    assert side_by_side.predict_batch(texts) == split
    assert np.array_equal(side_by_side.predict_proba(texts), in_turn.predict_proba(texts))
    assert np.array_equal(side_by_side.embed(texts), in_turn.embed(texts))


def test_out_of_scope_below_the_threshold(
    exported_model_dir: Path,  # noqa: F811
    classifier: OnnxClassifier,
    tmp_path: Path,
) -> None:
    texts = [PROMPTS[0], "asdf qwerty zxcv"]
    confident, vague = classifier.predict_proba(texts).max(axis=1)
    assert vague < confident
    threshold = float((confident + vague) / 2)
    strict = OnnxClassifier(
        clone_serving_dir(exported_model_dir, tmp_path / "strict", oos_threshold=threshold)
    )
    assert strict.oos_threshold == pytest.approx(threshold)
    kept, rejected = strict.predict_batch(texts)
    assert kept.intent == "weather" and kept.confidence == pytest.approx(confident)
    assert rejected.intent == "oos"
    assert rejected.confidence == pytest.approx(vague)
    # The best in-scope guess leads the runners-up of an out-of-scope prediction.
    best = FIXTURE_LABELS[int(classifier.predict_proba([texts[1]])[0].argmax())]
    assert rejected.secondary_intents[0][0] == best
    in_scope = [label for label in FIXTURE_LABELS if label != "oos"]
    assert len(rejected.secondary_intents) == min(RUNNERS_UP, len(in_scope))
    never = OnnxClassifier(
        clone_serving_dir(exported_model_dir, tmp_path / "n", oos_threshold=None)
    )
    assert never.oos_threshold is None and never.predict(texts[1]).intent != "oos"


def test_serving_imports_no_torch(exported_model_dir: Path) -> None:  # noqa: F811
    code = (
        "import sys; from capture.classifier import OnnxClassifier; "
        "c = OnnxClassifier(sys.argv[1]); c.predict('hello'); "
        "heavy = {'torch', 'transformers', 'sentence_transformers'} & set(sys.modules); "
        "print(c.version, sorted(heavy))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(exported_model_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "fixture-v1 []"


# Refusing broken model directories.


def corrupt(model_dir: Path, how: str) -> None:
    path = model_dir / "model.onnx"
    if how == "garbage":
        path.write_bytes(os.urandom(4096))
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise AssertionError(how)


def edit_metadata_json(model_dir: Path, **changes: object) -> Path:
    """Change fields of metadata.json only (model.onnx keeps its own metadata)."""
    meta = json.loads((model_dir / "metadata.json").read_text())
    meta.update(changes)
    (model_dir / "metadata.json").write_text(json.dumps(meta))
    return model_dir


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_corrupt_model_file_is_refused_naming_it(
    exported_model_dir: Path,  # noqa: F811
    tmp_path: Path,
    how: str,
) -> None:
    broken = clone_serving_dir(exported_model_dir, tmp_path / "broken")
    corrupt(broken, how)
    with pytest.raises(ModelLoadError, match=r"model\.onnx: ONNX Runtime cannot load it"):
        OnnxClassifier(broken)


def test_inconsistent_or_missing_files_are_refused(
    exported_model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    with pytest.raises(ModelLoadError, match="model directory not found"):
        OnnxClassifier(tmp_path / "nowhere")

    no_tokenizer = clone_serving_dir(exported_model_dir, tmp_path / "no_tok")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: missing"):
        OnnxClassifier(no_tokenizer)

    bad_tokenizer = clone_serving_dir(exported_model_dir, tmp_path / "bad_tok")
    (bad_tokenizer / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: cannot be read"):
        OnnxClassifier(bad_tokenizer)

    fixed_padding = clone_serving_dir(exported_model_dir, tmp_path / "pad128")
    shutil.copy(Path(base_model_path()) / "tokenizer.json", fixed_padding / "tokenizer.json")
    with pytest.raises(ModelLoadError, match="pads every input to 128 tokens"):
        OnnxClassifier(fixed_padding)

    five = [*FIXTURE_LABELS, "extra"]
    wrong_width = clone_serving_dir(exported_model_dir, tmp_path / "width", labels=five)
    with pytest.raises(ModelLoadError, match="has width 4 but the metadata lists 5 labels"):
        OnnxClassifier(wrong_width)

    mixed = edit_metadata_json(
        clone_serving_dir(exported_model_dir, tmp_path / "mixed"), version="someone-else"
    )
    with pytest.raises(ModelLoadError, match=r"metadata\.json: version .* differs"):
        OnnxClassifier(mixed)

    bad_threshold = clone_serving_dir(exported_model_dir, tmp_path / "thr", oos_threshold=1.5)
    with pytest.raises(ModelLoadError, match="'oos_threshold' must be null or a number"):
        OnnxClassifier(bad_threshold)

    # A malformed metadata.json next to a good model.onnx: refused, naming the file and field.
    malformed = edit_metadata_json(
        clone_serving_dir(exported_model_dir, tmp_path / "malformed"), created_at="yesterday"
    )
    with pytest.raises(
        ModelLoadError, match=r"malformed/metadata\.json: field 'created_at' must be an ISO 8601"
    ):
        OnnxClassifier(malformed)
    (malformed / "metadata.json").write_text("{")
    with pytest.raises(ModelLoadError, match=r"metadata\.json: not valid UTF-8 JSON"):
        OnnxClassifier(malformed)


# Hot reload


def test_hot_reload_swaps_under_concurrent_predictions(models_dir: Path) -> None:
    classifier = HotReloadingClassifier(models_dir, interval_s=0.01)
    v1, v2 = set(FIXTURE_LABELS), set(V2_LABELS)
    errors: list[BaseException] = []
    seen: dict[int, list[str]] = {}
    stop = threading.Event()

    def worker(n: int) -> None:
        intents = seen.setdefault(n, [])
        try:
            while not stop.is_set():
                prediction = classifier.predict(PROMPTS[n % len(PROMPTS)])
                prediction.validate()
                intents.append(prediction.intent)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    try:
        assert classifier.version == "v1"
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        write_pointer(models_dir, "v2")
        deadline = time.monotonic() + 30
        while classifier.version != "v2":
            assert time.monotonic() < deadline, "the new version was never loaded"
            time.sleep(0.01)
        time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        classifier.close()
    assert errors == []
    assert classifier.reloads == 1 and classifier.failed_reloads == 0
    assert classifier.labels == tuple(V2_LABELS)
    assert classifier.predict(PROMPTS[0]).intent == "weather_v2"
    for intents in seen.values():
        # Each thread served v1, then v2, and never went back: the swap is atomic.
        assert set(intents) <= v1 | v2
        switch = next(i for i, intent in enumerate(intents) if intent in v2)
        assert switch > 0
        assert set(intents[:switch]) <= v1 and set(intents[switch:]) <= v2


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_new_version_is_refused_and_the_old_one_keeps_serving(
    models_dir: Path,
    exported_model_dir: Path,  # noqa: F811
    how: str,
) -> None:
    broken = clone_serving_dir(exported_model_dir, models_dir / "v3", version="v3")
    good = (broken / "model.onnx").read_bytes()
    corrupt(broken, how)
    classifier = HotReloadingClassifier(models_dir, watch=False)
    write_pointer(models_dir, "v3")
    assert classifier.reload_now() is False
    assert classifier.version == "v1" and classifier.failed_reloads == 1
    assert classifier.last_error is not None and "v3/model.onnx" in classifier.last_error
    assert classifier.predict(PROMPTS[0]).intent == "weather"
    # The same broken pointer is not retried: repairing the files alone changes nothing...
    (broken / "model.onnx").write_bytes(good)
    assert classifier.reload_now() is False
    assert classifier.version == "v1" and classifier.failed_reloads == 1
    # ...until deploy rewrites the pointer.
    write_pointer(models_dir, "v3")
    assert classifier.reload_now() is True
    assert classifier.version == "v3" and classifier.reloads == 1
    assert classifier.last_error is None


def test_pointer_to_a_missing_directory_keeps_the_old_model(models_dir: Path) -> None:
    classifier = HotReloadingClassifier(models_dir, watch=False)
    write_pointer(models_dir, "v9")
    assert classifier.reload_now() is False
    assert classifier.version == "v1" and classifier.failed_reloads == 1
    assert "v9: model directory not found" in (classifier.last_error or "")
    assert classifier.predict(PROMPTS[1]).intent == "calendar"
    # Rolling back to the version in service loads nothing and clears the failure.
    write_pointer(models_dir, "v1")
    assert classifier.reload_now() is False
    assert classifier.reloads == 0
    write_pointer(models_dir, "v2")
    assert classifier.reload_now() is True and classifier.version == "v2"
    assert classifier.stats() == {
        "version": "v2",
        "reloads": 1,
        "failed_reloads": 1,
        "last_error": None,
    }


def test_bad_pointer_contents(models_dir: Path) -> None:
    classifier = HotReloadingClassifier(models_dir, watch=False)
    (models_dir / "current").write_text("../elsewhere\n")
    assert classifier.reload_now() is False
    assert "expected one line naming a version directory" in (classifier.last_error or "")
    (models_dir / "current").unlink()
    assert classifier.reload_now() is False
    assert "current: missing" in (classifier.last_error or "")
    assert classifier.version == "v1" and classifier.failed_reloads == 2
    assert classifier.predict(PROMPTS[2]).intent == "banking"


def test_startup_needs_a_servable_model(models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="current: missing; deploy a model first"):
        HotReloadingClassifier(tmp_path)
    corrupt(models_dir / "v1", "garbage")
    with pytest.raises(ModelLoadError, match=r"v1/model\.onnx"):
        HotReloadingClassifier(models_dir)


def test_background_watch_uses_the_injected_sleep(models_dir: Path) -> None:
    ticks: queue.Queue[float] = queue.Queue()
    go = threading.Event()
    stopping = threading.Event()
    times = iter(range(100, 200))

    def sleep(seconds: float) -> None:
        ticks.put(seconds)
        while not (go.wait(0.01) or stopping.is_set()):
            pass
        go.clear()

    classifier = HotReloadingClassifier(
        models_dir, interval_s=7.0, clock=lambda: float(next(times)), sleep=sleep
    )
    try:
        assert classifier.loaded_at == 100.0
        assert ticks.get(timeout=5) == 7.0  # the watcher waits its interval
        write_pointer(models_dir, "v2")
        assert classifier.version == "v1"  # nothing happens before the interval passes
        go.set()  # the interval passes: one check
        assert ticks.get(timeout=30) == 7.0  # waiting again, after the check
        assert classifier.version == "v2" and classifier.reloads == 1
        assert (classifier.last_check_at, classifier.loaded_at) == (101.0, 102.0)
    finally:
        stopping.set()
        classifier.close()
    assert not any(t.name == "model-hot-reload" and t.is_alive() for t in threading.enumerate())


def test_load_serving_classifier_reads_settings(
    home: Path,
    exported_model_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models = home / "models"
    models.mkdir(parents=True)
    clone_serving_dir(exported_model_dir, models / "7", version="7")
    write_pointer(models, "7")
    monkeypatch.setenv("PROMPT_CAPTURE_ONNX_THREADS", "2")
    get_settings.cache_clear()
    with load_serving_classifier(watch=False) as classifier:
        assert classifier.version == "7" and classifier.threads == 2
        assert isinstance(classifier.predict(PROMPTS[3]), Prediction)
        assert classifier.predict(PROMPTS[3]).intent == "music"


def _batch_in_child(model_dir: Path, texts: list[str], out: Any) -> None:
    out.put([p.intent for p in OnnxClassifier(model_dir, threads=2).predict_batch(texts)])


def test_side_by_side_batches_after_fork(exported_model_dir: Path) -> None:  # noqa: F811
    """A process forked after the parent used the sub-batch pool gets a pool of its own (the
    inherited one has no threads in the child: a batch there would wait forever)."""
    import multiprocessing

    texts = [*PROMPTS, *reversed(PROMPTS), "ok"]
    parent = OnnxClassifier(exported_model_dir, threads=2).predict_batch(texts)
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    child = context.Process(target=_batch_in_child, args=(exported_model_dir, texts, out))
    child.start()
    try:
        assert out.get(timeout=60) == [p.intent for p in parent]
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
