"""The fast path (a static-embedding cascade in front of the ONNX model): its format in the
model directory, its build, serving through the classifier and the hot reload."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from capture.classifier import HotReloadingClassifier, ModelLoadError, OnnxClassifier
from capture.fast_path import FastPath
from capture.model_dir import (
    FAST_PATH_FILE,
    FastPathMetadata,
    ModelDirError,
    ModelMetadata,
    fast_path_labels,
)
from capture.pointers import write_pointer
from capture.settings import Settings
from tasks.deploy import export_model
from tasks.fast_path import (
    METRICS_KEY,
    FastPathConfig,
    build_fast_path,
    fast_path_for_serving,
    fit_threshold,
)
from tests.model_fixtures import (  # noqa: F401  (fixtures)
    FIXTURE_LABELS,
    FIXTURE_RECORDS,
    clone_serving_dir,
    exported_model_dir,
    small_model_dir,
)

FAST_VERSION = "fixture-fast"
TRAIN_TEXTS = [text for text, _ in FIXTURE_RECORDS]
# A fixed sentence set: the fixture's texts and new prompts of the same four intents, plus
# prompts of none of them (where the fast path should hand over).
SENTENCES = (
    *TRAIN_TEXTS,
    "will it be sunny in rome tomorrow",
    "add a call with the bank manager to my calendar",
    "what's my balance",
    "play the new taylor swift album",
    "how do I reset my router",
    "tell me a joke about penguins",
    "",
)


def _token_ids(model_dir: Path) -> list[int]:
    """The tokens of the sentence set: the distillation is limited to them (fast tests)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = {i for text in SENTENCES for i in tokenizer.encode(text).ids}
    unknown = tokenizer.token_to_id("[UNK]")
    return sorted(ids | ({unknown} if unknown is not None else set()))


def fixture_jsonl(path: Path) -> Path:
    """The fixture's records as labelled JSONL at ``path``."""
    path.write_text(
        "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in FIXTURE_RECORDS),
        encoding="utf-8",
    )
    return path


def clone_with_fast_path(source: Path, dest: Path, **changes: object) -> Path:
    """:func:`clone_serving_dir` and the fast path's table."""
    clone_serving_dir(source, dest, **changes)  # type: ignore[arg-type]
    shutil.copy2(source / FAST_PATH_FILE, dest / FAST_PATH_FILE)
    return dest


