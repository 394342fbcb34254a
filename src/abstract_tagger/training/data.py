"""The weak-labelled corpus as training reads it, at any size:

    data = training_data(cfg, weak, gold_sets, gold_train, tag_ids, tokenizer, max_length)
    data.train      # the training papers, tokenised, with soft targets: an Arrow dataset on disk
    data.held_out   # every gold paper (dev and test sets), in memory, never trained on

The training papers stream from the weak labels' chunks, tokenised a chunk at a time, into a Hugging
Face `datasets` Arrow file under `paths.cache_dir/train_data/`, which is memory-mapped: a corpus of
millions costs disk, not RAM, and training reads only the rows of its batches. Whatever needs the
papers' text again (the rule blend, the review pool) streams it from the chunks.
`data.max_train_papers` keeps a seeded sample of them (hand-labelled papers always stay).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets import Dataset, Features, List, Value
from omegaconf import DictConfig

from abstract_tagger.data.corpus import CorpusError, GoldSet, Paper, batched
from abstract_tagger.labeling.weak_labels import WeakLabels, read_chunks

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
    train: Dataset              # tokenised training papers: `id`, model inputs, `labels` (soft targets; hand
                                # labels where given), `hand`
    held_out: list[Paper]       # the gold papers, in corpus order
    held_out_weak: np.ndarray   # their weak-label probabilities
    split: Split                # rows of `held_out`
    n_corpus: int               # papers in the corpus, held out included
    selection: dict[str, Any]   # which papers train, on what targets (`_training_papers`' arguments)
    vote_names: list[str]       # the labelling functions' vote columns, as the weak labels stored them
    held_out_votes: np.ndarray  # their votes on the held-out papers [papers, functions, tags]

    @property
    def n_hand(self) -> int:
        return int(np.asarray(self.train.with_format("numpy")["hand"]).sum()) if len(self.train) else 0

    def train_papers(self, limit: int) -> Iterator[tuple[list[Paper], np.ndarray, np.ndarray]]:
        """The first `limit` training papers with their targets and stored votes, a chunk at a time, read
        from the weak labels' chunks rather than the Arrow file: a scan of a memory-mapped file keeps
        every page it touched in the process's memory."""
        left = limit
        for papers, targets, _, votes in _training_papers(**self.selection):
            if left <= 0:
                return
            # A chunk yields 1+ papers.
            yield papers[:left], np.asarray(targets[:left], dtype=np.float32), votes[:left]
            left -= len(papers)


def _training_papers(weak_root: str, n_chunks: int, skip_ids: tuple[str, ...], hand: Mapping[str, list[int]],
                     keep: tuple[int, ...] | None) -> Iterator[tuple[list[Paper], list[list[float]], list[bool],
                                                                     np.ndarray]]:
    """Per weak-label chunk: its training papers, their targets (hand labels where given), which are
    hand-labelled, and the labelling functions' stored votes on them. `keep`: sorted positions of the
    sample among the training papers (None: all)."""
    skip = set(skip_ids)
    wanted = iter(keep) if keep is not None else None
    next_wanted = next(wanted, None) if wanted is not None else None
    position = 0
    for papers, probs, votes in read_chunks(Path(weak_root), n_chunks):
        chosen: tuple[list[Paper], list[list[float]], list[bool]] = ([], [], [])
        rows: list[int] = []
        for i, (paper, row) in enumerate(zip(papers, probs)):
            if paper.id in skip:
                continue
            sampled = wanted is None or position == next_wanted
            if sampled and wanted is not None:
                next_wanted = next(wanted, None)
            position += 1
            if sampled or paper.id in hand:
                labels = hand.get(paper.id)
                chosen[0].append(paper)
                chosen[1].append(row.tolist() if labels is None else labels)
                chosen[2].append(labels is not None)
                rows.append(i)
        if chosen[0]:
            yield *chosen, votes[rows]


def _training_rows(selection: Mapping[str, Any], tokenizer, max_length: int) -> Iterator[dict[str, Any]]:
    """The rows of the training dataset, tokenised a chunk at a time."""
    for papers, targets, hand, _ in _training_papers(**selection):
        inputs = encode(tokenizer, papers, max_length)
        for i, paper in enumerate(papers):
            yield {"id": paper.id, "labels": targets[i], "hand": hand[i], **{k: v[i] for k, v in inputs.items()}}


