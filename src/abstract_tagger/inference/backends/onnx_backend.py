"""The ONNX Runtime engine for the checkpoint's graphs (`graph.GraphBackend`): `backend=onnx`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from abstract_tagger.checkpoint.format import WEIGHTS_DIGEST_KEY
from abstract_tagger.inference.backends.graph import GraphBackend


class OnnxBackend(GraphBackend):
    engine = "onnx"

    def __init__(self, path: Path, **options):
        # The CPU arena keeps its largest size per session and fragments across batch shapes (1.8 GB
        # peak RSS on 1,000 abstracts with both graphs); shrinking it after each batch keeps the peak
        # at one batch's activations.
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        super().__init__(path, **options)

    def _load(self, name: str, bf16: bool, main: bool) -> tuple[ort.InferenceSession, str | None]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.num_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # the fp16 -> fp32 Cast folding at load is expected, not worth a warning
        session = ort.InferenceSession(str(self.path / name), options, providers=["CPUExecutionProvider"])
        return session, session.get_modelmeta().custom_metadata_map.get(WEIGHTS_DIGEST_KEY)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, exact: bool) -> np.ndarray:
        return (self.exact if exact else self.fast).run(
            None, {"input_ids": input_ids, "attention_mask": attention_mask}, self.run_options)[0]

    def _width(self, graph: Any) -> int | None:
        width = graph.get_outputs()[0].shape[-1]
        return width if isinstance(width, int) else None
