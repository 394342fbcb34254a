"""Prediction options: their names, their defaults (`predict_defaults.yaml`, shipped in the package),
their checks, and the choice of backend. Shared by predict.py and the Python API, so both accept and
refuse the same values. Imports common and checkpoint (its format); never torch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from abstract_tagger.checkpoint.format import ONNX_FP32, ONNX_INT8, CheckpointError
from abstract_tagger.common.config import fraction, is_number, plain, positive, require
from abstract_tagger.common.cpu import cpu_has_amx, cpu_has_native_bf16

log = logging.getLogger(__name__)

BACKENDS = ("auto", "openvino", "onnx", "torch")
# The backends that run the checkpoint's ONNX graphs (OpenVINO, ONNX Runtime) on the CPU, without torch.
GRAPH_BACKENDS = ("openvino", "onnx")
# Per backend (torch: autocast dtypes; graphs: the fp32 graph or the int8 one, and on OpenVINO the fp32
# graph with its matmuls in bf16); auto: the backend's best.
TORCH_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ONNX_PRECISIONS = ("auto", "fp32", "int8")
OPENVINO_PRECISIONS = ("auto", "fp32", "bf16", "int8")
BACKEND_PRECISIONS = {"torch": TORCH_PRECISIONS, "onnx": ONNX_PRECISIONS, "openvino": OPENVINO_PRECISIONS}
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
# The one home of the prediction defaults, shipped in the package: the Python API reads it, and
# predict.py's config (conf/predict.yaml) takes it in through Hydra's search path.
DEFAULTS_FILE = Path(__file__).with_name("predict_defaults.yaml")

# The options predict.py and the Python API (Tagger, predict_file) share; both check them here.
PREDICT_OPTIONS = ("backend", "precision", "batch_size", "chunk_size", "max_chars", "top_k", "num_threads",
                   "threshold", "recheck_margin", "on_error")


def check_predict_options(options: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first of `options` (some of PREDICT_OPTIONS, plain values) that
    cannot work: a negative batch size would leave rows of uninitialised scores, top_k=-1 would drop
    the last tag, a threshold over 1 or NaN would tag nothing."""
    unknown = sorted(set(options) - set(PREDICT_OPTIONS))
    if unknown:
        raise TypeError(f"unknown prediction option(s) {unknown}; expected some of {PREDICT_OPTIONS}")
    for key in ("chunk_size", "max_chars"):
        if key in options:
            positive(key, options[key], integer=True)
    for key in ("batch_size", "top_k", "num_threads"):
        if key in options:
            positive(key, options[key], integer=True, allow_none=True)
    if "threshold" in options:
        fraction("threshold", options["threshold"], allow_none=True)
    checks = {"backend": BACKENDS, "on_error": ("raise", "skip"),
              "precision": BACKEND_PRECISIONS.get(options.get("backend"), PRECISIONS)}
    for key, choices in checks.items():
        if key in options:
            require(options[key] in choices, key, f"must be one of {choices}", options[key])
    if options.get("recheck_margin") is not None:
        _check_margin(options["recheck_margin"], PRECISIONS)


def _check_margin(margin: Any, precisions: tuple[str, ...]) -> None:
    """In logit units: a number for every reduced precision, or {precision: margin}."""
    margins = margin if isinstance(margin, Mapping) else {"": margin}
    require(all(k in ("", *precisions) for k in margins) and all(
        is_number(v) and 0 <= v < math.inf for v in margins.values()),
        "recheck_margin", f"must be a number >= 0 or a mapping {{precision: number >= 0}} of {precisions[1:]}",
        margin)


@cache
def predict_defaults() -> dict[str, Any]:
    """The defaults of every option in PREDICT_OPTIONS, from predict_defaults.yaml."""
    return {k: plain(v) for k, v in OmegaConf.load(DEFAULTS_FILE).items()}


def _gpu_visible() -> bool:
    """An NVIDIA GPU this process may use, found without importing torch (the ONNX path must not)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())


def choose_backend(backend: str, checkpoint: str | Path, device: str | None = None, precision: str = "auto") -> str:
    """The backend that runs: `backend` as given, checked, or for "auto" the fastest with exact tags on
    this machine (`auto_backend`) among those that run `precision`, logged in one line."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    has_onnx = (Path(checkpoint) / ONNX_FP32).is_file()
    if backend in GRAPH_BACKENDS:
        if not has_onnx:
            raise CheckpointError(f"{checkpoint}: no {ONNX_FP32}; publish the checkpoint to get its ONNX graphs, "
                                  "or use backend=torch")
        if device is not None and str(device) != "cpu":
            raise ValueError(f"backend={backend} runs on the CPU, not on {device}")
        return backend
    if backend == "torch":
        return "torch"
    chosen, why = auto_backend(has_onnx, device)
    if precision not in BACKEND_PRECISIONS[chosen] and precision in TORCH_PRECISIONS:
        chosen, why = "torch", f"precision={precision} runs on torch only"
    elif chosen in GRAPH_BACKENDS:
        runs = graph_precision(chosen, precision, (Path(checkpoint) / ONNX_INT8).is_file())
        why += f"; {runs}" + (" at precision=auto" if precision == "auto" else "")
    log.info("backend=auto: %s (%s)", chosen, why)
    return chosen


def auto_backend(has_onnx: bool, device: str | None) -> tuple[str, str]:
    """(backend, why) for backend=auto. Measured whole process against the pipeline peer (README,
    Benchmarks): OpenVINO ran ahead of torch and ONNX Runtime on both Intel Xeons measured, with AMX
    (bf16 matmuls) and without it exposed (static int8); see `graph_precision`."""
    on_gpu = str(device).startswith("cuda") if device is not None else _gpu_visible()
    if on_gpu:
        return "torch", "a GPU"
    if not has_onnx:
        return "torch", f"the checkpoint has no {ONNX_FP32}"
    # The precision that runs is added by `choose_backend` (see `graph_precision`).
    if cpu_has_amx():
        return "openvino", "AMX on this CPU: OpenVINO measured fastest"
    return "openvino", "no AMX on this CPU: OpenVINO measured fastest"


def runnable_precisions(backend: str) -> tuple[str, ...]:
    """The precisions `backend` runs on this machine: a graph engine's bf16 needs bf16 instructions
    (AMX or AVX512-BF16), where torch would emulate it."""
    choices = BACKEND_PRECISIONS[backend]
    if backend in GRAPH_BACKENDS and not cpu_has_native_bf16():
        return tuple(p for p in choices if p != "bf16")
    return choices


def graph_precision(engine: str, precision: str, has_int8: bool) -> str:
    """What a graph backend runs for `precision` (auto: the fastest here). On an AMX Xeon OpenVINO ran the
    fp32 graph with bf16 matmuls 3.7x its fp32 and 1.1x its int8 graph, moving logits ~10x less than
    int8 (so far fewer papers are rescored); without AMX the int8 graph is the fast one (VNNI)."""
    if precision != "auto":
        return precision
    if engine == "openvino" and cpu_has_amx():
        return "bf16"
    return "int8" if has_int8 else "fp32"