def training_data(cfg: DictConfig, weak: WeakLabels, gold_sets: Mapping[str, Mapping[str, GoldSet]],
                  gold_train: Sequence[GoldSet], tag_ids: list[str], tokenizer, max_length: int) -> TrainingData:
    """Hold out every gold paper, stream the rest, tokenised, into the training dataset (the main process
    builds it; other ranks load the same cache files: call under `main_process_first`)."""
    held_ids = {pid for named in gold_sets.values() for gold in named.values() for pid in gold.tags}
    hand: dict[str, list[int]] = {}
    for gold in gold_train:
        for pid, row in zip(gold.tags, gold.labels(tag_ids).tolist()):
            if pid in held_ids:
                raise CorpusError(gold.path, gold.lines[pid], f"{pid}: is in a dev or test gold set; "
                                  "hand labels of held-out papers cannot be training targets")
            hand[pid] = row

    held_out, held_weak, held_votes, hand_papers = [], [], [], []
    wanted = held_ids | set(hand)
    for i in range(weak.n_chunks):
        if wanted.isdisjoint(pid for pid, _ in weak.index(i)):
            continue  # most chunks of a big corpus: their papers are not even decompressed
        papers, probs, votes = weak.chunk(i)
        for paper, row, vote in zip(papers, probs, votes):
            if paper.id in held_ids:
                held_out.append(paper)
                held_weak.append(row)
                held_votes.append(vote)
            elif paper.id in hand:
                hand_papers.append(paper)
    split = split_gold(held_out, gold_sets, tag_ids)  # a gold paper missing from the corpus stops here
    for gold in gold_train:
        gold.rows(hand_papers)  # so does a hand-labelled one, or a title that does not match

    n_train = weak.n_papers - len(held_out)
    limit = cfg.data.max_train_papers
    keep = None
    if limit is not None and limit < n_train:
        keep = tuple(np.sort(np.random.default_rng(cfg.seed).choice(n_train, limit, replace=False)).tolist())
    # Tuples, not lists: `datasets` would split list arguments of the generator into shards.
    selection = {"weak_root": str(weak.root), "n_chunks": weak.n_chunks, "skip_ids": tuple(sorted(held_ids)),
                 "hand": hand, "keep": keep}
    inputs = {name: List(Value("int32")) for name in tokenizer("x")}
    features = Features({"id": Value("string"), "labels": List(Value("float32"), length=len(tag_ids)),
                         "hand": Value("bool"), **inputs})
    # The selection, the tokenizer and this code: a dataset an earlier version built is never served.
    tokenizer_id = f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{tokenizer.vocab_size}|{max_length}"
    fingerprint = hashlib.sha256(json.dumps([selection, tokenizer_id], sort_keys=True).encode()
                                 + Path(__file__).read_bytes()).hexdigest()[:32]
    train = Dataset.from_generator(
        _training_rows, features=features, cache_dir=str(Path(cfg.paths.cache_dir) / "train_data"),
        fingerprint=fingerprint, gen_kwargs={"selection": selection, "tokenizer": tokenizer, "max_length": max_length})
    n_functions = len(weak.report["functions"])
    return TrainingData(train, held_out, np.array(held_weak, dtype=np.float32).reshape(-1, len(tag_ids)), split,
                        weak.n_papers, selection, list(weak.report["functions"]),
                        np.array(held_votes, dtype=np.int8).reshape(-1, n_functions, len(tag_ids)))


def stored_votes(data: TrainingData, names: Sequence[str]) -> Callable[[np.ndarray], np.ndarray] | None:
    """Column selector of the functions `names` from stored votes, or None where the weak labels did
    not run all of them (then they vote again)."""
    if not set(names) <= set(data.vote_names):
        return None
    columns = [data.vote_names.index(n) for n in names]
    return lambda votes: votes[:, columns]


def encode(tokenizer, papers: Sequence[Paper], max_length: int) -> dict[str, list]:
    """Model inputs of `papers` (title and abstract), truncated where training truncates. A thousand
    at a time: a fast tokenizer keeps each text's truncated-off tokens until the call returns
    (~40 kB an abstract; 800 MB for 20,000 in one call)."""
    inputs: dict[str, list] = {}
    for batch in batched(papers, 1000):
        for name, values in tokenizer([p.text for p in batch], truncation=True, max_length=max_length).items():
            inputs.setdefault(name, []).extend(values)
    return inputs


def papers_dataset(papers: Sequence[Paper], tokenizer, max_length: int, labels: np.ndarray | None = None) -> Dataset:
    """An in-memory tokenised dataset of a few papers (dev, held-out, review), with `labels` where given."""
    columns: dict[str, Any] = encode(tokenizer, papers, max_length)
    if labels is not None:
        columns["labels"] = np.asarray(labels, dtype=np.float32).tolist()
    return Dataset.from_dict(columns)
