"""What every backend shares: texts -> probabilities through `encode` and `logits`, batched by
length, with papers near a threshold rescored exactly when a reduced precision ran. Imports
inference.options; a backend module (torch_backend, graph) imports this one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from abstract_tagger.common.memory import trim_heap
from abstract_tagger.inference.options import predict_defaults

_PAD_MULTIPLE = 8
# A batch's activations set peak memory (the attention scores grow with the square of its length). By
# default a batch holds this many tokens' worth of papers: 16 at 128 tokens, 8 at 256. On the published
# MiniLM at 256 tokens, 8 instead of 16 ran as fast (OpenVINO bf16, torch bf16 a little faster) and took
# torch bf16's peak RSS on 2,048 abstracts from 733-741 to 673-680 MB; at 128 tokens 8 ran ~3% slower
# than 16 (AMX Xeon, 2 cores).
_BATCH_TOKENS = 2048
# The recheck scores a few papers a chunk with a second graph (or weights): in small batches its
# activations stay small. On the published MiniLM with OpenVINO, batches of 8 at 128 tokens instead of
# the main pass's (then 32) took peak RSS from 560 to 475 MB on 2,048 abstracts at no measurable cost in
# time; at 256 tokens, 4 instead of 8 took it from 568 to 537 MB on 5,000 at the same speed (fp32
# recheck, 39-40 abstracts/s either way). So a recheck batch holds this many tokens (at least a paper).
_RECHECK_TOKENS = 1024


def sigmoid(logits: np.ndarray) -> np.ndarray:
    # exp(-log(1 + e^-x)): no overflow warning for large |x|. A NaN (reduced precision overflowed)
    # stays NaN without a warning: `probabilities` rescores its row exactly.
    with np.errstate(invalid="ignore"):
        return np.exp(-np.logaddexp(0, -logits)).astype(np.float32)


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


class Backend:
    """Texts -> probabilities (n, tags). A subclass tokenizes (`encode`) and runs a batch (`logits`; or
    overrides `run`, which runs them all), with `exact=False` in its fast reduced precision (`reduced`
    names it; None when it has none)."""

    engine: str
    labels: list[str]
    max_length: int
    pad_id: int
    batch_size: int | None  # papers per batch; None: _BATCH_TOKENS' worth
    reduced: str | None
    # Logit units: reduced precision moves a logit by a roughly constant amount wherever it lies, while
    # the same move in probability shrinks towards 0 and 1 (a probability margin rechecks needlessly
    # many papers under low thresholds).
    recheck_margin: float

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, exact: bool) -> np.ndarray:
        raise NotImplementedError

    def fingerprint(self, h: Any) -> None:
        """Feed what the scores depend on (the weights) into hashlib object `h`."""
        raise NotImplementedError

    def batches(self, texts: Sequence[str], batch_size: int | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(row indices, input_ids, attention_mask) for `texts`: one tokenizer call, then batches of
        similar length (`batch_size`, by default the backend's), longest first so the largest shape (and
        peak memory) comes in the first step."""
        batch_size = batch_size or self.pass_batch_size()
        ids = self.encode(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = min(-(-int(lengths[rows[0]]) // _PAD_MULTIPLE) * _PAD_MULTIPLE, self.max_length)
            input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                input_ids[r, :lengths[i]] = ids[i]
                mask[r, :lengths[i]] = 1
            yield rows, input_ids, mask

    def run(self, batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], exact: bool
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row indices, logits) for each of `batches`, one after another through `logits`; an engine
        that runs several batches at once overrides it (and may give them in another order)."""
        for rows, input_ids, mask in batches:
            yield rows, self.logits(input_ids, mask, exact)

    def forward(self, texts: Sequence[str], exact: bool, batch_size: int | None = None) -> np.ndarray:
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        for rows, logits in self.run(self.batches(texts, batch_size), exact):
            out[rows] = logits
        return out

    def probabilities(self, texts: Sequence[str], cut: np.ndarray | float) -> np.ndarray:
        """The model's sigmoid scores, float32 (len(texts), tags), rows in input order. In reduced
        precision, rows with a logit within `recheck_margin` of a threshold's logit (`cut`: one for
        all, per tag, or per row and tag) are scored again exactly, so that reduced precision changes
        speed, not tags."""
        if not len(texts):
            return np.empty((0, len(self.labels)), dtype=np.float32)
        exact = self.reduced is None
        logits = self.forward(texts, exact=exact)
        out = sigmoid(logits)
        if not exact:
            # Rows where reduced precision overflowed (NaN, inf) are rescored whatever the margin, even 0.
            overflowed = ~np.isfinite(logits).all(axis=1)
            near = np.flatnonzero(near_cut(out, cut, self.recheck_margin) | overflowed)
            if len(near):
                # The two passes' buffers need not add up: the fast pass's go back before the exact
                # pass builds its own, and those go back after it.
                self.release_memory(exact=False)
                out[near] = sigmoid(self.forward([texts[i] for i in near], exact=True,
                                                 batch_size=self.recheck_batch_size()))
                self.release_memory(exact=True)
        return out

    def release_memory(self, exact: bool) -> None:
        """Give the intermediate buffers of the exact or the fast pass back to the OS; its next batch
        allocates them again. A backend whose engine keeps them releases them first."""
        trim_heap()

    def pass_batch_size(self) -> int:
        return self.batch_size or max(1, _BATCH_TOKENS // self.max_length)

    def recheck_batch_size(self) -> int:
        return min(self.pass_batch_size(), max(1, _RECHECK_TOKENS // self.max_length))

    def describe(self) -> str:
        raise NotImplementedError

    def scoring(self) -> dict[str, Any]:
        """How the scores are computed, beyond the weights (`fingerprint`): what a resumed run must share."""
        return {"engine": self.engine, "precision": self.reduced or "fp32", "recheck_margin": self.recheck_margin}


def near_cut(probs: np.ndarray, cut: np.ndarray | float, margin: float) -> np.ndarray:
    """Rows (a bool per row) with a score within `margin` logits of its cut: the ones reduced precision
    may have put on the wrong side. Logits of clipped probabilities, so a cut of 0 or 1 sits at ±16."""
    return (np.abs(logit(probs) - logit(cut)) < margin).any(axis=1)


def recheck_margin_for(reduced: str | None, margin: float | Mapping[str, float] | None) -> float:
    """The margin for this precision: a number, a {precision: margin} mapping (over the defaults, as
    predict.py's Hydra merges it), or None for the defaults."""
    defaults = predict_defaults()["recheck_margin"]
    if margin is None:
        margin = defaults
    if isinstance(margin, Mapping):
        margin = {**defaults, **margin}
        return float(margin.get(reduced, 0.0)) if reduced else 0.0
    return float(margin)
