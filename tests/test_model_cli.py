"""``prompt-capture export-onnx``, ``deploy`` and ``rollback`` through the CLI
(``deployments.cli.app``) on the tiny fixture model (tests/model_fixtures.py), in a
PROMPT_CAPTURE_HOME of the test's own."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from capture.classifier import HotReloadingClassifier, OnnxClassifier
from capture.model_dir import QUANTIZATION_INT8, QUANTIZATION_NONE
from capture.pointers import read_candidate, read_pointer
from deployments.cli import app
from tasks.ab_candidate import set_candidate
from tasks.layout import HomeLayout
from tasks.registry import deploy, history, publish
from tests.model_fixtures import (  # noqa: F401  (fixtures)
    FIXTURE_LABELS,
    FIXTURE_RECORDS,
    V2_LABELS,
    clone_serving_dir,
    exported_model_dir,
    onnx_props,
    small_model_dir,
    two_version_registry,
)

RAIN = "will it rain in london tomorrow"


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def said(result: Result) -> str:
    """stdout with the console's line wrapping undone."""
    return " ".join(result.stdout.split())


def error_line(result: Result) -> str:
    """The one ``error:`` line a user error prints on stderr (exit code 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def fixture_val(path: Path) -> Path:
    """The fixture's records as labelled JSONL: in-domain parity texts (the int8 gate passes)."""
    path.write_text(
        "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in FIXTURE_RECORDS),
        encoding="utf-8",
    )
    return path


def registry(exported: Path, home: Path, *extra: str) -> Path:
    """``home/models`` serving version 1 (the exported fixture), with version 2 (labels
    renamed to V2_LABELS) and ``extra`` versions (copies of version 1) beside it."""
    home.mkdir(parents=True, exist_ok=True)
    models = two_version_registry(exported, home / "models", "1", "2")
    for version in extra:
        clone_serving_dir(exported, models / version, version=version)
    return models


@pytest.fixture
def models(exported_model_dir: Path, home: Path) -> Path:  # noqa: F811
    """The test's registry: version 1 serving, version 2 beside it (see ``registry``)."""
    return registry(exported_model_dir, home)


