"""Weak labels: labelling functions vote on every paper and tag, a label model turns the votes
into per-tag probabilities, and a report says how good each function and model is.

    wl = build_weak_labels(cfg)   # cfg: composed Hydra config with data, taxonomy, labeling, paths
    wl.write(out_dir)             # weak_labels.jsonl, lf_report.md, lf_report.json (+ rejects.jsonl)

Results are cached under `paths.cache_dir/weak_labels/` by a hash of the corpus files, the
configs and this code; embeddings separately, per text (see `embedding`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from abstract_tagger.corpus import CorpusStats, Paper, batched, file_digest, read_corpus, read_gold_sets
from abstract_tagger.labeling import embedding
from abstract_tagger.labeling.embedding import EmbeddingCache, SentenceEncoder, resolve_model_path
from abstract_tagger.labeling.functions import LabelingFunctions, build_functions
from abstract_tagger.labeling.label_model import LABEL_MODELS, LearnedLabelModel, MajorityVote
from abstract_tagger.labeling.report import function_stats, gold_report, to_markdown
from abstract_tagger.taxonomy import Taxonomy

log = logging.getLogger(__name__)


@dataclass
class WeakLabels:
    """Per-tag probabilities for every kept paper (gold dev papers included: the report scores
    them; training must leave them out). `probs` is float32 [papers, tags] in `tag_ids` order."""

    papers: list[Paper]
    probs: np.ndarray
    tag_ids: list[str]
    report: dict[str, Any]
    cache_path: Path | None = None
    threshold: float = 0.5
    # Reader rejects as {source, line, reason}; None when data.on_error=raise.
    rejects: list[dict[str, Any]] | None = field(default=None, repr=False)

    def write(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "weak_labels.jsonl", "w", encoding="utf-8") as f:
            for paper, row in zip(self.papers, self.probs):
                probs = {tag: round(float(p), 6) for tag, p in zip(self.tag_ids, row)}
                tags = [tag for tag, p in probs.items() if p >= self.threshold]
                f.write(json.dumps({"id": paper.id, "title": paper.title, "tags": tags, "probs": probs}) + "\n")
        (out / "lf_report.json").write_text(json.dumps(self.report, indent=2) + "\n", encoding="utf-8")
        (out / "lf_report.md").write_text(to_markdown(self.report), encoding="utf-8")
        if self.rejects is not None:
            with open(out / "rejects.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rejects)
            if self.rejects:
                log.warning("%d bad records skipped, listed in %s", len(self.rejects), out / "rejects.jsonl")

    def save(self, path: Path) -> None:
        """The result cache: probabilities as an array, the rest as JSON, in one .npz. Unlike pickle,
        loading it cannot run code, so a cache directory others can write to is no risk."""
        meta = {"papers": [asdict(p) for p in self.papers], "tag_ids": self.tag_ids, "report": self.report,
                "threshold": self.threshold, "rejects": self.rejects}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, probs=self.probs, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> WeakLabels | None:
        """A cached result, or None (with a warning) where the file is damaged: it is rebuilt."""
        try:
            with np.load(path, allow_pickle=False) as saved:
                probs, meta = saved["probs"], json.loads(saved["meta"].tobytes())
            papers = [Paper(**{**p, "categories": tuple(p["categories"])}) for p in meta.pop("papers")]
            return cls(papers=papers, probs=probs, cache_path=path, **meta)
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
            log.warning("%s: unreadable weak-label cache (%s: %s); rebuilding it", path, type(e).__name__, e)
            return None


def vote(papers: Iterable[Paper], functions: LabelingFunctions, chunk_size: int) -> np.ndarray:
    """The vote matrix [papers, functions, tags] of a finite stream, computed chunk by chunk."""
    chunks = [functions(chunk) for chunk in batched(papers, chunk_size)]
    if not chunks:
        raise ValueError("no papers to vote on")
    return np.concatenate(chunks)


def stream_weak_labels(papers: Iterable[Paper], functions: LabelingFunctions, model: Any,
                       chunk_size: int) -> Iterator[tuple[list[Paper], np.ndarray]]:
    """Label a stream of any length with a fitted model, holding one chunk at a time."""
    for chunk in batched(papers, chunk_size):
        yield chunk, model.predict_proba(functions(chunk))


def make_encoder(cfg: Mapping[str, Any], cache_dir: Path) -> SentenceEncoder:
    """`cfg` is `labeling.embedding`."""
    model_path = resolve_model_path(cfg["model_path"])
    # One store per model, precision (bf16 and fp32 vectors differ slightly) and encoder code, so
    # vectors an earlier version of the encoder computed are never served.
    code = Path(embedding.__file__).read_bytes()
    tag = hashlib.blake2b(f"{model_path}|bf16={cfg['bf16']}|".encode() + code, digest_size=6).hexdigest()
    cache = EmbeddingCache(cache_dir / "embeddings" / f"{tag}.npz")
    return SentenceEncoder(model_path, batch_size=cfg["batch_size"], bf16=cfg["bf16"], cache=cache)


def _code_digest() -> str:
    """The code that turns a corpus into weak labels: editing it invalidates cached results."""
    package = Path(__file__).parent
    files = sorted(package.glob("*.py")) + [package.parent / "corpus.py", package.parent / "taxonomy.py"]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def cache_key(cfg: DictConfig) -> str:
    """Hash of everything the result depends on: corpus and gold file contents, the data,
    taxonomy and labeling configs (minus the cache switch), and the code."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    labeling = OmegaConf.to_container(cfg.labeling, resolve=True)
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
    taxonomy = Taxonomy.from_config(cfg.taxonomy)
    lcfg = OmegaConf.to_container(cfg.labeling, resolve=True)
    if lcfg["model"] not in LABEL_MODELS:
        raise ValueError(f"labeling.model must be one of {LABEL_MODELS}, got {lcfg['model']!r}")
    cache_dir = Path(cfg.paths.cache_dir)
    key = cache_key(cfg)
    cache_path = cache_dir / "weak_labels" / f"{key}.npz"
    if lcfg["cache"] and cache_path.is_file() and (labels := WeakLabels.load(cache_path)) is not None:
        log.info("%s (cached: %s)", labels.report["corpus"]["summary"], cache_path)
        return labels

    cache_path.parent.mkdir(parents=True, exist_ok=True)
    rejects_path = cache_path.with_suffix(".rejects.jsonl")
    rejects_path.unlink(missing_ok=True)
    stats = CorpusStats()
    papers = list(read_corpus(
        OmegaConf.to_container(cfg.data.sources, resolve=True), on_error=cfg.data.on_error,
        rejects_path=rejects_path, dedupe=cfg.data.dedupe, max_chars=cfg.data.max_chars, stats=stats,
    ))
    log.info("%s", stats.summary())
    if not papers:
        raise ValueError(f"no papers to label: {stats.summary()}")
    rejects = None
    if cfg.data.on_error == "skip":
        rejects = ([json.loads(line) for line in rejects_path.read_text(encoding="utf-8").splitlines()]
                   if rejects_path.is_file() else [])
        rejects_path.unlink(missing_ok=True)

    functions = build_functions(taxonomy, lcfg, lambda: make_encoder(lcfg["embedding"], cache_dir))
    chunk = lcfg["chunk_size"]
    votes = vote(papers, functions, chunk)
    fit_votes = votes[: lcfg["fit_max_records"]]
    # Both models, whichever is in use: the report compares them.
    models = {"majority": MajorityVote().fit(fit_votes),
              "learned": LearnedLabelModel(lcfg["label_model"]).fit(fit_votes)}
    all_probs = {name: np.concatenate([m.predict_proba(votes[i:i + chunk]) for i in range(0, len(votes), chunk)])
                 for name, m in models.items()}

    report: dict[str, Any] = {
        "corpus": {"summary": stats.summary(), "read": stats.read, "kept": stats.kept,
                   "duplicates": stats.duplicates, "rejected": stats.rejected, "per_source": stats.per_source},
        "model": lcfg["model"], "functions": functions.names, "tag_ids": taxonomy.ids, "n_fit": len(fit_votes),
        "function_stats": function_stats(fit_votes, functions.names, taxonomy.ids),
        "estimated_accuracy": {tag: {functions.names[j]: acc for j, acc in accs.items()}
                               for tag, accs in zip(taxonomy.ids, models["learned"].accuracies())},
        "class_prior": dict(zip(taxonomy.ids, models["learned"].priors.tolist())),
    }
    # The report scores functions and label models on every dev set; test sets are left for the end.
    report["gold"] = {}
    for name, gold in read_gold_sets(cfg.data.gold, taxonomy.ids).get("dev", {}).items():
        rows = gold.rows(papers)
        report["gold"][name] = gold_report(votes[rows], {m: p[rows] for m, p in all_probs.items()},
                                           gold.labels(taxonomy.ids), functions.names, taxonomy.ids,
                                           lcfg["threshold"])
        report["gold"][name]["label_model"] = report["gold"][name][lcfg["model"]]

    labels = WeakLabels(papers=papers, probs=all_probs[lcfg["model"]], tag_ids=taxonomy.ids, report=report,
                        cache_path=cache_path, threshold=lcfg["threshold"], rejects=rejects)
    labels.save(cache_path)
    return labels
