"""The weak-labelled corpus as training reads it, at any size:

    data = training_data(cfg, weak, gold_sets, gold_train, tag_ids, tokenizer)
    data.train      # the training papers, tokenised, with soft targets: an Arrow dataset on disk
    data.held_out   # every gold paper (dev and test sets), in memory, never trained on

The training papers stream from the weak labels' chunks into a Hugging Face `datasets` Arrow file
under `paths.cache_dir/train_data/`, which is memory-mapped: a corpus of millions costs disk, not RAM.
`data.max_train_papers` keeps a seeded sample of them (hand-labelled papers always stay).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import datasets
from datasets import Dataset, Features, List, Value
from omegaconf import DictConfig

from abstract_tagger.corpus import CorpusError, GoldSet, Paper
from abstract_tagger.labeling.weak_labels import WeakLabels

PAPER_COLUMNS = ("id", "title", "abstract", "categories")
if not sys.stderr.isatty():
    datasets.disable_progress_bars()  # in a log file a bar is hundreds of frames


@dataclass
class Split:
    """Row indices into the held-out papers: each gold set's papers, and their gold labels."""

    sets: dict[str, np.ndarray]      # "dev/seed", "dev/recent", "test/recent", ... -> rows
    labels: dict[str, np.ndarray]    # same keys -> 0/1 gold [papers, tags]

    def of(self, split: str) -> list[str]:
        return [name for name in self.sets if name.startswith(f"{split}/")]

    def rows(self, split: str) -> np.ndarray:
        return np.concatenate([self.sets[n] for n in self.of(split)] or [np.zeros(0, np.int64)])

    def gold(self, split: str) -> np.ndarray:
        return np.concatenate([self.labels[n] for n in self.of(split)])


def split_gold(papers: Sequence[Paper], gold_sets: Mapping[str, Mapping[str, GoldSet]], tag_ids: list[str]) -> Split:
    """Each gold set's rows in `papers` (joined by id, checked by title)."""
    sets = {f"{split}/{name}": gold.rows(papers) for split, named in gold_sets.items() for name, gold in named.items()}
    labels = {f"{split}/{name}": gold.labels(tag_ids) for split, named in gold_sets.items()
              for name, gold in named.items()}
    if not any(k.startswith("dev/") for k in sets):
        raise ValueError("data.gold.dev: at least one dev set is needed to choose thresholds and score")
    return Split(sets, labels)


@dataclass
class TrainingData:
    train: Dataset              # model inputs, `labels` (soft targets; hand labels where given), `hand`, paper columns
    held_out: list[Paper]       # the gold papers, in corpus order
    held_out_weak: np.ndarray   # their weak-label probabilities
    split: Split                # rows of `held_out`
    n_corpus: int               # papers in the corpus, held out included

    @property
    def n_hand(self) -> int:
        return int(np.asarray(self.train.with_format("numpy")["hand"]).sum()) if len(self.train) else 0

    def train_papers(self, limit: int, batch_size: int = 4096) -> Iterator[list[Paper]]:
        """The first `limit` training papers, `batch_size` at a time."""
        rows = self.train.select_columns(list(PAPER_COLUMNS)).select(range(min(limit, len(self.train))))
        for batch in rows.iter(batch_size=batch_size):
            yield [Paper(*fields[:3], tuple(fields[3])) for fields in zip(*(batch[c] for c in PAPER_COLUMNS))]


def _training_rows(weak_root: str, n_chunks: int, skip_ids: tuple[str, ...], hand: Mapping[str, list[int]],
                   keep: tuple[int, ...] | None) -> Iterator[dict[str, Any]]:
    """The training papers of the weak labels with their targets; `keep`: sorted positions of the
    sample among them (None: all). Tuples, not lists: `datasets` splits list arguments into shards."""
    weak = WeakLabels(root=Path(weak_root), tag_ids=[], report={}, threshold=0.5, n_papers=0, n_chunks=n_chunks)
    skip = set(skip_ids)
    wanted = iter(keep) if keep is not None else None
    next_wanted = next(wanted, None) if wanted is not None else None
    position = 0
    for papers, probs in weak.chunks():
        for paper, row in zip(papers, probs):
            if paper.id in skip:
                continue
            sampled = wanted is None or position == next_wanted
            if sampled and wanted is not None:
                next_wanted = next(wanted, None)
            position += 1
            if sampled or paper.id in hand:
                labels = hand.get(paper.id)
                yield {"id": paper.id, "title": paper.title, "abstract": paper.abstract,
                       "categories": list(paper.categories),
                       "labels": row.tolist() if labels is None else labels, "hand": labels is not None}


