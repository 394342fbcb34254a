"""Tagging with an exported checkpoint: `Tagger` turns abstracts into per-tag scores and tags.

A Tagger is a backend that turns texts into probabilities (n, tags), then one numpy step that applies
thresholds and top_k. Backends: ONNX Runtime (`onnx_backend`, no torch in the process) and torch
(`torch_backend`). Speed comes from what the pipeline peer does not do: one fast-tokenizer call per
chunk, batches of similar length (sorted, then put back in input order) padded to a multiple of 8,
and reduced precision (bf16 autocast, int8 matmuls) with papers near a threshold rescored exactly.

This module imports neither torch nor transformers: the ONNX path must not pay for them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from abstract_tagger.config_checks import check_predict_options, plain
from abstract_tagger.corpus import Paper, normalize_ws
from abstract_tagger.rule_blend import RULES_FILE, RuleBlend

BACKENDS = ("auto", "onnx", "torch")
# Per backend (torch: autocast dtypes; onnx: the fp32 graph or the int8 one); auto: the backend's best.
TORCH_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ONNX_PRECISIONS = ("auto", "fp32", "int8")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_PAD_MULTIPLE = 8
# predict.py's config is the one home of the prediction defaults; the Python API reads them from it.
_PREDICT_CONF = Path(__file__).resolve().parents[2] / "conf/predict.yaml"
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model_quantized.onnx"
# An ONNX graph's metadata key for the SHA-256 of the model.safetensors it reads its weights from.
WEIGHTS_DIGEST_KEY = "abstract_tagger.safetensors_sha256"
# What tokenizers report as model_max_length when none was saved.
_NO_LENGTH_LIMIT = 1 << 30


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
    check_lengths(path)
    return path


def read_json(path: Path, kind: type = dict) -> Any:
    """A checkpoint's JSON file, which must hold a `kind`; CheckpointError naming it otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                              f"got {type(value).__name__}")
    return value


def check_lengths(path: Path) -> None:
    """config.json must have room for every token the tokenizer keeps: a smaller max_position_embeddings
    made the ONNX path cut every input short (torch refuses it only through the weights' shapes)."""
    config = read_json(path / "config.json")
    positions = config.get("max_position_embeddings")
    tokenizer_config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    limit = tokenizer_config.get("model_max_length")
    if not isinstance(positions, int) or isinstance(positions, bool) or positions <= 0:
        raise CheckpointError(f"{path / 'config.json'}: max_position_embeddings must be a positive integer, "
                              f"got {positions!r}")
    if isinstance(limit, int) and limit < _NO_LENGTH_LIMIT and limit > positions:
        raise CheckpointError(f"{path / 'config.json'}: max_position_embeddings={positions} is below the "
                              f"tokenizer's model_max_length={limit} (tokenizer_config.json): inputs would be cut "
                              "to fewer tokens than the model was trained on")


@cache
def predict_defaults() -> dict[str, Any]:
    """The Python API's defaults, as conf/predict.yaml sets them for predict.py: the Tagger's (backend,
    precision, batch_size, recheck_margin, num_threads) and predict_file's (chunk_size, on_error, max_chars)."""
    conf = OmegaConf.load(_PREDICT_CONF)
    keys = ("backend", "precision", "batch_size", "recheck_margin", "num_threads", "chunk_size", "on_error",
            "max_chars")
    return {k: plain(conf[k]) for k in keys}


def _gpu_visible() -> bool:
    """An NVIDIA GPU this process may use, found without importing torch (the ONNX path must not)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())


def choose_backend(backend: str, checkpoint: str | Path, device: str | None = None) -> str:
    """"auto": ONNX Runtime on CPU when the checkpoint has its ONNX graphs, torch on a GPU (or without them)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    has_onnx = (Path(checkpoint) / ONNX_FP32).is_file()
    if backend == "onnx":
        if not has_onnx:
            raise CheckpointError(f"{checkpoint}: no {ONNX_FP32}; publish the checkpoint to get its ONNX graphs, "
                                  "or use backend=torch")
        if device is not None and str(device) != "cpu":
            raise ValueError(f"backend=onnx runs on the CPU, not on {device}")
        return "onnx"
    if backend == "torch":
        return "torch"
    on_gpu = str(device).startswith("cuda") if device is not None else _gpu_visible()
    return "onnx" if has_onnx and not on_gpu else "torch"


def sigmoid(logits: np.ndarray) -> np.ndarray:
    # exp(-log(1 + e^-x)): no overflow warning for large |x|.
    return np.exp(-np.logaddexp(0, -logits)).astype(np.float32)


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


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


