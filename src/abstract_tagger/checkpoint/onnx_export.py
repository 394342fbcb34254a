"""ONNX forms of a checkpoint's classifier, written into the checkpoint directory beside its safetensors:

- `model.onnx`: fp32, exported with `torch.onnx.export` and fused by ONNX Runtime's transformer
  optimizer (attention, embedding + LayerNorm, skip LayerNorm, bias + exact GELU; the GELU
  approximation stays off);
- `model_quantized.onnx`: static int8 (NNCF post-training quantisation, QDQ): the encoder's matmuls
  with int8 weights per channel and int8 activations whose ranges were measured on calibration papers
  (SmoothQuant moves activation outliers into the weights first); embeddings, pooler and classifier
  stay fp32 (quantising them costs accuracy). Made from the plain exported graph, not the fused one:
  ONNX Runtime and OpenVINO each fuse a QDQ graph into their own int8 kernels, which the fused
  contrib ops would hide from OpenVINO.

Neither graph stores weights it shares with `model.safetensors`: those initializers are ONNX external
data pointing at the tensor's bytes inside the safetensors file (its layout is a JSON header, then each
tensor's raw little-endian bytes), with Transpose / Concat / Cast nodes that ONNX Runtime
constant-folds when it loads the session. So an fp16 checkpoint gains only the int8 weights and a few
small tensors, and the fp32 graph computes with exactly the weights torch loads.

Export needs torch, transformers, onnx and nncf; prediction with the graphs needs only onnxruntime or
openvino.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import struct
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from abstract_tagger.checkpoint.format import ONNX_FP32, ONNX_INT8, WEIGHTS_DIGEST_KEY, WEIGHTS_FILE
from abstract_tagger.common.files import file_digest

_SAFETENSORS_DTYPES = {"F16": (np.float16, TensorProto.FLOAT16), "F32": (np.float32, TensorProto.FLOAT)}
# Smaller tensors (biases, LayerNorm weights) are not worth the extra nodes.
_MIN_SHARED = 4096
_OPSET = 17
# Texts per calibration batch: padding to a batch's longest text keeps short batches realistic.
_CALIBRATION_BATCH = 8
# SmoothQuant's migration strength for the matmuls (NNCF's default for transformers: 0.95). Measured
# against the fp32 graph on 600 recent abstracts (OpenVINO, AMD EPYC), at the same speed: on the
# published MiniLM (256 tokens) a logit moved p99 0.247 / max 0.735 at 0.8 against 0.325 / 0.794 at
# the default (0.7: 0.296, 0.85: 0.256, 0.5: 0.475, off: 0.470 / 1.995); on make train's (128 tokens)
# 0.195 / 0.576 against 0.231 / 0.651. Closer int8 logits leave fewer papers near a threshold wrong.
_SMOOTH_QUANT_ALPHA = 0.8


@dataclass(frozen=True)
class _Stored:
    """A tensor inside model.safetensors; `transposed` when the graph uses it transposed."""

    name: str
    dtype: type
    onnx_dtype: int
    shape: tuple[int, ...]
    offset: int
    length: int
    transposed: bool = False


class _Logits(torch.nn.Module):
    """The classifier with plain (input_ids, attention_mask) -> logits, the graph's whole interface."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_fp32(checkpoint: Path, workdir: Path) -> tuple[Path, Path]:
    """(plain, optimised) fp32 graphs, their weights still inline."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    # Eager attention and the TorchScript exporter (dynamo=False) give the graph patterns the ORT
    # optimizer fuses; from the dynamo exporter's graph it fuses no attention (2x slower here).
    model = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager", use_safetensors=True).eval()
    config = model.config
    example = (torch.ones(2, 16, dtype=torch.long), torch.ones(2, 16, dtype=torch.long))
    axes = {"batch", "sequence"}
    with torch.inference_mode(), warnings.catch_warnings():
        # Tracing notes on the mask's padding branch (kv length always equals the mask's here) and on
        # the pooler's [:, 0] index (never negative): both hold for every input of this graph.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            _Logits(model), example, str(workdir / "raw.onnx"), input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": dict(enumerate(sorted(axes))), "attention_mask": dict(enumerate(sorted(axes))),
                          "logits": {0: "batch"}},
            opset_version=_OPSET, dynamo=False,
        )
    options = FusionOptions("bert")
    options.enable_gelu_approximation = False  # the default, stated: exact erf GELU, as trained
    optimized = optimize_model(str(workdir / "raw.onnx"), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, optimization_options=options, opt_level=0)
    optimized.save_model_to_file(str(workdir / "fp32.onnx"))
    return workdir / "raw.onnx", workdir / "fp32.onnx"


def calibration_batches(checkpoint: Path, texts: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """`texts` as the graphs' inputs, tokenised as prediction does (truncated at the checkpoint's length)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return [dict(tokenizer(list(texts[i:i + _CALIBRATION_BATCH]), truncation=True, padding=True, return_tensors="np",
                           return_token_type_ids=False))
            for i in range(0, len(texts), _CALIBRATION_BATCH)]


