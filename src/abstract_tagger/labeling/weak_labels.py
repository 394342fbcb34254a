"""Weak labels for a corpus of any size, streamed: labelling functions vote on every paper and tag,
a label model turns the votes into per-tag probabilities, and a report says how good each function
and model is.

    wl = build_weak_labels(cfg)   # cfg: composed Hydra config with data, taxonomy, labeling, paths
    wl.write(out_dir)             # weak_labels.jsonl, lf_report.md, lf_report.json (+ rejects.jsonl)
    for papers, probs, votes in wl.chunks(): ...   # the kept papers in corpus order, with their
                                                  # probabilities and the functions' votes

The run, one chunk of `labeling.chunk_size` papers in memory at a time:
  1. vote: the corpus is read once; each chunk's papers and votes are saved as soon as they are
     computed, so a killed run continues after its last finished chunk. Under `torchrun` or
     `accelerate launch` every rank reads the stream and votes every N-th chunk (the sentence encoder
     is the cost), then the main process carries on alone;
  2. fit: the label models are fitted on the votes of the first `labeling.fit_max_records` papers;
  3. apply: the model in use turns each chunk's votes into probabilities; the function statistics and
     the gold dev scores are accumulated in the same pass.

Everything lives in `paths.cache_dir/weak_labels/<key>/`, the key hashing the corpus files, the
configs and this code, so a finished result is reused as it is; embeddings are cached separately,
per text (see `embedding`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf

from abstract_tagger.common.bundled import resolve_path
from abstract_tagger.common.files import file_digest, write_atomic, write_json
from abstract_tagger.common.runtime import fast_precision, process_state
from abstract_tagger.data.corpus import CorpusStats, Paper, batched, read_corpus, read_gold_sets
from abstract_tagger.data.taxonomy import Taxonomy
from abstract_tagger.labeling import embedding
from abstract_tagger.labeling.embedding import EmbeddingCache, SentenceEncoder
from abstract_tagger.labeling.functions import LabelingFunctions, build_functions
from abstract_tagger.labeling.label_model import LearnedLabelModel, MajorityVote
from abstract_tagger.labeling.report import FunctionStats, gold_report, to_markdown

log = logging.getLogger(__name__)

RESULT = "result.json"  # written last: a directory without it is a run still going, or killed
REJECTS = "rejects.jsonl"


def _chunk_path(root: Path, i: int) -> Path:
    return root / f"chunk-{i:06d}.npz"


def _probs_path(root: Path, i: int) -> Path:
    return root / f"probs-{i:06d}.npy"


def save_chunk(path: Path, papers: list[Paper], votes: np.ndarray) -> None:
    """A chunk's votes, its papers' ids and titles (what the label model's pass and weak_labels.jsonl
    read), and the whole papers for training (zlib-compressed). JSON and arrays, no pickle, so loading
    a chunk cannot run code."""
    index = json.dumps([[p.id, p.title] for p in papers]).encode()
    blob = zlib.compress(json.dumps([[p.abstract, p.categories, p.source, p.line] for p in papers]).encode(), 1)
    write_atomic(path, lambda f: np.savez(f, votes=votes, index=np.frombuffer(index, dtype=np.uint8),
                                          papers=np.frombuffer(blob, dtype=np.uint8)))


def load_index(path: Path) -> tuple[list[list[str]], np.ndarray]:
    """A chunk's [id, title] pairs and votes."""
    with np.load(path, allow_pickle=False) as saved:
        return json.loads(saved["index"].tobytes()), saved["votes"]


def read_chunks(root: Path, n_chunks: int) -> Iterator[tuple[list[Paper], np.ndarray, np.ndarray]]:
    """The kept papers of a finished result in `root`, in corpus order, a chunk at a time, with their
    probabilities and the functions' votes."""
    for i in range(n_chunks):
        papers, votes = load_chunk(_chunk_path(root, i))
        yield papers, _load_probs(root, i), votes


def _load_probs(root: Path, i: int) -> np.ndarray:
    return np.load(_probs_path(root, i), allow_pickle=False)


def load_chunk(path: Path) -> tuple[list[Paper], np.ndarray]:
    with np.load(path, allow_pickle=False) as saved:
        index, votes, blob = json.loads(saved["index"].tobytes()), saved["votes"], saved["papers"].tobytes()
    return [Paper(pid, title, abstract, tuple(cats), source, line)
            for (pid, title), (abstract, cats, source, line) in zip(index, json.loads(zlib.decompress(blob)))], votes