def training_data(cfg: DictConfig, weak: WeakLabels, gold_sets: Mapping[str, Mapping[str, GoldSet]],
                  gold_train: GoldSet | None, tag_ids: list[str]) -> TrainingData:
    """Hold out every gold paper, stream the rest into the training dataset (the main process builds
    it; other ranks load the same cache files: call under `main_process_first`)."""
    held_ids = {pid for named in gold_sets.values() for gold in named.values() for pid in gold.tags}
    hand: dict[str, list[int]] = {}
    if gold_train is not None:
        for pid, row in zip(gold_train.tags, gold_train.labels(tag_ids).tolist()):
            if pid in held_ids:
                raise CorpusError(gold_train.path, gold_train.lines[pid], f"{pid}: is in a dev or test gold set; "
                                  "hand labels of held-out papers cannot be training targets")
            hand[pid] = row

    held_out, held_weak, hand_papers = [], [], []
    wanted = held_ids | set(hand)
    for i in range(weak.n_chunks):
        if wanted.isdisjoint(pid for pid, _ in weak.index(i)):
            continue  # most chunks of a big corpus: their papers are not even decompressed
        papers, probs = weak.chunk(i)
        for paper, row in zip(papers, probs):
            if paper.id in held_ids:
                held_out.append(paper)
                held_weak.append(row)
            elif paper.id in hand:
                hand_papers.append(paper)
    split = split_gold(held_out, gold_sets, tag_ids)  # a gold paper missing from the corpus stops here
    if gold_train is not None:
        gold_train.rows(hand_papers)  # so does a hand-labelled one, or a title that does not match

    n_train = weak.n_papers - len(held_out)
    limit = cfg.data.max_train_papers
    keep = None
    if limit is not None and limit < n_train:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(n_train, limit, replace=False)).tolist()
    features = Features({"id": Value("string"), "title": Value("string"), "abstract": Value("string"),
                         "categories": List(Value("string")),
                         "labels": List(Value("float32"), length=len(tag_ids)), "hand": Value("bool")})
    gen_kwargs = {"weak_root": str(weak.root), "n_chunks": weak.n_chunks, "skip_ids": tuple(sorted(held_ids)),
                  "hand": hand, "keep": tuple(keep) if keep is not None else None}
    # The arguments and this code: a dataset an earlier version built is never served.
    fingerprint = hashlib.sha256(json.dumps(gen_kwargs, sort_keys=True).encode()
                                 + Path(__file__).read_bytes()).hexdigest()[:32]
    train = Dataset.from_generator(_training_rows, features=features, gen_kwargs=gen_kwargs,
                                   cache_dir=str(Path(cfg.paths.cache_dir) / "train_data"), fingerprint=fingerprint)
    return TrainingData(train, held_out, np.array(held_weak, dtype=np.float32).reshape(-1, len(tag_ids)), split,
                        weak.n_papers)


def tokenize(dataset: Dataset, tokenizer, max_length: int) -> Dataset:
    """Model inputs for every row of `dataset` (which has `title` and `abstract`); the paper columns
    dropped, `labels` and `hand` kept. Cached beside an on-disk dataset, so a big corpus is tokenised once."""
    keep = [c for c in ("labels", "hand") if c in dataset.column_names]

    def encode_batch(batch: dict[str, list]) -> dict[str, list]:
        texts = [Paper("", t, a).text for t, a in zip(batch["title"], batch["abstract"])]
        return dict(tokenizer(texts, truncation=True, max_length=max_length))

    fingerprint = hashlib.sha256(f"{dataset._fingerprint}|{tokenizer.name_or_path}|{max_length}|"
                                 f"{tokenizer.vocab_size}".encode()).hexdigest()[:32]
    return dataset.map(encode_batch, batched=True, remove_columns=[c for c in dataset.column_names if c not in keep],
                       new_fingerprint=fingerprint, desc="tokenising")


def papers_dataset(papers: Sequence[Paper]) -> Dataset:
    """An in-memory dataset of a few papers (held-out, review), for `tokenize`."""
    return Dataset.from_dict({"title": [p.title for p in papers], "abstract": [p.abstract for p in papers]})