def quantize_int8(plain: Path, checkpoint: Path, texts: Sequence[str]) -> Path:
    """Static int8 QDQ graph of the plain (unfused) graph, activation ranges calibrated on `texts`.
    On the published MiniLM (2-core Intel Xeon without AMX, 600 abstracts) OpenVINO ran it 2.6x its fp32
    graph, where ONNX Runtime's dynamic int8 ran 1.3x; logits moved p99 0.29 against dynamic's 0.37."""
    if not texts:
        raise ValueError("int8 export needs calibration texts")
    # NNCF reports usage over the network unless told it runs in CI; an export sends nothing (wandb is
    # offline by default too). Its switch is read when nncf is first imported.
    os.environ.setdefault("NNCF_CI", "1")
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    batches = calibration_batches(checkpoint, texts)
    # NNCF draws four progress bars on stdout per export, which a training log need not keep.
    with contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(
            onnx.load(plain), nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches),
            ignored_scope=nncf.IgnoredScope(patterns=[".*/embeddings/.*", ".*/pooler/.*", ".*/classifier/.*"]),
            advanced_parameters=AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=_SMOOTH_QUANT_ALPHA)))
    target = plain.with_name("int8.onnx")
    onnx.save(quantized, target)
    return target


def safetensors_index(path: Path) -> dict[tuple, _Stored]:
    """{(dtype, shape, bytes): where the tensor lies in the file}, each 2-D tensor also transposed."""
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    index = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] not in _SAFETENSORS_DTYPES:
            continue
        dtype, onnx_dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
        begin, end = meta["data_offsets"]
        array = np.frombuffer(blob, dtype, offset=8 + size + begin, count=(end - begin) // np.dtype(dtype).itemsize)
        stored = _Stored(name, dtype, onnx_dtype, tuple(meta["shape"]), 8 + size + begin, end - begin)
        array = array.reshape(stored.shape)
        if array.size >= _MIN_SHARED:
            index[(array.dtype.str, array.shape, array.tobytes())] = stored
            if array.ndim == 2:
                index[(array.dtype.str, array.T.shape, np.ascontiguousarray(array.T).tobytes())] = _Stored(
                    **{**stored.__dict__, "transposed": True})
    return index


def _find(value: np.ndarray, index: dict[tuple, _Stored], dtypes: set[type]) -> list[_Stored] | None:
    """The stored tensors `value` is made of: itself (maybe transposed), or fused attention's q, k, v
    concatenated on the last axis. Only where the stored dtype holds `value` exactly."""
    for dtype in dtypes:
        cast = value.astype(dtype)
        if not np.array_equal(cast.astype(value.dtype), value):
            continue
        for parts in (1, 3):
            if value.shape[-1] % parts:
                continue
            found = [index.get((p.dtype.str, p.shape, np.ascontiguousarray(p).tobytes()))
                     for p in np.split(cast, parts, axis=-1)]
            if all(found):
                return found
    return None


def share_weights(model: onnx.ModelProto, weights: Path) -> tuple[int, int]:
    """Point the fp32 initializers found in `weights` at its bytes, store other large fp32 initializers
    that fp16 holds exactly as fp16 + Cast. Returns (initializers shared, stored as fp16)."""
    index = safetensors_index(weights)
    dtypes = {s.dtype for s in index.values()}
    graph = model.graph
    nodes, kept, external = [], [], {}
    shared = halved = 0
    for init in graph.initializer:
        value = numpy_helper.to_array(init) if init.data_type == TensorProto.FLOAT else None
        found = _find(value, index, dtypes) if value is not None and value.size >= _MIN_SHARED else None
        if found is None:
            if value is not None and value.size >= _MIN_SHARED and np.array_equal(value.astype(np.float16), value):
                kept.append(numpy_helper.from_array(value.astype(np.float16), f"{init.name}::fp16"))
                nodes.append(helper.make_node("Cast", [f"{init.name}::fp16"], [init.name], to=TensorProto.FLOAT))
                halved += 1
            else:
                kept.append(init)
            continue
        shared += 1
        parts = []
        for stored in found:
            name = f"safetensors::{stored.name}"
            if name not in external:
                tensor = TensorProto(name=name, data_type=stored.onnx_dtype, dims=stored.shape,
                                     data_location=TensorProto.EXTERNAL)
                for key, val in (("location", WEIGHTS_FILE), ("offset", stored.offset), ("length", stored.length)):
                    tensor.external_data.add(key=key, value=str(val))
                external[name] = tensor
            if stored.transposed:
                nodes.append(helper.make_node("Transpose", [name], [f"{init.name}::{stored.name}::T"], perm=[1, 0]))
                name = f"{init.name}::{stored.name}::T"
            parts.append(name)
        needs_cast = found[0].onnx_dtype != TensorProto.FLOAT
        out = f"{init.name}::stored" if needs_cast else init.name
        if len(parts) > 1:
            nodes.append(helper.make_node("Concat", parts, [out], axis=-1))
        else:
            nodes.append(helper.make_node("Identity", parts, [out]))
        if needs_cast:
            nodes.append(helper.make_node("Cast", [out], [init.name], to=TensorProto.FLOAT))
    graph.ClearField("initializer")
    graph.initializer.extend([*kept, *external.values()])
    # ONNX wants nodes in topological order: the weight-building nodes first.
    rest = list(graph.node)
    graph.ClearField("node")
    graph.node.extend([*nodes, *rest])
    return shared, halved


@contextlib.contextmanager
def _without_info_logs() -> Iterator[None]:
    """ONNX Runtime's optimizer logs every fusion at INFO, some through the root logger, and NNCF each
    step: most of a train.log. Warnings still show."""
    before = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(before)


def export_onnx(checkpoint: Path, calibration: Sequence[str]) -> dict[str, Path]:
    """Write model.onnx and model_quantized.onnx into `checkpoint`, which must hold model.safetensors and
    the tokenizer; `calibration`: texts like those it will tag (a few hundred training papers), which
    set the int8 graph's activation ranges."""
    checkpoint = Path(checkpoint)
    written = {}
    # The graphs read the weights at fixed byte offsets, and keep the small tensors inline: they are
    # right only beside the very file they were made from, which the backend checks by this digest.
    digest = file_digest(checkpoint / WEIGHTS_FILE)
    with tempfile.TemporaryDirectory() as tmp, _without_info_logs():
        plain, fp32 = export_fp32(checkpoint, Path(tmp))
        int8 = quantize_int8(plain, checkpoint, calibration)
        for name, source in ((ONNX_FP32, fp32), (ONNX_INT8, int8)):
            model = onnx.load(source)
            share_weights(model, checkpoint / WEIGHTS_FILE)
            model.metadata_props.add(key=WEIGHTS_DIGEST_KEY, value=digest)
            onnx.save(model, checkpoint / name)
            written[name] = checkpoint / name
    return written
