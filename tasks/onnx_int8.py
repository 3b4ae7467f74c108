"""Build the int8 serving graph: outlier-channel treatment, then dynamic per-channel quantisation.

int8 dynamic quantisation (per-channel weights, activations quantised per run with one range per
tensor) is built by the recipes of ``INT8_RECIPES``, in order. The few input channels of a MatMul
or attention node whose activations exceed ``OutlierRule.threshold`` on calibration texts (BERT's
layer-norm and GELU outputs have such channels) would set the per-tensor activation range and
cost every other channel its resolution: the first recipe scales them down by a constant and the
matching weight rows up by the same factor (:func:`smooth_outlier_channels`: one elementwise Mul
per input, the function is unchanged); the second splits them off into a small fp32 MatMul
(:func:`split_outlier_channels`). :func:`build_int8` tries the recipes and keeps the first whose
top-1 agreement with the torch model reaches ``min_agreement``.

onnx and onnxruntime are imported inside the functions only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from capture.classifier import input_feeds, onnx_session
from tasks.onnx_graph import Fp32Graph

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

# Nodes whose input channels are treated: input 0 is the activation, input 1 a constant weight
# of shape (input channels, output channels).
OUTLIER_OPS = ("MatMul", "Attention")
# Outlier channels: an input channel whose largest |activation| on calibration texts exceeds the
# threshold is scaled down to it (SmoothQuant-style) or kept in fp32 (LLM.int8()-style), so the
# per-tensor dynamic int8 range of the other channels is not set by a few huge values.
OUTLIER_THRESHOLD = 6.0
MAX_OUTLIER_CHANNELS = 8  # per input
CALIBRATION_TEXTS = 200
_CALIBRATION_BATCH = 32


@dataclass(frozen=True, slots=True)
class OutlierRule:
    """Which input channels count as outliers: those whose calibration peak exceeds
    ``threshold``, at most ``max_channels`` per input (the largest)."""

    threshold: float = OUTLIER_THRESHOLD
    max_channels: int = MAX_OUTLIER_CHANNELS

    def channels(self, peak: np.ndarray) -> list[int]:
        """The outlier channels of one input's per-channel ``peak``, sorted."""
        order = np.argsort(peak)[::-1][: self.max_channels]
        return sorted(int(i) for i in order if peak[i] > self.threshold)


@dataclass(frozen=True, slots=True)
class Int8Recipe:
    """One way to build the int8 file; :func:`build_int8` tries them in order."""

    name: str
    fuse_attention: bool
    outliers: Literal["smooth", "split"]


# Fastest first. Scaling the outlier channels keeps the plain int8 file's latency (attention stays
# fused) and gains most of the lost agreement; splitting them into fp32 MatMuls with attention
# unfused (so the Q/K/V projections are split too) is as accurate or more but slower.
# Measurements: bench/RESULTS.md.
INT8_RECIPES: tuple[Int8Recipe, ...] = (
    Int8Recipe("fused-attention+smoothed", fuse_attention=True, outliers="smooth"),
    Int8Recipe("unfused-attention+split", fuse_attention=False, outliers="split"),
)


@dataclass(frozen=True, slots=True)
class OutlierTreatment:
    """The graph written by :func:`smooth_outlier_channels` or :func:`split_outlier_channels`."""

    path: Path
    fp32_nodes: tuple[str, ...]  # nodes to exclude from quantisation (split only)
    channels: int  # outlier channels over all treated inputs


