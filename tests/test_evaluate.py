"""Metrics from probabilities, temperature and threshold fitting, comparisons, and the CLI."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deployments.cli import app
from tasks.calibration import (
    choose_oos_threshold,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_and_offset,
    softmax,
)
from tasks.evaluate import compare_reports, compute_report, evaluate_model
from tasks.records import Record
from tests.model_fixtures import exported_model_dir, small_model_dir  # noqa: F401
from tests.tiny_data import INTENTS, split, write_jsonl

LABELS = ["a", "b", "oos"]


def test_report_counts_by_hand() -> None:
    probs = np.array(
        [
            [0.90, 0.05, 0.05],  # a -> a
            [0.60, 0.30, 0.10],  # b -> a (error)
            [0.10, 0.80, 0.10],  # b -> b
            [0.40, 0.35, 0.25],  # oos -> below threshold 0.5 -> oos
            [0.20, 0.10, 0.70],  # oos -> oos class
            [0.45, 0.44, 0.11],  # a -> below threshold -> oos (error)
        ]
    )
    truth = ["a", "b", "b", "oos", "oos", "a"]
    r = compute_report(LABELS, probs, truth, oos_threshold=0.5)
    assert r.n == 6
    assert r.accuracy == pytest.approx(4 / 6) and r.joint_accuracy == r.accuracy
    assert r.in_scope_accuracy == pytest.approx(2 / 4)
    assert r.closed_set_accuracy == pytest.approx(3 / 4)  # arg-max over a/b only
    assert r.oos_recall == pytest.approx(1.0)
    assert r.per_intent["a"].precision == pytest.approx(1 / 2)
    assert r.per_intent["a"].recall == pytest.approx(1 / 2)
    assert r.per_intent["b"].recall == pytest.approx(1 / 2)
    assert r.per_intent["oos"].precision == pytest.approx(2 / 3)
    f1 = [0.5, 2 * 1 * 0.5 / 1.5, 2 * (2 / 3) * 1 / (2 / 3 + 1)]
    assert r.macro_f1 == pytest.approx(np.mean(f1))
    assert sorted(r.confusions) == [("a", "oos", 1), ("b", "a", 1)]
    without_oos = compute_report(LABELS, probs[:3], truth[:3])
    assert without_oos.oos_recall is None and without_oos.in_scope_accuracy == pytest.approx(2 / 3)


def test_the_evaluate_line_prints_every_accuracy_as_a_percent_with_2_decimals() -> None:
    from deployments.commands_model import evaluation_line
    from tasks.evaluate import EvalReport

    report = EvalReport(
        n=168,
        accuracy=0.9345238095238095,
        macro_f1=0.91,
        ece=0.0312345,
        in_scope_accuracy=157 / 168,
        closed_set_accuracy=None,
        oos_recall=None,  # no oos row
        joint_accuracy=0.9,
        backend="onnx",
    )
    assert evaluation_line(report) == (
        "n=168 accuracy=93.45% macro_f1=91.00% ece=0.0312 in_scope_accuracy=93.45% "
        "oos_recall=- (onnx)"
    )


def test_ece_by_hand() -> None:
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, True, True, False])
    # bin 0.95: |1.0 - 0.95| * 0.5 ; bin 0.55: |0.5 - 0.55| * 0.5
    assert expected_calibration_error(conf, correct) == pytest.approx(0.05)


def test_temperature_fit_recovers_a_known_temperature_and_lowers_held_out_ece() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3.0, size=(6000, 5))
    true_t = 2.5
    p = softmax(logits / true_t)
    targets = np.array([rng.choice(5, p=row) for row in p])
    t = fit_temperature(logits[:3000], targets[:3000])
    assert t == pytest.approx(true_t, rel=0.1)
    held_logits, held_targets = logits[3000:], targets[3000:]
    raw, cal = softmax(held_logits), softmax(held_logits / t)
    ece_raw = expected_calibration_error(raw.max(1), raw.argmax(1) == held_targets)
    ece_cal = expected_calibration_error(cal.max(1), cal.argmax(1) == held_targets)
    assert ece_cal < 0.03 < ece_raw


def test_temperature_and_offset_recover_a_shifted_class_and_beat_temperature_alone() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3.0, size=(8000, 6))
    true_t, true_beta, column = 1.5, -2.0, 5  # column 5 is predicted far too often
    p = softmax(logits / true_t + true_beta * (np.arange(6) == column))
    targets = np.array([rng.choice(6, p=row) for row in p])
    t, beta = fit_temperature_and_offset(logits[:4000], targets[:4000], column)
    assert t == pytest.approx(true_t, rel=0.1)
    assert beta == pytest.approx(true_beta, abs=0.25)
    held, held_targets = logits[4000:], targets[4000:]
    shifted = held.copy()
    shifted[:, column] += t * beta  # the fold used by training: b[column] += T * beta
    joint = softmax(shifted / t)
    t_only = softmax(held / fit_temperature(logits[:4000], targets[:4000]))
    ece_joint = expected_calibration_error(joint.max(1), joint.argmax(1) == held_targets)
    ece_t_only = expected_calibration_error(t_only.max(1), t_only.argmax(1) == held_targets)
    assert ece_joint < 0.03 and ece_joint < ece_t_only
    # Data with no class shift: the offset stays near zero.
    fair = softmax(logits / true_t)
    fair_targets = np.array([rng.choice(6, p=row) for row in fair])
    assert abs(fit_temperature_and_offset(logits, fair_targets, column)[1]) < 0.2
    with pytest.raises(ValueError, match="column"):
        fit_temperature_and_offset(logits, targets, 6)


def test_oos_threshold_balances_in_scope_and_oos() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.55, 0.45]])
    truth = ["a", "a", "b", "oos", "oos"]
    t = choose_oos_threshold(probs, ["a", "b"], truth, "oos")
    # any threshold in (0.6, 0.7] keeps all in-scope rows and rejects both oos rows
    assert t == pytest.approx(0.7)
    assert choose_oos_threshold(probs[:3], ["a", "b"], truth[:3], "oos") is None


def test_compare_reports_gives_deltas() -> None:
    probs_old = np.array([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    probs_new = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    truth = ["a", "b", "b"]
    old = compute_report(["a", "b"], probs_old, truth)
    new = compute_report(["a", "b"], probs_new, truth)
    cmp = compare_reports(old, new)
    assert cmp.deltas["accuracy"] == pytest.approx(1 / 3)
    assert cmp.deltas["oos_recall"] is None
    assert cmp.per_intent_f1_delta["b"] == pytest.approx(2 / 3)
    assert json.dumps(cmp.to_dict())


def test_bad_file_fails_with_line_and_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hi", "label": "a"}\n{"text": "", "label": "b"}\n', encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--train", str(bad), "--output", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()
    result = runner.invoke(app, ["convert-to-pairs", "--input", str(bad), "--output", "x"])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output


def test_convert_to_pairs_cli(tmp_path: Path) -> None:
    train, _, _ = split()
    src = write_jsonl(tmp_path / "train.jsonl", train)
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(
        app, ["convert-to-pairs", "--input", str(src), "--output", str(out), "--max-pairs", "60"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 60
    assert {r["label"] for r in rows} == set(INTENTS)


def test_cli_train_then_evaluate_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train through the CLI, then ``evaluate --json`` on the new directory, which has no
    model.onnx: the serving latency comes from a temporary export, deleted afterwards."""
    import tempfile

    train, val, test = split()
    runner = CliRunner()
    model = tmp_path / "model"
    result = runner.invoke(
        app,
        [
            "train",
            "--train",
            str(write_jsonl(tmp_path / "train.jsonl", train)),
            "--val",
            str(write_jsonl(tmp_path / "val.jsonl", val)),
            "--output",
            str(model),
            "--seed",
            "1",
            "--max-steps",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((model / "metadata.json").read_text(encoding="utf-8"))
    assert meta["hyperparameters"]["seed"] == 1 and meta["hyperparameters"]["max_steps"] == 4

    data = write_jsonl(tmp_path / "test.jsonl", test)
    before = sorted(p.name for p in model.iterdir())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = runner.invoke(app, ["evaluate", "--model", str(model), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # exactly one JSON object on stdout
    for key in ("accuracy", "macro_f1", "ece", "in_scope_accuracy", "oos_recall", "n"):
        assert isinstance(out[key], float | int), key
    assert out["n"] == len(test) and out["backend"] == "torch"
    assert out["in_scope_accuracy"] >= 0.5  # 6 intents: chance is 1/6
    # Serving latency of what would serve: a temporary export, made, timed and deleted.
    source = out["latency_source"]
    assert source.startswith(("temporary int8 export", "temporary fp32 export")), source
    assert source.endswith(" eval texts") and "parity on " in source, source
    assert 0 < out["latency_ms_p50"] <= out["latency_ms_p99"]
    assert sorted(p.name for p in model.iterdir()) == before  # the directory was not written
    assert list(scratch.iterdir()) == []  # the temporary export is gone

    report = evaluate_model(model, [r for r in test if r.label != "oos"], measure_latency=False)
    assert report.oos_recall is None and report.n == 6

    class Constant:
        labels = meta["labels"]

        def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
            p = np.zeros((len(texts), len(self.labels)))
            p[:, 0] = 1.0
            return p

    first = meta["labels"][0]
    rows = [Record("anything", first), Record("else", meta["labels"][1])]
    fake = evaluate_model(model, rows, predictor=Constant())
    assert fake.accuracy == pytest.approx(0.5) and fake.backend == "custom"


def test_evaluate_uses_the_onnx_model_when_exported(exported_model_dir: Path) -> None:  # noqa: F811
    from tests.model_fixtures import FIXTURE_RECORDS

    rows = [Record(text, label) for text, label in FIXTURE_RECORDS]
    onnx = evaluate_model(exported_model_dir, rows)
    assert onnx.backend == "onnx" and onnx.latency_source == "model.onnx (int8)"
    assert onnx.latency_ms_p50 is not None and onnx.latency_ms_p99 is not None
    assert 0 < onnx.latency_ms_p50 <= onnx.latency_ms_p99
    # Scored with torch, timed on what would serve: the directory's model.onnx.
    torch_report = evaluate_model(exported_model_dir, rows, backend="torch")
    assert torch_report.backend == "torch" and torch_report.latency_source == "model.onnx (int8)"
    assert torch_report.latency_ms_p50 is not None and torch_report.latency_ms_p50 > 0
    assert onnx.n == torch_report.n == len(rows)
    assert abs(onnx.accuracy - torch_report.accuracy) <= 1 / len(rows)
