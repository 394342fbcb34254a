"""Sentence embeddings for the zero-shot labelling function, cached per text.

Vectors are stored by content hash of the text they embed, so changing a keyword pattern, a
margin or the corpus mix re-embeds nothing that was embedded before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from abstract_tagger.common.bundled import BUNDLED_MINILM, resolve_path
from abstract_tagger.common.files import write_atomic

log = logging.getLogger(__name__)


KEY_BYTES = 16


def text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=KEY_BYTES).digest()


class EmbeddingCache:
    """An append-only {text hash: vector} store: a folder of segments, one per `add`, each a pair of
    `.npy` files (keys [n, 16] raw bytes, vectors [n, dim]).

    A segment is never rewritten, so adding to a store of millions costs what the new vectors cost,
    and vectors are memory-mapped, so a big store costs disk rather than RAM. Writers need no lock:
    each segment has its own name (process id and a counter) and appears by an atomic rename, keys
    last, so a reader sees whole segments only; processes that add at once (ranks of one launch,
    label.py beside train.py) each keep their own. Keys are raw bytes: numpy's `S16` strings drop
    trailing NUL bytes, which once made one key in 256 unreadable and shifted later vectors onto
    the wrong texts.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.index: dict[bytes, tuple[int, int]] = {}  # key -> (segment, row)
        self.segments: list[np.ndarray] = []
        self._seen: set[str] = set()
        self._added = 0
        self._load()

    def _load(self) -> None:
        """Index the segments other processes (or earlier runs) finished since the last look."""
        for keys_file in sorted(self.folder.glob("*.keys.npy")):
            if keys_file.name in self._seen:
                continue
            self._seen.add(keys_file.name)
            keys = np.load(keys_file, allow_pickle=False)
            vectors = np.load(keys_file.with_name(keys_file.name.replace(".keys.", ".vectors.")), mmap_mode="r",
                              allow_pickle=False)
            if keys.ndim != 2 or keys.shape[1] != KEY_BYTES or len(keys) != len(vectors):
                log.warning("%s: keys and vectors do not line up; ignoring this segment", keys_file)
                continue
            self.segments.append(vectors)
            segment = len(self.segments) - 1
            for row, key in enumerate(keys):
                self.index.setdefault(key.tobytes(), (segment, row))

    def get(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        found = [self.index.get(k) for k in keys]
        return [None if at is None else np.asarray(self.segments[at[0]][at[1]]) for at in found]

    def add(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        self._load()  # what other processes added since: not stored twice
        new = [(k, v) for k, v in zip(keys, vectors) if k not in self.index]
        if not new:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}-{os.getpid()}-{self._added}"
        self._added += 1
        stored_keys = np.frombuffer(b"".join(k for k, _ in new), dtype=np.uint8).reshape(-1, KEY_BYTES)
        for kind, array in (("vectors", np.stack([v for _, v in new])), ("keys", stored_keys)):
            write_atomic(self.folder / f"{name}.{kind}.npy", lambda f: np.save(f, array))
        self._load()


class SentenceEncoder:
    """The bundled MiniLM (or any sentence-transformers model) with L2-normalised outputs.

    On CPU, bf16 autocast uses the AMX units where present (about 3x the fp32 throughput);
    cosine similarities of normalised bf16 embeddings differ from fp32 by ~1e-3.
    """

    def __init__(self, model_path: str = BUNDLED_MINILM, *, batch_size: int = 64, bf16: bool = True,
                 max_length: int | None = None, cache: EmbeddingCache | None = None, device: str = "cpu"):
        import torch
        from sentence_transformers import SentenceTransformer

        # A str: SentenceTransformer takes a Path for a Hub id and fails offline.
        self.model = SentenceTransformer(str(resolve_path(model_path)), device=device)
        if max_length is not None:  # None: the model's own limit (256 tokens for MiniLM)
            self.model.max_seq_length = max_length
        self.batch_size = batch_size
        self.autocast = (torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if bf16
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