class Backend:
    """Texts -> probabilities (n, tags). A subclass tokenizes (`encode`) and runs a batch (`logits`),
    with `exact=False` in its fast reduced precision (`reduced` names it; None when it has none)."""

    labels: list[str]
    max_length: int
    pad_id: int
    batch_size: int
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

    def batches(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(row indices, input_ids, attention_mask) for `texts`: one tokenizer call, then batches of
        similar length, longest first so the largest shape (and peak memory) comes in the first step."""
        ids = self.encode(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            width = min(-(-int(lengths[rows[0]]) // _PAD_MULTIPLE) * _PAD_MULTIPLE, self.max_length)
            input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                input_ids[r, :lengths[i]] = ids[i]
                mask[r, :lengths[i]] = 1
            yield rows, input_ids, mask

    def forward(self, texts: Sequence[str], exact: bool) -> np.ndarray:
        out = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        for rows, input_ids, mask in self.batches(texts):
            out[rows] = self.logits(input_ids, mask, exact)
        return out

    def probabilities(self, texts: Sequence[str], cut: np.ndarray | float) -> np.ndarray:
        """The model's sigmoid scores, float32 (len(texts), tags), rows in input order. In reduced
        precision, rows with a logit within `recheck_margin` of a threshold's logit (`cut`: one for
        all, per tag, or per row and tag) are scored again exactly, so that reduced precision changes
        speed, not tags."""
        if not len(texts):
            return np.empty((0, len(self.labels)), dtype=np.float32)
        exact = self.reduced is None
        out = sigmoid(self.forward(texts, exact=exact))
        if not exact and self.recheck_margin > 0:
            near = np.flatnonzero((np.abs(logit(out) - logit(cut)) < self.recheck_margin).any(axis=1))
            if len(near):
                out[near] = sigmoid(self.forward([texts[i] for i in near], exact=True))
        return out

    def describe(self) -> str:
        raise NotImplementedError


def recheck_margin_for(reduced: str | None, margin: float | Mapping[str, float] | None) -> float:
    """The margin for this precision: a number, a {precision: margin} mapping, or None for the config's."""
    if margin is None:
        margin = predict_defaults()["recheck_margin"]
    if isinstance(margin, Mapping):
        return float(margin.get(reduced, 0.0)) if reduced else 0.0
    return float(margin)


class Tagger:
    """An exported checkpoint ready to tag: `Tagger.from_pretrained(dir).predict(texts)`."""

    def __init__(self, backend: Backend, thresholds: Mapping[str, float], blend: RuleBlend | None = None):
        self.backend = backend
        self.blend = blend
        self.labels = list(backend.labels)
        missing = sorted(set(self.labels) - set(thresholds))
        if missing:
            raise CheckpointError(f"thresholds.json has no threshold for {missing}")
        # `not 0 <= v <= 1` also catches NaN, which every comparison fails.
        bad = {t: thresholds[t] for t in self.labels if isinstance(thresholds[t], bool)
               or not isinstance(thresholds[t], int | float) or not 0 <= thresholds[t] <= 1}
        if bad:
            raise CheckpointError(f"thresholds.json: thresholds must be numbers in [0, 1], got {bad}")
        self.thresholds = np.array([thresholds[t] for t in self.labels], dtype=np.float32)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, backend: str | None = None, device: str | None = None,
        precision: str | None = None, batch_size: int | None = None,
        recheck_margin: float | Mapping[str, float] | None = None, num_threads: int | None = None,
    ) -> Tagger:
        """Options left None take conf/predict.yaml's values (see there for what each means)."""
        given = {"backend": backend, "precision": precision, "batch_size": batch_size,
                 "recheck_margin": recheck_margin, "num_threads": num_threads}
        # `is None`, not `or`: batch_size=0 is an error to report, not a request for the default.
        options = {k: predict_defaults()[k] if v is None else v for k, v in given.items()}
        check_predict_options(options)
        path = check_checkpoint(path)
        chosen = choose_backend(options.pop("backend"), path, device)
        if chosen == "onnx":
            from abstract_tagger.onnx_backend import OnnxBackend

            model = OnnxBackend.load(path, **options)
        else:
            from abstract_tagger.torch_backend import TorchBackend

            model = TorchBackend.load(path, device=device, **options)
        thresholds = read_json(path / "thresholds.json")
        try:
            blend = RuleBlend.load(path, model.labels)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: bad {RULES_FILE}: {e}") from None
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
        # The blended score crosses `cut` exactly where the model's score crosses
        # (cut - w * rules) / (1 - w): rescoring papers near *that* is what keeps fp32's tags. (Near
        # `cut` in blended space would rescore papers whose rule score alone sits near it: 61%.)
        w = self.blend.weight
        with np.errstate(divide="ignore", invalid="ignore"):
            model_cut = np.clip((cut - w * rules) / (1 - w), 0.0, 1.0)
        return self.blend.mix(self.backend.probabilities(texts, model_cut), rules)

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
