"""Tagging with an exported checkpoint: `Tagger` turns abstracts into per-tag scores and tags.

Speed comes from what the pipeline peer does not do: one fast-tokenizer call per chunk, batches of
similar length (sorted, then put back in input order) padded to a multiple of 8, inference mode and
bf16/fp16 autocast where the hardware runs it natively.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from abstract_tagger.corpus import Paper, normalize_ws
from abstract_tagger.rule_blend import RULES_FILE, RuleBlend

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_PAD_MULTIPLE = 8


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded safely, naming what is wrong with it."""


_REQUIRED_FILES = {
    "config.json": "model config",
    "tokenizer.json": "fast tokenizer",
    "thresholds.json": "per-tag thresholds",
}


def check_checkpoint(path: str | Path) -> Path:
    """Fail early, naming every missing piece, instead of deep inside `from_pretrained`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    missing = [f"{name} ({what})" for name, what in _REQUIRED_FILES.items() if not (path / name).is_file()]
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise CheckpointError(
                f"{path}: has only pickle weights ({', '.join(pickles)}), which can run arbitrary code when "
                "loaded; only model.safetensors is accepted (re-save with save_pretrained where you trust the file)"
            )
        missing.append("model.safetensors (weights)")
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return path


@cache
def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: where bf16 matmuls are ~3x fp32 rather than emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return _AUTOCAST_DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


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


class Tagger:
    """An exported checkpoint ready to tag: `Tagger.from_pretrained(dir).predict(texts)`."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        thresholds: Mapping[str, float],
        *,
        precision: str = "auto",
        batch_size: int = 64,
        recheck_margin: float = 0.02,
        blend: RuleBlend | None = None,
    ):
        self.model = model.eval()
        self.blend = blend
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = autocast_dtype(precision, self.device)
        self.batch_size = batch_size
        self.recheck_margin = recheck_margin
        config = model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        missing = sorted(set(self.labels) - set(thresholds))
        if missing:
            raise CheckpointError(f"thresholds.json has no threshold for {missing}")
        # `not 0 <= v <= 1` also catches NaN, which every comparison fails.
        bad = {t: thresholds[t] for t in self.labels if isinstance(thresholds[t], bool)
               or not isinstance(thresholds[t], int | float) or not 0 <= thresholds[t] <= 1}
        if bad:
            raise CheckpointError(f"thresholds.json: thresholds must be numbers in [0, 1], got {bad}")
        self.thresholds = np.array([thresholds[t] for t in self.labels], dtype=np.float32)
        # A tokenizer saved without a length limit reports a huge sentinel; the position table is the real cap.
        self.max_length = min(tokenizer.model_max_length, config.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device | None = None, precision: str = "auto",
        batch_size: int = 64, recheck_margin: float = 0.02,
    ) -> Tagger:
        path = check_checkpoint(path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            # Weights may be stored in fp16 (the published checkpoint); compute runs in fp32 plus autocast.
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, use_safetensors=True, trust_remote_code=False, dtype=torch.float32, output_loading_info=True
            )
            thresholds = json.loads((path / "thresholds.json").read_text())
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            # A truncated file or weights that do not fit config.json: name the checkpoint, not the internals.
            raise CheckpointError(f"{path}: cannot load: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
        # transformers fills weights missing from the file (say, the classifier) with random ones.
        missing = sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
        if missing:
            raise CheckpointError(f"{path}: model.safetensors lacks {', '.join(missing)}; they would be random")
        diverged = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        if diverged:
            raise CheckpointError(f"{path}: non-finite (NaN/inf) weights in {', '.join(diverged[:3])}: "
                                  "the training run that exported it diverged")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        try:
            blend = RuleBlend.load(path, labels)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: bad {RULES_FILE}: {e}") from None
        return cls(model.to(device), tokenizer, thresholds, precision=precision, batch_size=batch_size,
                   recheck_margin=recheck_margin, blend=blend)

    def batches(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """(row indices, model inputs) for `texts`: one fast-tokenizer call, then batches of similar
        length, longest first so the largest shape (and peak memory) comes in the first step."""
        ids = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length,
            return_attention_mask=False, return_token_type_ids=False,
        )["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        pad_id = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = min(-(-int(lengths[rows[0]]) // _PAD_MULTIPLE) * _PAD_MULTIPLE, self.max_length)
            input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                input_ids[r, :lengths[i]] = ids[i]
                mask[r, :lengths[i]] = 1
            yield rows, {
                "input_ids": torch.from_numpy(input_ids).to(self.device, non_blocking=True),
                "attention_mask": torch.from_numpy(mask).to(self.device, non_blocking=True),
            }

    def autocast(self, enabled: bool = True) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                              enabled=enabled and self.dtype is not None)

    def _forward(self, texts: Sequence[str], autocast: bool) -> np.ndarray:
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        with torch.inference_mode(), self.autocast(autocast):
            for rows, inputs in self.batches(texts):
                out[rows] = torch.sigmoid(self.model(**inputs).logits.float()).cpu().numpy()
        return out

    def scores(self, items: Sequence[str | Paper | Mapping[str, Any]], *,
               threshold: float | None = None) -> np.ndarray:
        """Probabilities, float32 [len(items), len(labels)], rows in input order: the model's sigmoid
        scores, blended with the rule functions where the checkpoint has a `rules.json`.

        Under bf16/fp16 autocast, rows with a score within `recheck_margin` of its threshold (the
        per-tag ones, or `threshold`) are scored again in fp32: reduced precision moves scores by
        ~0.01, so only those decisions can differ from fp32.
        """
        if not len(items):
            return np.empty((0, len(self.labels)), dtype=np.float32)
        papers = [as_paper(item) for item in items]
        texts = [as_text(item) for item in items]
        rules = self.blend.rule_probs(papers) if self.blend is not None else None

        def combine(model_probs: np.ndarray, rows: Any = slice(None)) -> np.ndarray:
            return model_probs if rules is None else self.blend.mix(model_probs, rules[rows])

        out = combine(self._forward(texts, autocast=True))
        if self.dtype is not None and self.recheck_margin > 0:
            cut = self.thresholds if threshold is None else np.float32(threshold)
            near = np.flatnonzero((np.abs(out - cut) < self.recheck_margin).any(axis=1))
            if len(near):
                out[near] = combine(self._forward([texts[i] for i in near], autocast=False), near)
        return out

    def decide(
        self, scores: np.ndarray, *, top_k: int | None = None, threshold: float | None = None
    ) -> list[list[str]]:
        """Tags per row, best first: scores at or over the per-tag threshold (or one `threshold` for all
        tags), at most `top_k` of them."""
        cut = self.thresholds if threshold is None else np.float32(threshold)
        order = np.argsort(-scores, axis=1, kind="stable")
        keep = np.take_along_axis(scores >= cut, order, axis=1)
        if top_k is not None:
            keep[:, top_k:] = False
        labels = self.labels
        return [[labels[j] for j in row[k]] for row, k in zip(order, keep)]

    def predict(
        self, items: Iterable[str | Paper | Mapping[str, Any]], *, top_k: int | None = None,
        threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        """[{"tags": [...], "scores": {tag: probability}}] for strings (full text), Papers or
        {title, abstract} records."""
        scores = self.scores(list(items), threshold=threshold)
        tags = self.decide(scores, top_k=top_k, threshold=threshold)
        return [
            {"tags": t, "scores": dict(zip(self.labels, row))}
            for t, row in zip(tags, scores.tolist())
        ]
