"""Build the fp32 serving graph: trace the torch model, then fuse it with ONNX Runtime's optimizer.

:func:`export_fp32` traces encoder + mean pooling + L2 normalisation + the linear head
(``capture.model_dir.Head``) + temperature + softmax as one module (eager attention, so the trace
has the plain MatMul/Softmax pattern the optimizer recognises). :func:`optimize_graph` fuses
attention, embedding layer norm and bias GELU (contrib ops: the file is for ONNX Runtime only);
residual Add + LayerNormalization pairs stay unfused (``capture.classifier.DISABLED_OPTIMIZERS``
says why). :func:`read_onnx_metadata` / :func:`set_onnx_metadata` read and replace a file's
``metadata_props`` (the format is ``capture.model_dir.OnnxMetadata``).

torch, transformers, sentence-transformers and onnx are imported inside the functions only.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from capture.errors import UserError
from capture.files import write_bytes_atomic
from capture.model_dir import ENCODER_DIR, INPUT_NAMES, OUTPUT_NAMES, Head, ModelMetadata

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17


class ExportError(UserError, RuntimeError):
    """The model directory cannot be exported (message names the file and the fix)."""


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX file at ``path`` (weights are not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def set_onnx_metadata(path: Path, props: Mapping[str, str]) -> None:
    """Replace the ``metadata_props`` of the ONNX file at ``path`` with ``props``, atomically
    (a reader loads the old file or the new one)."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value
    write_bytes_atomic(path, model.SerializeToString())


