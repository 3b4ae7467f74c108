"""ONNX export: parity with the torch model, the int8 agreement gate, metadata, tokenizer."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.export_onnx import (
    INT8_RECIPES,
    QUANTIZATION_INT8,
    QUANTIZATION_NONE,
    ExportError,
    ExportReport,
    export_onnx,
)
from tasks.onnx_int8 import (
    OutlierRule,
    QuantizerNotesAtDebug,
    quantize_int8,
    smooth_outlier_channels,
    split_outlier_channels,
)
from tests.model_fixtures import (  # noqa: F401  (fixtures)
    FIXTURE_RECORDS,
    exported_model_dir,
    onnx_props,
    small_model_dir,
)

# Fixed sentences, in-domain and not, short and long (the parity set of these tests).
FIXED = (
    "will it rain in paris on sunday",
    "move the standup to 11am",
    "how much do I have in savings",
    "play something by the beatles",
    "what's the humidity like today",
    "put lunch with ana in my calendar for thursday",
    "I lost my debit card",
    "next track please",
    "",
    "hello there",
    "asdf qwerty zxcv",
    "can you please, if it is not too much trouble, tell me whether I should bring a coat "
    "to the office tomorrow morning because the forecast said it might get cold and windy",
)


@pytest.fixture(scope="module")
def torch_model(small_model_dir: Path):  # noqa: F811
    from tasks.evaluate import TorchModel

    return TorchModel.load(small_model_dir)


@pytest.fixture(scope="module")
def fallback_export(
    small_model_dir: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, ExportReport]:
    """An export whose int8 gate cannot pass (min_agreement 1.01): fp32 must be published."""
    dest = tmp_path_factory.mktemp("fallback") / "model"
    shutil.copytree(small_model_dir, dest)
    report = export_onnx(dest, quantize=True, validation_texts=FIXED, min_agreement=1.01)
    return dest, report


def exported_report(model_dir: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((model_dir / "export_report.json").read_text())
    return data


def test_int8_is_published_when_it_agrees_with_torch(exported_model_dir: Path) -> None:  # noqa: F811
    report = exported_report(exported_model_dir)
    assert report["published"] == "int8"
    assert report["quantization"] == QUANTIZATION_INT8
    assert report["fallback_reason"] is None
    assert report["agreement"] == report["int8_agreement"]
    assert isinstance(report["agreement"], float) and report["agreement"] >= 0.99
    assert report["n_validation"] == len(FIXTURE_RECORDS)
    # Per-channel int8 weights are about a quarter of fp32.
    assert isinstance(report["int8_size_bytes"], int) and isinstance(report["fp32_size_bytes"], int)
    assert report["int8_size_bytes"] < report["fp32_size_bytes"] / 3
    assert (exported_model_dir / "model.onnx").stat().st_size == report["published_size_bytes"]
    # Nothing but the two serving files was added; no temporary directory is left behind.
    names = {p.name for p in exported_model_dir.iterdir()}
    assert names == {
        "encoder",
        "head.npz",
        "metadata.json",
        "model.onnx",
        "tokenizer.json",
        "export_report.json",
    }


def test_metadata_round_trip(exported_model_dir: Path) -> None:  # noqa: F811
    import onnx

    meta = json.loads((exported_model_dir / "metadata.json").read_text())
    props = onnx_props(exported_model_dir / "model.onnx")
    assert (
        json.loads(props["labels"]) == meta["labels"] == ["banking", "calendar", "music", "weather"]
    )
    assert props["version"] == meta["version"]
    assert props["oos_label"] == meta["oos_label"] == "oos"
    assert json.loads(props["oos_threshold"]) == meta["oos_threshold"] == 0.3
    assert json.loads(props["temperature"]) == meta["temperature"]
    assert props["quantization"] == QUANTIZATION_INT8
    assert int(props["max_seq_length"]) == meta["max_seq_length"]
    assert json.loads(props["export_agreement"]) >= 0.99
    assert "export_fallback" not in props

    graph = onnx.load(str(exported_model_dir / "model.onnx")).graph
    inputs = {i.name: i.type.tensor_type for i in graph.input}
    assert set(inputs) == {"input_ids", "attention_mask"}
    for tensor_type in inputs.values():
        assert tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in tensor_type.shape.dim] == ["batch", "sequence"]
    outputs = {o.name: o.type.tensor_type for o in graph.output}
    assert set(outputs) == {"probabilities", "embeddings"}
    prob_dims = outputs["probabilities"].shape.dim
    assert prob_dims[0].dim_param == "batch" and prob_dims[1].dim_value == len(meta["labels"])
    assert outputs["embeddings"].shape.dim[1].dim_value == meta["embedding_dim"]

    # The embedding layer norm and GELU are fused, residual layer norms are not (the faster pair
    # on CPU); with the first int8 recipe attention is fused too (one quantised attention node per
    # encoder layer) and outlier channels are scaled by Mul nodes, with the second they are split
    # into small fp32 MatMuls.
    encoder_config = json.loads((exported_model_dir / "encoder" / "config.json").read_text())
    report = exported_report(exported_model_dir)
    ops = [node.op_type for node in graph.node]
    layers = encoder_config["num_hidden_layers"]
    recipe = json.loads(props["export_int8_recipe"])
    assert recipe == report["int8_recipe"] and recipe in {r.name for r in INT8_RECIPES}
    assert ops.count("QAttention") == (layers if recipe == INT8_RECIPES[0].name else 0)
    assert "SkipLayerNormalization" not in ops
    assert ops.count("LayerNormalization") == 2 * layers and "BiasGelu" in ops
    assert props["export_fused_attention"] == "true"
    attempt = report["int8_attempts"][-1]
    assert attempt["recipe"] == recipe and attempt["outlier_channels"] > 0
    if recipe == "fused-attention+smoothed":
        smoothing = [n for n in graph.node if n.op_type == "Mul" and n.name.endswith("__smooth")]
        assert smoothing, "outlier channels must be scaled before quantisation"
    else:
        fp32_side = [
            n for n in graph.node if n.op_type == "MatMul" and n.name.endswith("__outliers")
        ]
        assert fp32_side, "outlier channels must stay in fp32 MatMuls"


def test_int8_parity_on_fixed_sentences(exported_model_dir: Path, torch_model) -> None:  # noqa: F811
    from capture.classifier import OnnxClassifier

    in_domain = [text for text, _ in FIXTURE_RECORDS] + list(FIXED[:8])
    onnx_probs = OnnxClassifier(exported_model_dir).predict_proba(in_domain)
    torch_probs = torch_model.predict_proba(in_domain)
    assert (onnx_probs.argmax(axis=1) == torch_probs.argmax(axis=1)).all()
    assert np.abs(onnx_probs - torch_probs).max() < 0.1


def test_fp32_fallback_when_the_gate_cannot_pass(fallback_export) -> None:
    model_dir, report = fallback_export
    assert report.published == "fp32"
    assert report.quantization == QUANTIZATION_NONE
    assert report.int8_agreement is not None and report.int8_agreement < 1.01
    assert report.fallback_reason is not None and "below 1.01" in report.fallback_reason
    # Every recipe was built and judged, the split one included, before falling back.
    assert [a["recipe"] for a in report.int8_attempts] == [r.name for r in INT8_RECIPES]
    assert all(0.0 < float(str(a["agreement"])) <= 1.0 for a in report.int8_attempts)
    assert report.published_size_bytes == report.fp32_size_bytes
    assert report.agreement == report.fp32_agreement == 1.0
    props = onnx_props(model_dir / "model.onnx")
    assert props["quantization"] == QUANTIZATION_NONE
    assert "below 1.01" in props["export_fallback"]
    assert (model_dir / "model.onnx").stat().st_size == report.fp32_size_bytes


def test_fp32_parity_with_torch(fallback_export, torch_model) -> None:
    from capture.classifier import OnnxClassifier

    model_dir, report = fallback_export
    assert report.fp32_max_abs_prob_diff < 1e-4
    classifier = OnnxClassifier(model_dir)
    onnx_probs = classifier.predict_proba(FIXED)
    torch_probs = torch_model.predict_proba(FIXED)
    assert onnx_probs.shape == (len(FIXED), 4)
    assert (onnx_probs.argmax(axis=1) == torch_probs.argmax(axis=1)).all()
    assert np.abs(onnx_probs - torch_probs).max() < 1e-4
    embeddings = classifier.embed(FIXED)
    assert np.abs(embeddings - torch_model.embed(FIXED)).max() < 1e-4
    # One at a time (no padding) gives the same numbers as the padded batch.
    single = np.stack([classifier.predict_proba([t])[0] for t in FIXED])
    assert np.abs(single - onnx_probs).max() < 1e-5
    # Length-sorted sub-batches come back in input order with the same numbers.
    small = OnnxClassifier(model_dir, sub_batch=3)
    assert np.abs(small.predict_proba(FIXED) - onnx_probs).max() < 1e-5
    assert np.abs(small.embed(FIXED) - embeddings).max() < 1e-5


def test_tokenizer_pads_to_the_longest_input_and_truncates(exported_model_dir: Path) -> None:  # noqa: F811
    from tokenizers import Tokenizer

    meta = json.loads((exported_model_dir / "metadata.json").read_text())
    tokenizer = Tokenizer.from_file(str(exported_model_dir / "tokenizer.json"))
    assert tokenizer.padding is not None and tokenizer.padding["length"] is None
    assert tokenizer.truncation is not None
    assert tokenizer.truncation["max_length"] == meta["max_seq_length"] == 256
    assert tokenizer.encode("hello").ids == [101, 7592, 102]
    short, long = tokenizer.encode_batch(["hello", "what is the weather in new york today"])
    assert len(short.ids) == len(long.ids) == 10
    assert short.attention_mask == [1, 1, 1] + [0] * 7
    huge = tokenizer.encode("word " * 1000)
    assert len(huge.ids) == 256 and huge.ids[-1] == 102


def test_missing_head_is_refused_naming_the_file(small_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    dest = tmp_path / "model"
    shutil.copytree(small_model_dir, dest, ignore=shutil.ignore_patterns("encoder"))
    (dest / "encoder").mkdir()
    (dest / "head.npz").unlink()
    with pytest.raises(ExportError, match=r"head\.npz: missing"):
        export_onnx(dest)
    assert not (dest / "model.onnx").exists()


def test_head_shape_mismatch_is_refused(small_model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    dest = tmp_path / "model"
    shutil.copytree(small_model_dir, dest, ignore=shutil.ignore_patterns("encoder"))
    (dest / "encoder").mkdir()
    np.savez(dest / "head.npz", W=np.zeros((3, 384), np.float32), b=np.zeros(3, np.float32))
    with pytest.raises(ExportError, match=r"head\.npz: expected W \(4, 384\)"):
        export_onnx(dest)
    meta = json.loads((dest / "metadata.json").read_text())
    meta["temperature"] = 0
    (dest / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="'temperature' must be > 0"):
        export_onnx(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["encoder", "head.npz", "metadata.json"]


def _matmul_graph(weight: np.ndarray) -> bytes:
    import onnx
    from onnx import helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="dense")],
        "dense",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _run_dense(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["y"], {"x": x})[0])


def test_the_quantizer_logs_at_debug_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """onnxruntime's quantizer logs through the root logger (a line per tensor, advice to
    pre-process): DEBUG records while it quantises, so a console at INFO stays clean."""
    source = tmp_path / "dense.onnx"
    source.write_bytes(_matmul_graph(np.ones((8, 4), np.float32)))

    def quantizer_records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "quantization" in Path(r.pathname).parts]

    caplog.set_level(logging.INFO)
    quantize_int8(source, tmp_path / "quiet.onnx")
    assert quantizer_records() == []
    caplog.set_level(logging.DEBUG)
    quantize_int8(source, tmp_path / "verbose.onnx")
    notes = quantizer_records()
    assert notes and {r.levelname for r in notes} == {"DEBUG"}
    assert any("Quantization parameters" in r.getMessage() for r in notes)
    # Only for the quantisation: the root logger keeps no filter, other records pass as they are.
    assert not any(isinstance(f, QuantizerNotesAtDebug) for f in logging.getLogger().filters)
    caplog.clear()
    logging.getLogger().info("not the quantizer")
    assert [r.levelname for r in caplog.records] == ["INFO"]


def test_outlier_split_is_exact_in_fp32_and_sharpens_int8(tmp_path: Path) -> None:

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.1, size=(64, 32)).astype(np.float32)
    x = rng.normal(0, 1.0, size=(200, 64)).astype(np.float32)
    x[:, [3, 40]] *= 40.0  # two outlier channels, as in BERT's layer-norm outputs
    source = tmp_path / "dense.onnx"
    source.write_bytes(_matmul_graph(weight))
    ranges = {"x": np.abs(x).max(axis=0)}
    split = split_outlier_channels(source, tmp_path / "split.onnx", ranges, OutlierRule(6.0))
    assert split.channels == 2 and split.fp32_nodes == ("dense__outliers",)

    exact = x @ weight
    np.testing.assert_allclose(_run_dense(split.path, x), exact, rtol=1e-4, atol=1e-3)
    quantize_int8(source, tmp_path / "plain-int8.onnx")
    quantize_int8(split.path, tmp_path / "split-int8.onnx", exclude=split.fp32_nodes)
    plain_error = np.abs(_run_dense(tmp_path / "plain-int8.onnx", x) - exact).mean()
    split_error = np.abs(_run_dense(tmp_path / "split-int8.onnx", x) - exact).mean()
    assert split_error < plain_error / 3
    # Nothing above the threshold: the graph is left as it was.
    calm = split_outlier_channels(
        source, tmp_path / "calm.onnx", {"x": np.ones(64, np.float32)}, OutlierRule(6.0)
    )
    assert calm.channels == 0 and calm.fp32_nodes == ()


def test_outlier_smoothing_is_exact_in_fp32_and_sharpens_int8(tmp_path: Path) -> None:
    import onnx

    rng = np.random.default_rng(1)
    weight = rng.normal(0, 0.1, size=(64, 32)).astype(np.float32)
    x = rng.normal(0, 1.0, size=(200, 64)).astype(np.float32)
    # Two outlier channels reaching ~25 and a milder third one (~8), as in MiniLM's layer-norm
    # outputs; at most two channels are treated per input.
    x[:, [5, 17]] *= 8.0
    x[:, 60] *= 2.5
    source = tmp_path / "dense.onnx"
    source.write_bytes(_matmul_graph(weight))
    peaks = np.abs(x).max(axis=0)
    smoothed = smooth_outlier_channels(
        source, tmp_path / "smooth.onnx", {"x": peaks}, OutlierRule(threshold=6.0, max_channels=2)
    )
    top_two = sorted(int(i) for i in np.argsort(peaks)[::-1][:2])
    assert smoothed.channels == 2 and smoothed.fp32_nodes == ()
    graph = onnx.load(str(smoothed.path)).graph
    assert [n.op_type for n in graph.node] == ["Mul", "MatMul"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    inv_scale = inits["x__inv_scale"]
    expected = np.ones(64, np.float32)
    expected[top_two] = 6.0 / peaks[top_two]
    np.testing.assert_allclose(inv_scale, expected, rtol=1e-6)
    assert "w" not in inits  # the unscaled weight is no longer used and is dropped

    exact = x @ weight
    np.testing.assert_allclose(_run_dense(smoothed.path, x), exact, rtol=1e-4, atol=1e-3)
    quantize_int8(source, tmp_path / "plain-int8.onnx")
    quantize_int8(smoothed.path, tmp_path / "smooth-int8.onnx")
    plain_error = np.abs(_run_dense(tmp_path / "plain-int8.onnx", x) - exact).mean()
    smooth_error = np.abs(_run_dense(tmp_path / "smooth-int8.onnx", x) - exact).mean()
    # The weight rows of the outlier channels grow by up to ~4x (per-channel weight scales absorb
    # part of it); the activations' int8 step shrinks by as much.
    assert smooth_error < plain_error * 0.75
    calm = smooth_outlier_channels(
        source, tmp_path / "calm.onnx", {"x": np.ones(64, np.float32)}, OutlierRule(6.0)
    )
    assert calm.channels == 0
    assert [n.op_type for n in onnx.load(str(calm.path)).graph.node] == ["MatMul"]