@dataclass
class WeakLabels:
    """A finished weak-labelling result on disk: per-tag probabilities (float32, `tag_ids` order) for
    every kept paper, gold dev papers included (the report scores them; training leaves them out)."""

    root: Path
    tag_ids: list[str]
    report: dict[str, Any]
    threshold: float
    n_papers: int
    n_chunks: int
    # Whether rejects were collected (data.on_error=skip) rather than raised.
    skipped_rejects: bool = False

    def chunks(self) -> Iterator[tuple[list[Paper], np.ndarray, np.ndarray]]:
        """The kept papers in corpus order, one chunk at a time, with their probabilities and the
        functions' votes [papers, functions, tags] (`report["functions"]` names the columns)."""
        return read_chunks(self.root, self.n_chunks)

    def chunk(self, i: int) -> tuple[list[Paper], np.ndarray, np.ndarray]:
        papers, votes = load_chunk(_chunk_path(self.root, i))
        return papers, _load_probs(self.root, i), votes

    def index(self, i: int) -> list[list[str]]:
        """Chunk `i`'s [id, title] pairs, without decompressing its papers."""
        return load_index(_chunk_path(self.root, i))[0]

    def fit_votes(self, limit: int) -> np.ndarray:
        """The votes the label models are fitted on: the first `limit` papers'."""
        return _fit_votes(self.root, self.n_chunks, limit)

    def write(self, out_dir: str | Path) -> None:
        """Each file whole or not at all (a reused run directory keeps its previous good files if the disk
        fills), rejects first: a run whose corpus has none removes a previous run's rejects file."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.skipped_rejects:
            write_atomic(out / REJECTS, self._copy_rejects)
            rejected = self.report["corpus"]["rejected"]
            if rejected:
                log.warning("%d bad records skipped, listed in %s", rejected, out / REJECTS)
        else:
            (out / REJECTS).unlink(missing_ok=True)
        write_atomic(out / "weak_labels.jsonl", self._write_rows)
        write_json(out / "lf_report.json", self.report, indent=2)
        write_atomic(out / "lf_report.md", lambda f: f.write(to_markdown(self.report).encode()))

    def _copy_rejects(self, f: IO[bytes]) -> None:
        with open(self.root / REJECTS, "rb") as src:
            shutil.copyfileobj(src, f)

    def _write_rows(self, f: IO[bytes]) -> None:
        for i in range(self.n_chunks):
            for (pid, title), row in zip(self.index(i), _load_probs(self.root, i)):
                p = {tag: round(float(v), 6) for tag, v in zip(self.tag_ids, row)}
                tags = [tag for tag, v in p.items() if v >= self.threshold]
                f.write((json.dumps({"id": pid, "title": title, "tags": tags, "probs": p}) + "\n").encode())

    @classmethod
    def load(cls, root: Path) -> WeakLabels | None:
        """A finished result, or None where there is none or it is damaged (with a warning): it is rebuilt."""
        if not (root / RESULT).is_file():
            return None
        try:
            labels = cls(root=root, **json.loads((root / RESULT).read_text(encoding="utf-8")))
            missing = [p.name for i in range(labels.n_chunks) for p in (_chunk_path(root, i), _probs_path(root, i))
                       if not p.is_file()]
            if missing:
                raise ValueError(f"missing {missing[:3]}")
            return labels
        except (OSError, ValueError, TypeError) as e:
            log.warning("%s: unreadable weak-label cache (%s: %s); rebuilding it", root, type(e).__name__, e)
            return None


def make_encoder(cfg: Mapping[str, Any], cache_dir: Path, device: Any = "cpu") -> SentenceEncoder:
    """`cfg` is `labeling.embedding`; `device`: this process's (a rank's GPU under a launcher)."""
    model_path = resolve_path(cfg["model_path"])
    precision = cfg["precision"]
    # auto: bf16 where this hardware runs it faster than fp32 (measured on CPU), else fp32.
    bf16 = (fast_precision(torch.device(device).type) if precision == "auto" else precision) == "bf16"
    max_length = cfg.get("max_length")
    # One store per model, precision (bf16 and fp32 vectors differ slightly), token limit and encoder
    # code, so vectors an earlier version of the encoder computed are never served.
    code = Path(embedding.__file__).read_bytes()
    tag = hashlib.blake2b(f"{model_path}|bf16={bf16}|".encode() + code
                          + (f"|max_length={max_length}".encode() if max_length is not None else b""),
                          digest_size=6).hexdigest()
    cache = EmbeddingCache(cache_dir / "embeddings" / tag)
    return SentenceEncoder(model_path, batch_size=cfg["batch_size"], bf16=bf16, max_length=max_length, cache=cache,
                           device=str(device))


def _code_digest() -> str:
    """The code that turns a corpus into weak labels: editing it invalidates cached results."""
    package = Path(__file__).parent
    files = sorted(package.glob("*.py")) + sorted((package.parent / "data").glob("*.py"))
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def resolve_embedding_precision(labeling: dict[str, Any], state) -> dict[str, Any]:
    """`labeling` with `embedding.precision: auto` resolved to bf16 or fp32: the main process measures
    and every rank uses its answer, so one result never mixes vectors of both, and the cache key names
    the precision the votes were made with."""
    embedding_cfg = labeling["embedding"]
    if "embedding" not in labeling["functions"] or embedding_cfg["precision"] != "auto":
        return labeling
    choice = [fast_precision(torch.device(state.device).type) if state.is_main_process else None]
    broadcast_object_list(choice)
    return {**labeling, "embedding": {**embedding_cfg, "precision": "bf16" if choice[0] == "bf16" else "fp32"}}


def cache_key(cfg: DictConfig, labeling: Mapping[str, Any] | None = None) -> str:
    """Hash of everything the result depends on: corpus and gold file contents, the data,
    taxonomy and labeling configs (`labeling`: the labeling config as run, its precision resolved;
    minus the cache switch), and the code."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    labeling = dict(labeling or OmegaConf.to_container(cfg.labeling, resolve=True))
    labeling.pop("cache", None)
    parts = {
        "code": _code_digest(),
        "files": {name: file_digest(spec["path"]) for name, spec in data["sources"].items()},
        "gold": {f"{split}/{name}": file_digest(path) for split, named in data["gold"].items()
                 for name, path in (named or {}).items() if path},
        "data": data,
        "taxonomy": OmegaConf.to_container(cfg.taxonomy, resolve=True),
        "labeling": labeling,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def build_weak_labels(cfg: DictConfig) -> WeakLabels:
    """The weak labels of the configured corpus, from the cache where finished. Under a launcher every
    rank calls it: ranks share the voting, and every rank gets the same result."""
    taxonomy = Taxonomy.from_config(cfg.taxonomy)
    state = process_state()
    labeling = resolve_embedding_precision(OmegaConf.to_container(cfg.labeling, resolve=True), state)
    cache_dir = Path(cfg.paths.cache_dir)
    root = cache_dir / "weak_labels" / cache_key(cfg, labeling)
    if labeling["cache"] and (labels := WeakLabels.load(root)) is not None:
        log.info("%s (cached: %s)", labels.report["corpus"]["summary"], root)
        return labels
    with state.main_process_first():
        if state.is_main_process and (not labeling["cache"] or (root / RESULT).is_file()):
            shutil.rmtree(root, ignore_errors=True)  # cache off, or a damaged result: from scratch
        root.mkdir(parents=True, exist_ok=True)

    functions = build_functions(taxonomy, labeling,
                                lambda: make_encoder(labeling["embedding"], cache_dir, state.device))
    stats, n_chunks = vote_corpus(cfg, functions, root, labeling["chunk_size"], state)
    state.wait_for_everyone()
    if state.is_main_process:
        report = fit_and_apply(cfg, taxonomy, labeling, functions.names, root, n_chunks, stats)
        result = {"tag_ids": taxonomy.ids, "report": report, "threshold": labeling["threshold"],
                  "n_papers": stats.kept, "n_chunks": n_chunks, "skipped_rejects": cfg.data.on_error == "skip"}
        write_json(root / RESULT, result)
    state.wait_for_everyone()
    labels = WeakLabels.load(root)
    if labels is None:
        raise RuntimeError(f"{root}: the weak labels were not written")
    return labels


def vote_corpus(cfg: DictConfig, functions: LabelingFunctions, root: Path, chunk_size: int,
                state) -> tuple[CorpusStats, int]:
    """Read the corpus once and save every chunk this rank votes on (every `num_processes`-th); chunks
    a killed run finished are kept. Returns the reader's accounting and the number of chunks."""
    stats = CorpusStats()
    skip = cfg.data.on_error == "skip"
    # Each rank reads the whole stream (chunk boundaries must agree); the main one lists the rejects.
    rejects = root / REJECTS if state.is_main_process else Path(os.devnull)
    papers = read_corpus(OmegaConf.to_container(cfg.data.sources, resolve=True), on_error=cfg.data.on_error,
                         rejects_path=rejects if skip else None, dedupe=cfg.data.dedupe,
                         max_chars=cfg.data.max_chars, stats=stats)
    n_chunks = voted = kept = 0
    for i, chunk in enumerate(batched(papers, chunk_size)):
        n_chunks = i + 1
        path = _chunk_path(root, i)
        if i % state.num_processes != state.process_index:
            continue
        if path.is_file():
            kept += 1
            continue
        save_chunk(path, chunk, functions(chunk))
        voted += 1
        if voted % 10 == 0:
            log.info("voted %d chunks (%d papers read)", voted, stats.kept)
    log.info("process %d of %d: voted %d chunk(s), kept %d finished by an earlier run, of %d",
             state.process_index, state.num_processes, voted, kept, n_chunks)
    log.info("%s", stats.summary())
    if not stats.kept:
        raise ValueError(f"no papers to label: {stats.summary()}")
    return stats, n_chunks


def _fit_votes(root: Path, n_chunks: int, limit: int) -> np.ndarray:
    parts: list[np.ndarray] = []
    n = 0
    for i in range(n_chunks):
        if n >= limit:
            break
        parts.append(load_index(_chunk_path(root, i))[1][: limit - n])
        n += len(parts[-1])
    return np.concatenate(parts)


def fit_and_apply(cfg: DictConfig, taxonomy: Taxonomy, labeling: dict[str, Any], names: list[str], root: Path,
                  n_chunks: int, stats: CorpusStats) -> dict[str, Any]:
    """Fit both label models on the first votes, apply the one in use chunk by chunk, and build the
    report (function statistics over the corpus, scores on every dev set) in the same pass."""
    votes = _fit_votes(root, n_chunks, labeling["fit_max_records"])
    n_fit = len(votes)
    # Both models, whichever is in use: the report compares them on the gold papers.
    models = {"majority": MajorityVote().fit(votes), "learned": LearnedLabelModel(labeling["label_model"]).fit(votes)}
    del votes
    in_use = models[labeling["model"]]

    dev_sets = read_gold_sets(cfg.data.gold, taxonomy.ids).get("dev", {})
    gold_ids = {pid for gold in dev_sets.values() for pid in gold.tags}
    gold_papers: list[Paper] = []  # id and title: what the join to the gold sets checks
    gold_votes: list[np.ndarray] = []
    function_stats = FunctionStats(names, taxonomy.ids)
    for i in range(n_chunks):
        index, votes = load_index(_chunk_path(root, i))
        write_atomic(_probs_path(root, i), lambda f: np.save(f, in_use.predict_proba(votes).astype(np.float32)))
        function_stats.add(votes)
        rows = [r for r, (pid, _) in enumerate(index) if pid in gold_ids]
        gold_papers += [Paper(*index[r], abstract="") for r in rows]
        gold_votes.append(votes[rows])

    report: dict[str, Any] = {
        "corpus": {"summary": stats.summary(), "read": stats.read, "kept": stats.kept,
                   "duplicates": stats.duplicates, "rejected": stats.rejected, "per_source": stats.per_source},
        "model": labeling["model"], "functions": names, "tag_ids": taxonomy.ids, "n_fit": n_fit,
        "n_papers": stats.kept, "function_stats": function_stats.to_dict(),
        "estimated_accuracy": {tag: {names[j]: acc for j, acc in accs.items()}
                               for tag, accs in zip(taxonomy.ids, models["learned"].accuracies())},
        "class_prior": dict(zip(taxonomy.ids, models["learned"].priors.tolist())),
        "gold": {},
    }
    # The report scores functions and label models on every dev set; test sets are left for the end.
    votes = np.concatenate(gold_votes)
    for name, gold in dev_sets.items():
        rows = gold.rows(gold_papers)
        report["gold"][name] = gold_report(votes[rows], {m: model.predict_proba(votes[rows])
                                                         for m, model in models.items()},
                                           gold.labels(taxonomy.ids), names, taxonomy.ids, labeling["threshold"])
        report["gold"][name]["label_model"] = report["gold"][name][labeling["model"]]
    return report