def _torch_classifier_module(
    model_dir: Path, metadata: ModelMetadata, head: Head
) -> torch.nn.Module:
    """encoder + mean pooling + L2 normalisation + head + temperature + softmax, as one module."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

    encoder_dir = model_dir / ENCODER_DIR
    st = SentenceTransformer(str(encoder_dir), device="cpu")
    pooling = next((m for m in st if isinstance(m, Pooling)), None)
    mode = pooling.get_config_dict().get("pooling_mode") if pooling is not None else None
    if mode != "mean":
        raise ExportError(
            f"{encoder_dir}: the export supports mean pooling only, found {mode!r}; "
            "train from a mean-pooling sentence-transformers model"
        )
    bert = st[0].auto_model
    if not isinstance(bert, torch.nn.Module):
        raise ExportError(
            f"{encoder_dir}: the first module holds no transformer model; train from a "
            "sentence-transformers model whose first module is a transformer"
        )
    # Eager attention traces to the plain MatMul/Softmax pattern that ONNX Runtime's transformer
    # optimizer fuses into one Attention node (the SDPA trace does not fuse).
    set_attention = getattr(bert, "set_attn_implementation", None)
    if callable(set_attention):
        set_attention("eager")
    encoder: torch.nn.Module = bert.eval()
    weight = torch.from_numpy(head.weight.copy())
    bias = torch.from_numpy(head.bias.copy())

    class _ServingModule(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(weight.shape[1], weight.shape[0])
            with torch.no_grad():
                self.head.weight.copy_(weight)
                self.head.bias.copy_(bias)
            self.inv_temperature = 1.0 / metadata.temperature

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            # Keyword arguments: transformers 5's BertModel breaks tracing when called positionally.
            out = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            )
            hidden = out[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            embeddings = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            logits = self.head(embeddings)
            probabilities = torch.softmax(logits * self.inv_temperature, dim=-1)
            return probabilities, embeddings

    return _ServingModule().eval()


def export_fp32(
    model_dir: Path, metadata: ModelMetadata, head: Head, output: Path, *, opset: int
) -> None:
    """Trace the fp32 ONNX graph of ``model_dir`` into ``output`` (no metadata yet): inputs
    ``INPUT_NAMES``, outputs ``OUTPUT_NAMES``, batch and sequence axes dynamic."""
    import torch

    module = _torch_classifier_module(model_dir, metadata, head)
    # A padded second row, so the traced graph keeps the attention-mask path.
    input_ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.long)
    dynamic = {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and tracer warnings about the
        # transformers mask helpers (constant for an encoder: verified by the parity check).
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
        torch.onnx.export(
            module,
            (input_ids, attention_mask),
            str(output),
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "input_ids": dynamic,
                "attention_mask": dynamic,
                **{name: {0: "batch"} for name in OUTPUT_NAMES},
            },
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )


# Encoder families whose graphs ONNX Runtime's transformer optimizer knows how to fuse.
FUSABLE_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "mpnet": "bert"}


@dataclass(frozen=True, slots=True)
class FusionReport:
    """What :func:`optimize_graph` fused (``fused`` False: the graph was left as exported)."""

    fused: bool
    attention: int
    layers: int
    reason: str | None


def optimize_graph(
    source: Path, output: Path, encoder_dir: Path, *, fuse_attention: bool = True
) -> FusionReport:
    """Fuse the embedding layer norm, GELU and (``fuse_attention``) attention with ONNX Runtime's
    optimizer.

    One ``Attention`` node per layer replaces about 20 small ops and quantises whole
    (``QAttention``); without it the Q/K/V projections stay plain MatMuls, which
    ``tasks.onnx_int8.split_outlier_channels`` can treat. Residual Add + LayerNormalization
    pairs are left unfused: see ``capture.classifier.DISABLED_OPTIMIZERS``. An encoder the
    optimizer does not know, or a graph where not every layer fused, is copied unchanged (the
    report says why): the parity check judges the published file either way.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        config = json.loads((encoder_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(
            f"{encoder_dir / 'config.json'}: cannot be read ({exc}); the encoder directory is "
            "incomplete: train or copy the model directory again"
        ) from exc
    model_type = FUSABLE_MODEL_TYPES.get(str(config.get("model_type")))
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    layers = int(config.get("num_hidden_layers") or 0)
    reason: str | None = None
    if model_type is None:
        reason = f"no fusion rules for model_type {config.get('model_type')!r}"
    elif not isinstance(heads, int) or not isinstance(hidden, int):
        reason = "config.json lacks num_attention_heads / hidden_size"
    if reason is None:
        options = FusionOptions(model_type)
        options.enable_attention = fuse_attention
        options.enable_skip_layer_norm = False
        options.enable_bias_skip_layer_norm = False
        optimized = optimize_model(
            str(source),
            model_type=model_type,
            num_heads=int(heads),
            hidden_size=int(hidden),
            optimization_options=options,
            opt_level=1,
            use_gpu=False,
        )
        attention = int(optimized.get_fused_operator_statistics().get("Attention", 0))
        if attention == (layers if fuse_attention else 0):
            optimized.save_model_to_file(str(output))
            return FusionReport(True, attention, layers, None)
        reason = f"{attention} of {layers} attention blocks fused"
    logger.warning("%s: graph left unfused (%s)", source, reason)
    shutil.copyfile(source, output)
    return FusionReport(False, 0, layers, reason)


@dataclass(frozen=True, slots=True)
class Fp32Graph:
    """The fp32 serving graph of a model directory, built in a work folder by
    :func:`build_fp32`."""

    path: Path  # the optimised graph: the fp32 candidate and the source of the int8 recipes
    traced: Path  # the graph as traced, before fusion
    fusion: FusionReport
    encoder_dir: Path

    def optimize_again(self, output: Path, *, fuse_attention: bool) -> FusionReport:
        """Fuse the traced graph again into ``output`` with other options."""
        return optimize_graph(self.traced, output, self.encoder_dir, fuse_attention=fuse_attention)


def build_fp32(
    model_dir: Path, metadata: ModelMetadata, head: Head, work: Path, *, opset: int
) -> Fp32Graph:
    """Trace ``model_dir`` and fuse the graph; both files are written to ``work``."""
    traced = work / "model.traced.onnx"
    fused = work / "model.fp32.onnx"
    export_fp32(model_dir, metadata, head, traced, opset=opset)
    encoder_dir = model_dir / ENCODER_DIR
    return Fp32Graph(fused, traced, optimize_graph(traced, fused, encoder_dir), encoder_dir)