def test_export_onnx_then_deploy_a_registry_version(
    small_model_dir: Path,  # noqa: F811
    models: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    version = publish(small_model_dir, models)  # trained, not exported: version 3
    assert version.name == "3" and not (version / "model.onnx").exists()

    refused = error_line(invoke("deploy", "3"))
    assert "cannot serve: missing model.onnx, tokenizer.json" in refused
    assert f"prompt-capture export-onnx --model {version}" in refused
    assert read_pointer(models).version == "1"  # type: ignore[union-attr]

    caplog.set_level(logging.INFO)  # the console's level
    result = invoke("export-onnx", "--model", version, "--val", fixture_val(tmp_path / "v.jsonl"))
    assert result.exit_code == 0, result.output
    # onnxruntime's quantizer logs a line per tensor through the root logger: DEBUG lines only.
    quantizer = [r for r in caplog.records if "quantization" in Path(r.pathname).parts]
    assert quantizer == [], quantizer[0].getMessage()
    assert "Quantization parameters" not in caplog.text + result.output
    out = said(result)
    assert "exported version 3 to ONNX int8" in out
    for name in ("model.onnx", "tokenizer.json", "metrics.json"):
        assert f"wrote {version / name} (" in result.stdout  # one line each, unwrapped
    assert "parity with the torch model on 24 texts: top-1 agreement" in out
    assert "int8 parity gate passed" in out
    # The files of the model directory format, and the export report beside them.
    props = onnx_props(version / "model.onnx")
    assert props["version"] == "3" and json.loads(props["labels"]) == list(FIXTURE_LABELS)
    assert props["quantization"] == QUANTIZATION_INT8 and props["export_n_validation"] == "24"
    assert (version / "tokenizer.json").is_file()
    export = json.loads((version / "metrics.json").read_text(encoding="utf-8"))["export"]
    assert export["published"] == "int8" and export["n_validation"] == 24
    assert export["agreement"] >= export["min_agreement"] == 0.99
    assert export["fast_path_removed"] is False  # it had none
    assert [p.name for p in version.iterdir() if p.name.startswith(".export-")] == []

    serving = HotReloadingClassifier(models, watch=False)
    try:
        assert serving.version == "1"
        deployed = invoke("deploy", "3")
        assert deployed.exit_code == 0, deployed.output
        assert "now serving version 3 (was 1)" in said(deployed)
        assert serving.reload_now() and serving.version == "3"
        assert serving.predict(RAIN).intent == "weather"
    finally:
        serving.close()


def test_export_onnx_fp32(small_model_dir: Path, home: Path, tmp_path: Path) -> None:  # noqa: F811
    model = shutil.copytree(small_model_dir, tmp_path / "model")
    result = invoke("export-onnx", "--model", model, "--fp32", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    report = out["export"]
    assert out["fast_path"] is None  # off by default
    assert report["published"] == "fp32" and report["quantization"] == QUANTIZATION_NONE
    assert report["int8_agreement"] is None and report["int8_attempts"] == []
    assert report["agreement"] == 1.0 and report["max_abs_prob_diff"] <= 1e-3
    assert onnx_props(model / "model.onnx")["quantization"] == QUANTIZATION_NONE
    saved = json.loads((model / "metrics.json").read_text(encoding="utf-8"))["export"]
    assert saved["published"] == "fp32" and saved["n_validation"] == report["n_validation"]
    classifier = OnnxClassifier(model)
    assert classifier.quantization == QUANTIZATION_NONE
    assert classifier.predict(RAIN).intent == "weather"


def test_export_onnx_refuses_what_is_not_an_exportable_model_dir(
    small_model_dir: Path,  # noqa: F811
    models: Path,
    tmp_path: Path,
) -> None:
    missing = error_line(invoke("export-onnx", "--model", tmp_path / "nowhere"))
    assert "--model" in missing and "no such directory" in missing
    assert "prompt-capture train" in missing

    empty = tmp_path / "empty"
    empty.mkdir()
    line = error_line(invoke("export-onnx", "--model", empty))
    assert f"{empty / 'metadata.json'}: missing" in line
    assert "train or copy a complete model directory first" in line

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "encoder").mkdir()
    shutil.copy2(small_model_dir / "head.npz", broken / "head.npz")
    meta = json.loads((small_model_dir / "metadata.json").read_text(encoding="utf-8"))
    meta["temperature"] = -1
    (broken / "metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    line = error_line(invoke("export-onnx", "--model", broken))
    assert "metadata.json" in line and "'temperature' must be > 0" in line
    assert "fix the file or train the model again" in line
    assert not (broken / "model.onnx").exists()

    # The version that serves keeps the file it serves from.
    before = (models / "1" / "model.onnx").stat().st_mtime_ns
    line = error_line(invoke("export-onnx", "--model", models / "1"))
    assert "version 1 serves" in line and "deploy (or stop testing) another version" in line
    assert (models / "1" / "model.onnx").stat().st_mtime_ns == before


def test_deploy_and_rollback_switch_what_the_classifier_serves(models: Path) -> None:
    serving = HotReloadingClassifier(models, watch=False)
    try:
        assert serving.predict(RAIN).intent == "weather"
        result = invoke("deploy", "2")
        assert result.exit_code == 0, result.output
        assert "now serving version 2 (was 1)" in said(result)
        assert read_pointer(models).version == "2"  # type: ignore[union-attr]
        assert serving.reload_now() and serving.version == "2"
        assert serving.predict(RAIN).intent == "weather_v2" and serving.labels == tuple(V2_LABELS)
        last = history(models)[-1]
        assert (last["action"], last["version"], last["previous"]) == ("deploy", "2", "1")

        again = invoke("deploy", "2")
        assert again.exit_code == 0 and "version 2 serves already; nothing changed" in said(again)
        assert len(history(models)) == 1

        back = invoke("rollback")
        assert back.exit_code == 0, back.output
        assert "now serving version 1 (was 2)" in said(back)
        assert serving.reload_now() and serving.predict(RAIN).intent == "weather"
        assert [h["action"] for h in history(models)] == ["deploy", "rollback"]
    finally:
        serving.close()


def test_deploy_is_refused_while_a_candidate_is_under_test_unless_forced(
    exported_model_dir: Path,  # noqa: F811
    home: Path,
) -> None:
    models = registry(exported_model_dir, home, "3")
    set_candidate(models, "2", mode="shadow")

    line = error_line(invoke("deploy", "3"))
    assert "version 2 is under test as the shadow candidate" in line
    assert "prompt-capture candidate clear" in line and "--force" in line
    assert read_pointer(models).version == "1"  # type: ignore[union-attr]

    # Forced, another version: it serves, and the candidate stays under test beside it.
    forced = invoke("deploy", "3", "--force")
    assert forced.exit_code == 0, forced.output
    assert "now serving version 3 (was 1)" in said(forced)
    assert "candidate 2 stays under test, now beside version 3" in said(forced)
    assert read_pointer(models).version == "3"  # type: ignore[union-attr]
    assert read_candidate(models).version == "2"  # type: ignore[union-attr]

    # Forced, the candidate itself: it serves, and is no longer a candidate.
    promoted = invoke("deploy", "2", "--force")
    assert promoted.exit_code == 0, promoted.output
    assert "candidate 2 is no longer under test: it serves" in said(promoted)
    assert read_pointer(models).version == "2"  # type: ignore[union-attr]
    assert read_candidate(models) is None
    actions = [(h["action"], h["version"]) for h in history(models)]
    assert actions[-3:] == [("deploy", "3"), ("deploy", "2"), ("candidate-promote", "2")]


def test_rollback_is_allowed_while_a_candidate_is_under_test(models: Path) -> None:
    assert invoke("deploy", "2").exit_code == 0
    set_candidate(models, "1", mode="canary", share=0.5)
    # The emergency switch back: the candidate version 1 serves, so its test ends.
    back = invoke("rollback")
    assert back.exit_code == 0, back.output
    assert "now serving version 1 (was 2)" in said(back)
    assert "candidate 1 is no longer under test: it serves" in said(back)
    assert read_candidate(models) is None
    assert [h["action"] for h in history(models)][-2:] == ["rollback", "candidate-clear"]

    # A malformed candidate pointer refuses a deploy (naming the file) but not a rollback.
    (models / "candidate").write_text("{not json", encoding="utf-8")
    line = error_line(invoke("deploy", "2"))
    assert str(models / "candidate") in line and "prompt-capture candidate clear" in line
    assert read_pointer(models).version == "1"  # type: ignore[union-attr]
    assert invoke("deploy", "2", "--force").exit_code == 2  # --force is not for a broken file
    assert invoke("rollback", "--to", "2").exit_code == 0
    assert read_pointer(models).version == "2"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("deploy", "9"), "version 9 is not in the registry"),
        (("deploy", "v2"), "versions are positive integers"),
        (("deploy", "3"), "was rejected by the gate"),
    ],
)
def test_deploy_refusals_name_the_fix(
    exported_model_dir: Path,  # noqa: F811
    home: Path,
    args: tuple[str, ...],
    expected: str,
) -> None:
    models = registry(exported_model_dir, home, "3")
    (models / "3" / "gate.json").write_text(json.dumps({"promote": False}), encoding="utf-8")
    line = error_line(invoke(*args))
    assert expected in line
    if args == ("deploy", "3"):
        assert "pass --allow-rejected to deploy it anyway" in line
        allowed = invoke("deploy", "3", "--allow-rejected")
        assert allowed.exit_code == 0 and read_pointer(models).version == "3"  # type: ignore[union-attr]
    else:
        assert read_pointer(models).version == "1"  # type: ignore[union-attr]