@pytest.fixture(scope="module")
def fast_dir(exported_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The fixture model with a fast path built on the fixture texts (validation: the same)."""
    dest = clone_serving_dir(
        exported_model_dir,
        tmp_path_factory.mktemp("fast") / FAST_VERSION,
        version=FAST_VERSION,
        include_encoder=True,
    )
    report = build_fast_path(
        dest,
        TRAIN_TEXTS,
        TRAIN_TEXTS,
        config=FastPathConfig(pca_dims=32, head_c=(10.0,)),
        token_ids=_token_ids(dest),
    )
    assert report.published, report.reason
    return dest


@pytest.fixture(scope="module")
def full(fast_dir: Path) -> OnnxClassifier:
    return OnnxClassifier(fast_dir)  # fast_path off: the int8 model alone


@pytest.fixture(scope="module")
def cascade(fast_dir: Path) -> OnnxClassifier:
    return OnnxClassifier(fast_dir, fast_path=True)


# The format.


def test_metadata_round_trip_with_and_without_a_fast_path(fast_dir: Path, tmp_path: Path) -> None:
    meta = ModelMetadata.read(fast_dir)
    section = meta.fast_path
    assert section is not None
    assert section.labels == (*FIXTURE_LABELS, "oos")  # the fixture's oos is threshold-only
    assert section.teacher_version == FAST_VERSION and 0.0 < section.threshold <= 1.0
    assert section.embedding_dim == 32 and section.metrics["n_train"] == len(TRAIN_TEXTS)
    again = ModelMetadata.from_dict(json.loads(json.dumps(meta.to_dict())), tmp_path / "m.json")
    assert again == meta
    plain = replace(meta, fast_path=None)
    assert plain.to_dict()["fast_path"] is None  # written as null; an absent key reads as None
    plain.write(tmp_path)
    assert ModelMetadata.read(tmp_path).fast_path is None
    assert FastPathMetadata.from_dict(section.to_dict(), tmp_path) == section


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": 0}, "threshold"),
        ({"labels": []}, "labels"),
        ({"vocab_size": -3}, "vocab_size"),
        ({"created_at": "yesterday"}, "created_at"),
    ],
)
def test_malformed_section_is_refused_naming_the_field(
    fast_dir: Path, tmp_path: Path, change: dict[str, object], field: str
) -> None:
    data = json.loads((fast_dir / "metadata.json").read_text(encoding="utf-8"))
    data["fast_path"].update(change)
    with pytest.raises(ModelDirError, match=f"fast_path field '{field}'"):
        ModelMetadata.from_dict(data, tmp_path / "metadata.json")
    data["fast_path"] = [1, 2]
    with pytest.raises(ModelDirError, match="'fast_path' must be a JSON object"):
        ModelMetadata.from_dict(data, tmp_path / "metadata.json")


def test_fast_path_labels_add_oos_only_when_missing() -> None:
    assert fast_path_labels(("a", "b"), "oos") == ("a", "b", "oos")
    assert fast_path_labels(("a", "oos"), "oos") == ("a", "oos")


def test_fit_threshold_keeps_the_longest_prefix_at_the_target() -> None:
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    agree = np.array([True, True, True, True, False, True])
    assert fit_threshold(confidence, agree, 1.0) == (0.8, 4)
    assert fit_threshold(confidence, agree, 0.8) == (0.6, 6)
    assert fit_threshold(confidence, ~agree, 0.5) is None
    assert fit_threshold(np.array([]), np.array([], dtype=bool), 0.9) is None


# Serving: the cascade.


def test_never_answers_below_its_threshold(fast_dir: Path, full: OnnxClassifier) -> None:
    fast = FastPath.load(fast_dir, ModelMetadata.read(fast_dir), top_k=4)
    assert fast is not None
    probs = fast.predict_proba(list(SENTENCES))
    answers = [fast.predict(text) for text in SENTENCES]
    assert answers == fast.predict_batch(list(SENTENCES))
    for text, row, answer in zip(SENTENCES, probs, answers, strict=True):
        if row.max() < fast.threshold:
            assert answer is None, text
        else:
            assert answer is not None and answer.confidence >= fast.threshold, text
            assert answer.intent == fast.labels[int(row.argmax())]
    assert fast.predict("") is None  # no tokens: handed over
    handed = [t for t, a in zip(SENTENCES, answers, strict=True) if a is None]
    assert handed, "the sentence set must include prompts the fast path hands over"


def test_cascade_equals_the_full_model_where_the_fast_path_is_confident(
    fast_dir: Path, full: OnnxClassifier, cascade: OnnxClassifier
) -> None:
    fast = cascade.fast_path
    assert fast is not None
    answered = 0
    for text in SENTENCES:
        own = fast.predict(text)
        served = cascade.predict(text)
        reference = full.predict(text)
        assert served.intent == reference.intent, text
        if own is not None:
            answered += 1
            assert served == own  # answered by the fast path
        else:
            assert served == reference  # handed to the int8 model, unchanged
    assert answered >= len(TRAIN_TEXTS) // 2
    batch = cascade.predict_batch(list(SENTENCES))
    for text, one in zip(SENTENCES, batch, strict=True):
        own = fast.predict(text)
        # Fast answers are the same in a batch; the int8 model's may differ in the last digits
        # (padding), never in the intent on this set.
        assert one == own if own is not None else one.intent == full.predict(text).intent


def test_a_directory_without_a_fast_path_still_serves(
    exported_model_dir: Path,  # noqa: F811
) -> None:
    plain = OnnxClassifier(exported_model_dir, fast_path=True)
    assert plain.fast_path is None
    assert plain.predict("will it rain in paris tomorrow").intent == "weather"


def test_fast_path_off_by_setting(fast_dir: Path) -> None:
    assert Settings().fast_path is False
    assert OnnxClassifier(fast_dir).fast_path is None


def test_fast_path_of_another_model_is_refused(fast_dir: Path, tmp_path: Path) -> None:
    moved = clone_with_fast_path(fast_dir, tmp_path / "other", version="other")
    with pytest.raises(ModelLoadError, match="teacher_version"):
        OnnxClassifier(moved, fast_path=True)
    assert OnnxClassifier(moved).predict("skip this song").intent == "music"  # off: serves
    (moved / FAST_PATH_FILE).unlink()
    bad = clone_serving_dir(fast_dir, tmp_path / "gone")
    (bad / FAST_PATH_FILE).unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match=r"fast_path\.npz: missing"):
        OnnxClassifier(bad, fast_path=True)


def test_hot_reload_picks_up_a_fast_path(
    exported_model_dir: Path,  # noqa: F811
    fast_dir: Path,
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    clone_serving_dir(exported_model_dir, models / "v1", version="v1")
    clone_with_fast_path(fast_dir, models / FAST_VERSION)
    write_pointer(models, "v1")
    serving = HotReloadingClassifier(models, watch=False, fast_path=True)
    assert serving.classifier.fast_path is None
    write_pointer(models, FAST_VERSION)
    assert serving.reload_now()
    fast = serving.classifier.fast_path
    assert serving.version == FAST_VERSION and fast is not None
    confident = next(t for t in TRAIN_TEXTS if fast.predict(t) is not None)
    assert serving.predict(confident) == fast.predict(confident)
    # A broken fast path in the next version: refused, the fast one keeps serving.
    clone_with_fast_path(fast_dir, models / "v3", version="v3")
    write_pointer(models, "v3")
    assert not serving.reload_now()
    assert serving.version == FAST_VERSION and "teacher_version" in (serving.last_error or "")


def test_serving_the_fast_path_imports_no_torch(fast_dir: Path) -> None:
    code = (
        "import sys; from capture.classifier import OnnxClassifier; "
        "c = OnnxClassifier(sys.argv[1], fast_path=True); c.predict('skip this song'); "
        "heavy = {'torch', 'transformers', 'sentence_transformers', 'sklearn', 'model2vec'} "
        "& set(sys.modules); print(c.fast_path is not None, sorted(heavy))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(fast_dir)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True []"


# The weekly cycle's task, and the export that replaces the model a fast path imitates.


def test_exporting_again_removes_the_fast_path_of_the_previous_model(
    fast_dir: Path, tmp_path: Path
) -> None:
    """The setting off, a new model.onnx of the same quantization (which serving's checks would
    not tell from the old one) comes without the fast path fitted to the old file."""
    target = clone_with_fast_path(fast_dir, tmp_path / FAST_VERSION, include_encoder=True)
    before = ModelMetadata.read(target).fast_path
    assert before is not None
    val = fixture_jsonl(tmp_path / "val.jsonl")
    done = export_model(target, validation_data=val, settings=Settings(fast_path=False))
    assert done.onnx.quantization == before.teacher_quantization  # int8 again
    assert done.onnx.fast_path_removed and done.fast_path is None
    assert ModelMetadata.read(target).fast_path is None
    assert not (target / FAST_PATH_FILE).exists()
    metrics = json.loads((target / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["export"]["fast_path_removed"] is True
    assert metrics[METRICS_KEY]["published"] is False
    assert "removed" in metrics[METRICS_KEY]["reason"]
    served = OnnxClassifier(target, fast_path=True)  # serves the new model alone
    assert served.fast_path is None and served.predict("skip this song").intent == "music"


def test_weekly_task_does_nothing_when_off(fast_dir: Path) -> None:
    settings = Settings(fast_path=False)
    assert fast_path_for_serving.fn(fast_dir, settings=settings, validation_data=None) is None


def test_weekly_task_without_training_data_serves_without_a_fast_path(
    exported_model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    target = clone_serving_dir(exported_model_dir, tmp_path / "v9", version="v9")
    settings = Settings(fast_path=True)
    assert fast_path_for_serving.fn(target, settings=settings, validation_data=None) is None
    assert not (target / FAST_PATH_FILE).exists()


@pytest.mark.slow
def test_weekly_task_builds_over_the_whole_vocabulary(
    exported_model_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    target = clone_serving_dir(
        exported_model_dir, tmp_path / "v8", version="v8", include_encoder=True
    )
    data = fixture_jsonl(tmp_path / "train.jsonl")
    (target / "training.json").write_text(json.dumps({"training_data": str(data)}))
    report = fast_path_for_serving.fn(
        target, settings=Settings(fast_path=True), validation_data=data
    )
    assert report is not None and report.published
    metrics = json.loads((target / "metrics.json").read_text(encoding="utf-8"))
    assert metrics[METRICS_KEY]["threshold"] == report.threshold
    served = OnnxClassifier(target, fast_path=True)
    assert served.fast_path is not None