def activation_ranges(
    model_path: Path, tokenizer: Tokenizer, texts: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per-channel max |activation| of the input of every ``OUTLIER_OPS`` node whose weight is
    a constant, over ``texts`` run through the fp32 graph (the calibration of
    :func:`smooth_outlier_channels` and :func:`split_outlier_channels`)."""
    import onnx

    model = onnx.load(str(model_path))
    weights = {init.name for init in model.graph.initializer}
    names = sorted(
        {n.input[0] for n in model.graph.node if n.op_type in OUTLIER_OPS and n.input[1] in weights}
    )
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    session = onnx_session(model.SerializeToString(), threads=0)
    ranges: dict[str, np.ndarray] = {}
    for start in range(0, len(texts), _CALIBRATION_BATCH):
        feeds = input_feeds(tokenizer, texts[start : start + _CALIBRATION_BATCH])
        real = feeds["attention_mask"].reshape(-1).astype(bool)  # padding positions do not count
        for name, value in zip(names, session.run(names, feeds), strict=True):
            rows = np.abs(value.reshape(-1, value.shape[-1]))
            if rows.shape[0] == real.shape[0]:
                rows = rows[real]
            peak = rows.max(axis=0)
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
    return ranges


def _treatable(
    model: Any, ranges: Mapping[str, np.ndarray], ops: Sequence[str]
) -> Iterator[tuple[Any, np.ndarray | None, Any]]:
    """Every node of ``model``'s graph, in order, as (node, peak, weight): the calibrated peak of
    its input 0 and its constant weight when it is one of ``ops`` with both, else (None, None)."""
    initializers = {init.name: init for init in model.graph.initializer}
    for node in list(model.graph.node):
        peak = ranges.get(node.input[0]) if node.op_type in ops else None
        weight = initializers.get(node.input[1]) if peak is not None else None
        yield node, (None if weight is None else peak), weight


def _save_with_nodes(model: Any, nodes: list[Any], output: Path) -> None:
    import onnx

    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(output))


def smooth_outlier_channels(
    source: Path, output: Path, ranges: Mapping[str, np.ndarray], rule: OutlierRule = OutlierRule()
) -> OutlierTreatment:
    """Rewrite ``Y = X @ W`` as ``Y = (X / s) @ (s * W)`` with ``s = peak / threshold`` on the
    outlier channels of ``X`` and 1 elsewhere (SmoothQuant's migration, applied to outliers only).

    ``X / s`` is one Mul by a constant, shared by every node reading ``X``; ``s * W`` scales rows
    of the constant weight, which per-channel weight quantisation absorbs. Attention nodes are
    treated like MatMuls (their packed Q/K/V weight has one row per input channel). The fp32 graph
    computes the same function up to rounding.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    nodes: list[Any] = []
    scales: dict[str, np.ndarray] = {}
    channels = 0
    for node, peak, weight in _treatable(model, ranges, OUTLIER_OPS):
        if peak is None:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in scales:
            outliers = rule.channels(peak)
            scale = np.ones(len(peak), dtype=np.float32)
            scale[outliers] = peak[outliers] / rule.threshold
            scales[x] = scale
            if outliers:
                channels += len(outliers)
                model.graph.initializer.append(
                    numpy_helper.from_array((1.0 / scale).astype(np.float32), f"{x}__inv_scale")
                )
                nodes.append(
                    helper.make_node(
                        "Mul", [x, f"{x}__inv_scale"], [f"{x}__smoothed"], name=f"{x}__smooth"
                    )
                )
        scale = scales[x]
        if np.all(scale == 1.0):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weight)
        rows_name = f"{node.input[1]}__smoothed__{node.name}"
        model.graph.initializer.append(
            numpy_helper.from_array((w * scale[:, None]).astype(np.float32), rows_name)
        )
        node.input[0] = f"{x}__smoothed"
        node.input[1] = rows_name
        nodes.append(node)
    used = {name for node in nodes for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    _save_with_nodes(model, nodes, output)
    return OutlierTreatment(output, (), channels)


def split_outlier_channels(
    source: Path, output: Path, ranges: Mapping[str, np.ndarray], rule: OutlierRule = OutlierRule()
) -> OutlierTreatment:
    """Rewrite ``Y = X @ W`` as ``(X * inliers) @ W + X[..., outliers] @ W[outliers]``.

    The first MatMul is quantised (its dynamic range no longer includes the outliers, so the
    other channels keep their resolution); the second, a few rows of ``W``, stays fp32. The fp32
    graph computes the same function (the parity check confirms it for the published file).
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    nodes: list[Any] = []
    fp32_nodes: list[str] = []
    split_inputs: dict[str, list[int]] = {}
    for node, peak, weight in _treatable(model, ranges, ("MatMul",)):
        outliers = [] if peak is None else rule.channels(peak)
        if peak is None or not outliers:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in split_inputs:
            keep = np.ones(len(peak), dtype=np.float32)
            keep[outliers] = 0.0
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(keep, f"{x}__inlier_mask"),
                    numpy_helper.from_array(np.array(outliers, np.int64), f"{x}__outlier_idx"),
                ]
            )
            nodes.append(
                helper.make_node(
                    "Mul", [x, f"{x}__inlier_mask"], [f"{x}__inliers"], name=f"{x}__mask"
                )
            )
            nodes.append(
                helper.make_node(
                    "Gather",
                    [x, f"{x}__outlier_idx"],
                    [f"{x}__outliers"],
                    name=f"{x}__gather",
                    axis=-1,
                )
            )
            split_inputs[x] = outliers
        w = numpy_helper.to_array(weight)
        rows_name = f"{node.input[1]}__outlier_rows__{node.name}"
        model.graph.initializer.append(
            numpy_helper.from_array(w[split_inputs[x], :].astype(np.float32), rows_name)
        )
        y = node.output[0]
        side = f"{node.name}__outliers"
        nodes.append(
            helper.make_node(
                "MatMul", [f"{x}__inliers", node.input[1]], [f"{y}__in"], name=f"{node.name}__in"
            )
        )
        nodes.append(
            helper.make_node("MatMul", [f"{x}__outliers", rows_name], [f"{y}__out"], name=side)
        )
        nodes.append(
            helper.make_node("Add", [f"{y}__in", f"{y}__out"], [y], name=f"{node.name}__sum")
        )
        fp32_nodes.append(side)
    _save_with_nodes(model, nodes, output)
    channels = sum(len(v) for v in split_inputs.values())
    return OutlierTreatment(output, tuple(fp32_nodes), channels)


class QuantizerNotesAtDebug(logging.Filter):
    """On the root logger: what the modules under ``package`` (onnxruntime's quantizer) log
    through it (``logging.info`` / ``logging.warning``: a line per tensor, advice to pre-process
    the graph) becomes a DEBUG record, shown only where the root logger shows DEBUG
    (``--verbose``); the parity check judges the int8 file. Other records pass unchanged."""

    def __init__(self, package: Path) -> None:
        super().__init__()
        self.package = package

    def filter(self, record: logging.LogRecord) -> bool:
        if not Path(record.pathname).is_relative_to(self.package):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger().isEnabledFor(logging.DEBUG)


@contextmanager
def quantizer_notes_at_debug() -> Iterator[None]:
    """While inside: :class:`QuantizerNotesAtDebug` on the root logger for onnxruntime's
    quantizer."""
    import onnxruntime.quantization

    notes = QuantizerNotesAtDebug(Path(onnxruntime.quantization.__file__).parent)
    root = logging.getLogger()
    root.addFilter(notes)
    try:
        yield
    finally:
        root.removeFilter(notes)


def quantize_int8(source: Path, output: Path, *, exclude: Sequence[str] = ()) -> None:
    """Dynamic int8 quantisation with per-channel weights (activations quantised at run time);
    the nodes named in ``exclude`` stay fp32. The quantizer's own log lines are DEBUG lines
    (:func:`quantizer_notes_at_debug`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quantizer_notes_at_debug():
        quantize_dynamic(
            str(source),
            str(output),
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


@dataclass(frozen=True, slots=True)
class Int8Outcome:
    """What :func:`build_int8` tried, and the int8 file to publish when a recipe passed."""

    path: Path | None  # the int8 file whose agreement reached min_agreement; None: publish fp32
    recipe: str | None  # the INT8_RECIPES entry of ``path``
    agreement: float | None  # top-1 agreement with torch of the last recipe tried
    max_abs_prob_diff: float | None  # of the last recipe tried
    size_bytes: int | None  # of the last recipe's file
    attempts: tuple[dict[str, object], ...]  # every recipe tried, in order, with its parity
    fallback: str | None  # why fp32 is published instead (None when int8 is, or nothing was tried)


NO_INT8 = Int8Outcome(None, None, None, None, None, (), None)


def _build_recipe(
    recipe: Int8Recipe, graph: Fp32Graph, work: Path, tokenizer: Tokenizer, texts: Sequence[str]
) -> tuple[Path, OutlierTreatment] | None:
    """The int8 file of one recipe, in ``work`` (None when the recipe adds nothing: the graph
    was not fused, so its unfused variant is the same graph)."""
    source = graph.path
    if not recipe.fuse_attention:
        if not graph.fusion.fused:
            return None
        source = work / f"model.fp32-{recipe.name}.onnx"
        graph.optimize_again(source, fuse_attention=False)
    treat = smooth_outlier_channels if recipe.outliers == "smooth" else split_outlier_channels
    ranges = activation_ranges(source, tokenizer, texts)
    treated = treat(source, work / f"model.{recipe.outliers}.onnx", ranges)
    output = work / "model.int8.onnx"
    quantize_int8(treated.path, output, exclude=treated.fp32_nodes)
    return output, treated


def build_int8(
    graph: Fp32Graph,
    work: Path,
    *,
    tokenizer: Tokenizer,
    calibration_texts: Sequence[str],
    agreement_of: Callable[[Path], tuple[float, float]],
    min_agreement: float,
    n_validation: int,
) -> Int8Outcome:
    """Try ``INT8_RECIPES`` in order on the fp32 ``graph``; stop at the first whose
    ``agreement_of`` (top-1 agreement with torch, max probability difference) on the
    ``n_validation`` validation texts reaches ``min_agreement``. Files go to ``work``."""
    attempts: list[dict[str, object]] = []
    last: tuple[float, float, int] | None = None
    for recipe in INT8_RECIPES:
        built = _build_recipe(recipe, graph, work, tokenizer, calibration_texts)
        if built is None:
            continue
        path, treated = built
        agreement, max_diff = agreement_of(path)
        last = (agreement, max_diff, path.stat().st_size)
        attempts.append(
            {
                "recipe": recipe.name,
                "agreement": agreement,
                "max_abs_prob_diff": max_diff,
                "outlier_channels": treated.channels,
            }
        )
        logger.info(
            "int8 (%s) parity: agreement %.4f, max prob diff %.2e", recipe.name, agreement, max_diff
        )
        if agreement >= min_agreement:
            return Int8Outcome(path, recipe.name, *last, tuple(attempts), None)
    tried = ", ".join(f"{a['recipe']} {a['agreement']:.4f}" for a in attempts)
    fallback = (
        f"int8 top-1 agreement with the torch model on {n_validation} validation "
        f"texts is below {min_agreement} ({tried}); published fp32"
    )
    if last is None:
        return Int8Outcome(None, None, None, None, None, tuple(attempts), fallback)
    return Int8Outcome(None, None, *last, tuple(attempts), fallback)
