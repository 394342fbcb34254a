"""What the two engines that run the checkpoint's ONNX graphs (`onnx_backend`: ONNX Runtime,
`openvino_backend`: OpenVINO) share: the tokenizer, the checks that a checkpoint's graphs belong to its
weights, and the fast pass in reduced precision (the int8 graph; OpenVINO also runs the fp32 graph with
bf16 matmuls) with papers near a threshold rescored by the fp32 graph, which gives torch fp32's scores.
Imports numpy, `tokenizers` and `safetensors` only: a process that tags with a graph never loads torch
or transformers (most of a short run's time and memory).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from abstract_tagger.checkpoint.format import ONNX_FP32, ONNX_INT8, WEIGHTS_FILE, CheckpointError
from abstract_tagger.common.cpu import physical_cores
from abstract_tagger.common.files import file_digest, user_cache, write_json
from abstract_tagger.inference.backends.base import Backend, recheck_margin_for
from abstract_tagger.inference.options import BACKEND_PRECISIONS, graph_precision, runnable_precisions


def _token_id(tokenizer: Tokenizer, token: str | Mapping | None) -> int:
    if isinstance(token, Mapping):
        token = token.get("content")
    token_id = tokenizer.token_to_id(token) if isinstance(token, str) else None
    return 0 if token_id is None else token_id


class GraphBackend(Backend):
    """A checkpoint's ONNX graphs on the CPU. A subclass names its engine (its precisions are
    `options.BACKEND_PRECISIONS[engine]`) and loads a graph (`_load`: the runnable graph and the weights
    digest it was made from) and runs batches (`Backend.logits` or `Backend.run`) through `fast` or
    `exact`."""

    engine: str

    def __init__(
        self, path: Path, *, precision: str = "auto", batch_size: int | None = None,
        recheck_margin: float | Mapping[str, float] | None = None, num_threads: int | None = None,
    ):
        self._check_precision(precision)
        self.path = path
        # First: a file the engines would fail on gets its own error (`check_weights`).
        self.weights_digest = verified_weights(path / WEIGHTS_FILE)
        has_int8 = (path / ONNX_INT8).is_file()
        if precision == "int8" and not has_int8:
            raise CheckpointError(f"{path}: no {ONNX_INT8} for precision=int8")
        runs = graph_precision(self.engine, precision, has_int8)
        self.reduced = None if runs == "fp32" else runs
        self.batch_size = batch_size
        self.recheck_margin = recheck_margin_for(self.reduced, recheck_margin)
        self.num_threads = num_threads or physical_cores()
        config = json.loads((path / "config.json").read_text())
        self.labels = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
        tokenizer_config = json.loads((path / "tokenizer_config.json").read_text()) \
            if (path / "tokenizer_config.json").is_file() else {}
        # A tokenizer saved without a length limit reports a huge sentinel; the position table is the real cap.
        self.max_length = min(int(tokenizer_config.get("model_max_length", 1 << 30)),
                              config["max_position_embeddings"])
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)
        self.pad_id = _token_id(self.tokenizer, tokenizer_config.get("pad_token"))

    @classmethod
    def _check_precision(cls, precision: str) -> None:
        choices = BACKEND_PRECISIONS[cls.engine]
        if precision not in choices:
            raise ValueError(f"precision must be one of {choices} for backend={cls.engine}, got {precision!r}")
        if precision not in runnable_precisions(cls.engine):
            raise ValueError(f"precision=bf16 for backend={cls.engine} needs a CPU with bf16 instructions "
                             "(AMX or AVX512-BF16); use precision=auto")

    def _load(self, name: str, bf16: bool, main: bool) -> tuple[Any, str | None]:
        """`bf16`: run the graph's float matmuls in bf16 (only engines whose precisions hold bf16). `main`:
        the graph scores every paper (not the recheck's fp32 graph beside a reduced one)."""
        raise NotImplementedError

    def _drops_after_pass(self, exact: bool) -> bool:
        """Whether the exact or the fast graph goes whole after its pass, to be loaded again when next
        needed. ONNX Runtime drops the fp32 graph only (a load takes ~0.09 s): dropping its int8 graph
        too raised peak RSS a little (361 against 347 MB kept, 2,048 abstracts at 256 tokens, AMD
        EPYC), its arena shrinking after every run already."""
        return exact

    def _release(self, graph: Any) -> None:
        """Free the graph's intermediate buffers, where its engine keeps them between runs (ONNX Runtime's
        arena shrinks after every run already: `OnnxBackend.run_options`)."""

    def _width(self, graph: Any) -> int | None:
        """The number of scores the graph gives, where it states one."""
        raise NotImplementedError

    def _graph(self, name: str, reduced: str | None = None) -> Any:
        try:
            graph, made_from = self._load(name, bf16=reduced == "bf16", main=reduced == self.reduced)
        except Exception as e:  # the engines' errors derive from Exception only
            raise CheckpointError(f"{self.path}: cannot load {name}: {type(e).__name__}: {_reason(e)}") from e
        # Graphs exported before the digest was recorded carry none and cannot be checked.
        if made_from is not None and made_from != self.weights_digest:
            raise CheckpointError(
                f"{self.path / name}: made from another model.safetensors than the one beside it (SHA-256 differs): "
                "it reads weights at that file's byte offsets and would give wrong scores; re-export the graphs "
                "(publish.py) or use backend=torch")
        return graph

    @cached_property
    def exact(self) -> Any:
        """The fp32 graph; under reduced precision loaded for a recheck and dropped after it (`release_memory`)."""
        return self._graph(ONNX_FP32)

    @cached_property
    def fast(self) -> Any:
        """The graph of the main pass: the reduced-precision one, else the fp32 graph itself. Where its
        engine drops it during a recheck, loaded again for the next chunk (`release_memory`)."""
        if not self.reduced:
            return self.exact
        return self._graph(ONNX_INT8 if self.reduced == "int8" else ONNX_FP32, self.reduced)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def release_memory(self, exact: bool) -> None:
        """After its pass a graph goes whole, weights and buffers, where its engine reloads it cheaply
        (`_drops_after_pass`), so that one graph's weights do not sit on top of the other's buffers; a
        fast graph that stays frees its buffers (`_release`). The fp32 graph kept after a recheck had
        cost peak RSS 537 against 431 MB (OpenVINO bf16, 5,000 abstracts at 256 tokens, AMX Xeon)."""
        if self._drops_after_pass(exact):
            self.__dict__.pop("exact" if exact else "fast", None)
        elif not exact:
            self._release(self.fast)
        super().release_memory(exact)

    def fingerprint(self, h) -> None:
        """The weights file and the graphs that read it."""
        h.update(self.weights_digest.encode())
        for name in (ONNX_FP32, ONNX_INT8):
            if (self.path / name).is_file():
                h.update(name.encode())
                with open(self.path / name, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)

    def describe(self) -> str:
        return f"{self.engine} on cpu, {self.reduced or 'fp32'}, {self.num_threads} threads"

    @classmethod
    def load(cls, path: Path, **options) -> GraphBackend:
        """The backend for checkpoint `path`, refusing what torch's loading refuses: unreadable files
        and non-finite weights (the graphs read theirs from model.safetensors)."""
        cls._check_precision(options.get("precision", "auto"))
        try:
            backend = cls(path, **options)
        except CheckpointError:
            raise
        except Exception as e:  # the tokenizers and engines' errors derive from Exception only
            raise CheckpointError(f"{path}: cannot load: {type(e).__name__}: {_reason(e)}") from e
        width = backend._width(backend.fast)  # loads the fast graph: one that cannot load fails here
        if width is not None and width != len(backend.labels):
            raise CheckpointError(f"{path}: the ONNX graph gives {width} scores, config.json has "
                                  f"{len(backend.labels)} labels")
        return backend


def _reason(e: BaseException) -> str:
    """The engine's message on one line. OpenVINO's opens with the C++ frames it passed through
    ("Exception from src/inference/src/cpp/core.cpp:84:", "Check '...' failed at ...") and gives the
    reason last ("Model can't be parsed"): those frames are left out."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    reason = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return " ".join(reason or lines[:1])


def check_weights(path: Path) -> None:
    """Refuse a truncated or unreadable weights file and non-finite (NaN/inf) weights, with numpy only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            diverged = [k for k in f.keys() if f.get_slice(k).get_dtype() in ("F16", "F32", "F64")
                        and not np.isfinite(f.get_tensor(k)).all()]
    except (OSError, ValueError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{path.parent}: cannot load: {type(e).__name__}: {_reason(e)}") from e
    if diverged:
        raise CheckpointError(f"{path.parent}: non-finite (NaN/inf) weights in {', '.join(diverged[:3])}: "
                              "the training run that exported it diverged")


# What `check_weights` refuses; a memo written under another version of it is not trusted.
_WEIGHTS_CHECK = "whole-and-finite/1"


def verified_weights(path: Path) -> str:
    """The SHA-256 of weights file `path`, once `check_weights` passed it. Both read the whole file (~85
    ms at every start for the published 45 MB), so a checked file's digest is kept in the user's cache
    under the file's state: device, inode, size, modification and change time (any write moves the change
    time, which no tool sets back). A later start with the same state reads a few bytes instead."""
    try:
        st = path.stat()
        state = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        folder = user_cache("verified-weights")
    except OSError:
        state = folder = None  # check_weights names the problem
    where = str(path.resolve())
    memo = folder / f"{hashlib.sha256(where.encode()).hexdigest()[:32]}.json" if folder else None
    try:
        known = json.loads(memo.read_text()) if memo else None
    except (OSError, ValueError):  # none yet, or unreadable: checked again below
        known = None
    if isinstance(known, dict) and known.get("state") == state and known.get("check") == _WEIGHTS_CHECK \
            and re.fullmatch(r"[0-9a-f]{64}", str(known.get("sha256"))):
        return known["sha256"]
    check_weights(path)
    digest = file_digest(path)
    if memo is not None:
        try:
            write_json(memo, {"path": where, "state": state, "check": _WEIGHTS_CHECK, "sha256": digest})
        except OSError:
            pass  # a read-only or full cache: the next start checks again
    return digest
