"""How far reduced precision (the int8 graph; OpenVINO's bf16) moves the checkpoint's logits, and what
each `recheck_margin` costs and keeps.

Scores papers once in reduced precision and once in fp32 (same engine), then, for each margin, the
share of papers `predict.py` would rescore in fp32 and the share whose tag set (rule blend included)
would still differ from fp32's. Papers are scored text only (title and abstract, no arXiv
categories), as users who have no categories run predict.py.

    python bench/recheck_margin.py ../shared/data/arxiv_2025_26.jsonl.gz --n 8000 --skip data/arxiv_recent_subset.jsonl.gz
    python bench/recheck_margin.py ... --precision bf16   # OpenVINO's bf16 matmuls (CPUs with bf16 instructions)
"""

from __future__ import annotations

import argparse
import os
from itertools import islice
from pathlib import Path

import numpy as np

from abstract_tagger import Tagger
from abstract_tagger.common.cpu import cpu_description
from abstract_tagger.data.corpus import Paper, read_source
from abstract_tagger.inference.backends.base import near_cut, sigmoid
from abstract_tagger.inference.tagger import as_text

ROOT = Path(__file__).resolve().parents[1]
MARGINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)


def papers(path: Path, n: int, every: int, skip: set[str]) -> list[Paper]:
    """Every `every`-th paper of `path` not in `skip`, `n` of them, without their categories."""
    read = (p for p in islice(read_source(path), 0, None, every) if isinstance(p, Paper) and p.id not in skip)
    return [Paper(p.id, p.title, p.abstract) for p in islice(read, n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="papers to score (any format predict.py reads)")
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--every", type=int, default=9, help="take every Nth paper (spread over the file)")
    parser.add_argument("--skip", type=Path, action="append", default=[], help="leave out the papers of these files")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints/abstract-tagger-minilm")
    parser.add_argument("--backend", default="openvino", choices=["openvino", "onnx"])
    parser.add_argument("--precision", default="int8", choices=["int8", "bf16"])
    args = parser.parse_args()

    skip = {p.id for path in args.skip for p in read_source(path) if isinstance(p, Paper)}
    sample = papers(args.input, args.n, args.every, skip)
    tagger = Tagger.from_pretrained(args.checkpoint, backend=args.backend, precision=args.precision,
                                    recheck_margin=0.0)
    texts = [as_text(p) for p in sample]
    reduced = tagger.backend.forward(texts, exact=False)
    fp32 = tagger.backend.forward(texts, exact=True)
    # Where predict.py rechecks: the model score at which the blended score crosses each tag's threshold.
    blend = tagger.blend
    rules = blend.rule_probs(sample) if blend else None
    cut = blend.model_cut(tagger.thresholds, rules) if blend else tagger.thresholds

    def tags(logits: np.ndarray) -> np.ndarray:
        probs = sigmoid(logits)
        return (blend.mix(probs, rules) if blend else probs) >= tagger.thresholds

    expected = tags(fp32)
    error = np.abs(reduced - fp32)
    print(f"{len(sample)} papers of {args.input.name}, {args.backend}, {cpu_description()}, {os.cpu_count()} CPUs")
    print(f"{args.precision} logit error: " + ", ".join(f"{q} {np.quantile(error, v):.3f}" for q, v in
                                              (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))) + f", max {error.max():.3f}")
    print("| recheck_margin | rescored in fp32 | tag sets unlike fp32 |")
    print("|---|---|---|")
    reduced_probs = sigmoid(reduced)
    for margin in MARGINS:
        near = near_cut(reduced_probs, cut, margin)  # Backend.probabilities' own test
        changed = (tags(np.where(near[:, None], fp32, reduced)) != expected).any(axis=1)
        print(f"| {margin} | {near.mean():.1%} | {changed.sum()} ({changed.mean():.2%}) |")


if __name__ == "__main__":
    main()
