"""The OpenVINO engine for the checkpoint's graphs (`graph.GraphBackend`): `backend=openvino`.

OpenVINO turns the static int8 graph's quantise/dequantise pairs into int8 (VNNI, AMX) kernels: on a
2-core Intel Xeon without AMX it ran that graph 2.6x its fp32 graph, where ONNX Runtime ran it 1.3x
(README, Benchmarks). On a CPU with AMX it also runs the fp32 graph's matmuls in bf16 (precision=bf16):
3.7x its fp32 there, a little ahead of int8, and ~10x closer to fp32's logits. Compiled graphs are
cached per machine (`cache_dir`), which cuts a start's compile from ~0.7 s to ~0.1 s.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from abstract_tagger.checkpoint.format import WEIGHTS_DIGEST_KEY
from abstract_tagger.common.files import user_cache
from abstract_tagger.inference.backends.graph import GraphBackend


def cache_dir(hint: str) -> Path | None:
    """Where graphs compiled with precision `hint` are kept (None: every start compiles). One folder per
    hint: OpenVINO's cache key leaves the hint out, and a graph cached in f32, then loaded for bf16, gave
    NaN (OpenVINO 2026.4, AMX Xeon)."""
    return user_cache("openvino", hint)


def precision_hint(bf16: bool) -> str:
    # f32 stated for the exact graph: on CPUs with AMX OpenVINO would otherwise run the fp32 ops in bf16,
    # and the fp32 graph would no longer give torch fp32's scores.
    return "bf16" if bf16 else "f32"


@cache
def _core() -> ov.Core:
    return ov.Core()


class OpenVinoBackend(GraphBackend):
    engine = "openvino"

    def _load(self, name: str, bf16: bool, main: bool) -> tuple[ov.CompiledModel, str | None]:
        model = _core().read_model(str(self.path / name))
        key = ["framework", WEIGHTS_DIGEST_KEY]
        made_from = str(model.get_rt_info(key).astype(str)) if model.has_rt_info(key) else None
        hint = precision_hint(bf16)
        # The main pass runs a batch per stream (OpenVINO picks the streams: 2 on 2 cores, a thread each),
        # which ran 7% faster whole process than one batch at a time on both threads (5,000 abstracts at
        # 256 tokens, AMX Xeon). The recheck's few batches run one at a time: a stream each would hold
        # two sets of buffers (peak RSS 499 against 462 MB there).
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.num_threads, "INFERENCE_PRECISION_HINT": hint,
                                  "PERFORMANCE_HINT": "THROUGHPUT" if main else "LATENCY"}
        if (where := cache_dir(hint)) is not None:
            config["CACHE_DIR"] = str(where)
        return _core().compile_model(model, "CPU", config), made_from

    def run(self, batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], exact: bool
            ) -> list[tuple[np.ndarray, np.ndarray]]:
        """In the order the batches finish."""
        graph = self.exact if exact else self.fast
        queue = ov.AsyncInferQueue(graph, graph.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        done: list[tuple[np.ndarray, np.ndarray]] = []
        # The callback runs on OpenVINO's thread when a batch finishes; a request reuses its output buffer.
        queue.set_callback(lambda request, rows: done.append((rows, request.get_output_tensor(0).data.copy())))
        started = 0
        try:
            for rows, input_ids, mask in batches:
                queue.start_async({"input_ids": input_ids, "attention_mask": mask}, rows)
                started += 1
        finally:
            # Never leave requests running past this call (an error or an interrupt above): the queue
            # they belong to goes with it.
            queue.wait_all()
        if len(done) != started:
            raise RuntimeError(f"OpenVINO returned {len(done)} of {started} batches")
        return done

    def _drops_after_pass(self, exact: bool) -> bool:
        # Both graphs: a load from the compile cache takes ~0.1 s, and dropping the fast graph during the
        # recheck took peak RSS from 494 to 425 MB (int8) and 447 to 386 MB (bf16) at the same speed
        # (2,048 abstracts at 256 tokens, AMD EPYC). Without a cache a compile takes ~0.7 s a chunk.
        return cache_dir(precision_hint(self.reduced == "bf16" and not exact)) is not None

    def _release(self, graph: Any) -> None:
        # A compiled graph keeps the buffers of its largest batch until told otherwise (~105 MB for the
        # bf16 pass at 16 x 256 tokens).
        graph.release_memory()

    def _width(self, graph: Any) -> int | None:
        shape = graph.outputs[0].get_partial_shape()
        return shape[-1].get_length() if shape.rank.is_static and shape[-1].is_static else None