def test_deploy_and_rollback_never_start_a_registry_in_an_empty_home(home: Path) -> None:
    for args in (("deploy", "1"), ("rollback",)):
        line = error_line(invoke(*args))
        assert f"there is no registry at {home / 'models'}" in line
        assert "point PROMPT_CAPTURE_HOME at the home that holds the models" in line
    assert not home.exists()


def test_models_shows_the_candidate_under_test(home: Path, tmp_path: Path) -> None:
    from tests.test_registry import fake_model

    models = HomeLayout(home).create_registry()
    for version in ("1", "2", "3"):
        publish(fake_model(tmp_path / f"m{version}"), models)
    deploy(models, "1")
    set_candidate(models, "3", mode="canary", share=0.125)
    table = invoke("models")
    assert table.exit_code == 0, table.output
    assert status_by_version(table) == {
        "1": "serving",
        "2": "",
        "3": "candidate: canary 12.50% of users",
    }
    listed = {e["version"]: e for e in json.loads(invoke("models", "--json").stdout)}
    assert listed["3"]["candidate"] == {"mode": "canary", "share": 0.125}
    assert listed["1"]["candidate"] is None and listed["1"]["serving"] is True
    set_candidate(models, "2", mode="shadow")
    status = status_by_version(invoke("models"))
    assert (status["2"], status["3"]) == ("candidate: shadow", "")


def status_by_version(result: Result) -> dict[str, str]:
    """The first cell of each version's row in the ``models`` table."""
    rows = [line.split("│") for line in result.stdout.splitlines() if line.startswith("│")]
    return {cells[2].strip(): cells[1].strip() for cells in rows}


@pytest.mark.parametrize(
    "args",
    [
        ("deploy", "1"),
        ("rollback",),
        ("candidate", "set", "1"),
        ("candidate", "clear"),
        ("export-onnx", "--model", "{models}/1"),
    ],
    ids=lambda a: "-".join(p for p in a if "{" not in p),
)
def test_a_busy_registry_gives_up_after_lock_timeout_naming_the_holder(
    home: Path, tmp_path: Path, args: tuple[str, ...]
) -> None:
    """Another run holds the registry: the command waits --lock-timeout seconds, then one
    ``error:`` line naming that run, exit code 1 (nobody's mistake: run it again later)."""
    from tests.test_registry import fake_model
    from tests.test_registry_lock import held_by_another_run

    models = HomeLayout(home).create_registry()
    publish(fake_model(tmp_path / "m1"), models)
    with held_by_another_run(models, "weekly-cycle/busy-run"):
        result = invoke(*[a.format(models=models) for a in args], "--lock-timeout", "0.2")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "the model registry is still locked after" in errors[0]
    assert "(run 'weekly-cycle/busy-run')" in errors[0]
    assert "Traceback" not in result.output
    assert read_pointer(models) is None  # nothing changed
