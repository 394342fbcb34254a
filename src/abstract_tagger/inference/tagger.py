"""Tagging with an exported checkpoint: `Tagger` turns abstracts into per-tag scores and tags.

A Tagger is a backend that turns texts into probabilities (n, tags), then one numpy step that applies
thresholds and top_k. Backends: the checkpoint's ONNX graphs run by ONNX Runtime (`onnx_backend`) or
OpenVINO (`openvino_backend`), with no torch in the process, and torch (`torch_backend`). Speed comes from what the pipeline peer does not do: one fast-tokenizer call per
chunk, batches of similar length (sorted, then put back in input order) padded to a multiple of 8,
and reduced precision (bf16 autocast, int8 matmuls) with papers near a threshold rescored exactly.

This module imports neither torch nor transformers: the ONNX path must not pay for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from abstract_tagger.checkpoint.format import check_checkpoint, check_thresholds, load_rules, load_thresholds
from abstract_tagger.data.corpus import Paper, normalize_ws
from abstract_tagger.inference.backends.base import Backend
from abstract_tagger.inference.options import check_predict_options, choose_backend, predict_defaults
from abstract_tagger.labeling.rule_blend import RuleBlend


def decide(
    scores: np.ndarray, labels: Sequence[str], cut: np.ndarray | float, top_k: int | None = None
) -> list[list[str]]:
    """Tags per row, best first: scores at or over `cut` (one per tag, or one for all), at most `top_k`.
    The one thresholding step of every backend."""
    order = np.argsort(-scores, axis=1, kind="stable")
    keep = np.take_along_axis(scores >= cut, order, axis=1)
    if top_k is not None:
        keep[:, top_k:] = False
    return [[labels[j] for j in row[k]] for row, k in zip(order, keep)]


def as_paper(item: str | Paper | Mapping[str, Any]) -> Paper:
    """A Paper as training built them. A bare string is the whole text ("title. abstract"): the model
    reads it the same, but the rule blend sees no title and no categories."""
    if isinstance(item, Paper):
        return item
    if isinstance(item, str):
        return Paper(id="", title="", abstract=item)
    if isinstance(item, Mapping):
        title, abstract = item.get("title"), item.get("abstract")
        if not isinstance(abstract, str) or not abstract.strip():
            raise ValueError(f"record {item.get('id', '')!r} has no abstract")
        categories = item.get("categories") or ()
        return Paper(id=str(item.get("id", "")), title=normalize_ws(title) if isinstance(title, str) else "",
                     abstract=normalize_ws(abstract),
                     categories=tuple(categories.split() if isinstance(categories, str) else categories))
    raise TypeError(f"expected a string, a Paper or a mapping with title/abstract, got {type(item).__name__}")


def as_text(item: str | Paper | Mapping[str, Any]) -> str:
    """What the model reads, built the way training built it ("title. abstract")."""
    if isinstance(item, str):
        return item
    paper = as_paper(item)
    return paper.text if paper.title else paper.abstract


def _as_items(items: Any) -> list[Any]:
    """The list of texts or records; one text or record given bare is a mistake, not a list (a string
    would be tagged character by character)."""
    if isinstance(items, str | bytes | Paper | Mapping):
        raise TypeError(f"expected a list of texts or records, got a single {type(items).__name__}: "
                        "wrap it in a list")
    return list(items)


def _onnx(path: Path, device: str | None, options: dict[str, Any]) -> Backend:
    from abstract_tagger.inference.backends.onnx_backend import OnnxBackend  # here: torch-free, and only if chosen

    return OnnxBackend.load(path, **options)


def _openvino(path: Path, device: str | None, options: dict[str, Any]) -> Backend:
    from abstract_tagger.inference.backends.openvino_backend import OpenVinoBackend  # torch-free, only if chosen

    return OpenVinoBackend.load(path, **options)


def _torch(path: Path, device: str | None, options: dict[str, Any]) -> Backend:
    from abstract_tagger.inference.backends.torch_backend import TorchBackend  # here: the ONNX path never loads torch

    return TorchBackend.load(path, device=device, **options)


# The backends by the name `backend=` takes (inference.options.BACKENDS, besides auto): a new one is a
# Backend subclass and one entry here.
BACKEND_LOADERS = {"openvino": _openvino, "onnx": _onnx, "torch": _torch}


class Tagger:
    """An exported checkpoint ready to tag: `Tagger.from_pretrained(dir).predict(texts)`. One call at a
    time: its graph backends load and drop graphs between passes (threads would each want their own
    Tagger, or processes: predict.py's shards)."""

    def __init__(self, backend: Backend, thresholds: Mapping[str, float], blend: RuleBlend | None = None):
        self.backend = backend
        self.blend = blend
        self.labels = list(backend.labels)
        check_thresholds(thresholds, self.labels)
        self.thresholds = np.array([thresholds[t] for t in self.labels], dtype=np.float32)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, backend: str | None = None, device: str | None = None,
        precision: str | None = None, batch_size: int | None = None,
        recheck_margin: float | Mapping[str, float] | None = None, num_threads: int | None = None,
    ) -> Tagger:
        """Options left None take the package's defaults (inference/predict_defaults.yaml, which says
        what each means)."""
        given = {"backend": backend, "precision": precision, "batch_size": batch_size,
                 "recheck_margin": recheck_margin, "num_threads": num_threads}
        # `is None`, not `or`: batch_size=0 is an error to report, not a request for the default.
        options = {k: predict_defaults()[k] if v is None else v for k, v in given.items()}
        check_predict_options(options)
        path = check_checkpoint(path)
        backend = choose_backend(options.pop("backend"), path, device, options["precision"])
        model = BACKEND_LOADERS[backend](path, device, options)
        thresholds = load_thresholds(path, model.labels)
        blend = load_rules(path, model.labels)
        return cls(model, thresholds, blend=blend)

    def scores(self, items: Iterable[str | Paper | Mapping[str, Any]], *,
               threshold: float | None = None) -> np.ndarray:
        """Probabilities, float32 [len(items), len(labels)], rows in input order: the model's sigmoid
        scores, blended with the rule functions where the checkpoint has a `rules.json`; exact (fp32)
        near the per-tag thresholds, or near `threshold` where one is given for all tags."""
        items = _as_items(items)
        check_predict_options({"threshold": threshold})
        if not len(items):
            return np.empty((0, len(self.labels)), dtype=np.float32)
        texts = [as_text(item) for item in items]
        cut = self.thresholds if threshold is None else np.float32(threshold)
        if self.blend is None:
            return self.backend.probabilities(texts, cut)
        rules = self.blend.rule_probs([as_paper(item) for item in items])
        # Rescoring papers near the model score where the blend crosses `cut` is what keeps fp32's tags.
        # (Near `cut` in blended space would rescore papers whose rule score alone sits near it: 61%.)
        return self.blend.mix(self.backend.probabilities(texts, self.blend.model_cut(cut, rules)), rules)

    def decide(
        self, scores: np.ndarray, *, top_k: int | None = None, threshold: float | None = None
    ) -> list[list[str]]:
        """Tags per row, best first: scores at or over the per-tag threshold (or one `threshold` for all
        tags), at most `top_k` of them."""
        check_predict_options({"top_k": top_k, "threshold": threshold})
        return decide(scores, self.labels, self.thresholds if threshold is None else np.float32(threshold), top_k)

    def predict(
        self, items: Iterable[str | Paper | Mapping[str, Any]], *, top_k: int | None = None,
        threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        """[{"tags": [...], "scores": {tag: probability}}] for strings (full text), Papers or
        {title, abstract} records."""
        scores = self.scores(items, threshold=threshold)
        tags = self.decide(scores, top_k=top_k, threshold=threshold)
        return [
            {"tags": t, "scores": dict(zip(self.labels, row))}
            for t, row in zip(tags, scores.tolist())
        ]
