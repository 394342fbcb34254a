"""Draw papers to label by hand from a recent-corpus file, stratified by primary arXiv category.

Stratified by primary arXiv category, proportional allocation: every category with at least 1% of
the papers is its own stratum, the rest share one. Seeded, so each draw is reproducible. The
recent gold sets (drawn once, before any labelling function changed):

    python scripts/sample_recent_gold.py ../shared/data/arxiv_2025_26.jsonl.gz --out-dir data/gold_draw

writes `test.jsonl` (220) and `dev.jsonl` (110). The clean training core, drawn from the committed
slice's papers outside every dev and test set (so `make train`'s corpus is unchanged):

    python scripts/sample_recent_gold.py data/arxiv_recent_subset.jsonl.gz --out-dir data/gold_draw \
        --splits train=2000 --seed 2027 --exclude data/gold_recent_dev.jsonl data/gold_recent_test.jsonl

Each output holds id, title, abstract: the papers to label by hand following ANNOTATION.md, from
title and abstract alone (categories are left out on purpose).
"""

import argparse
import gzip
import json
import random
from collections import defaultdict
from pathlib import Path


def splits(text: str) -> list[tuple[str, int]]:
    return [(name, int(n)) for name, n in (part.split("=") for part in text.split(","))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--splits", type=splits, default="test=220,dev=110",
                    help="name=count,...: the drawn papers are cut into these files in this order")
    ap.add_argument("--exclude", type=Path, nargs="*", default=[], help="gold files whose papers are never drawn")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()

    excluded = {json.loads(line)["id"] for path in args.exclude for line in path.open(encoding="utf-8") if line.strip()}
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        papers = [p for p in map(json.loads, f) if p["id"] not in excluded]
    by_primary = defaultdict(list)
    for p in papers:
        by_primary[p["categories"].split()[0]].append(p)
    strata = defaultdict(list)
    for cat, members in by_primary.items():
        strata[cat if len(members) >= 0.01 * len(papers) else "other"].extend(members)

    # Largest-remainder proportional allocation of all splits together over the strata.
    total = sum(n for _, n in args.splits)
    quota = {s: total * len(m) / len(papers) for s, m in strata.items()}
    alloc = {s: int(q) for s, q in quota.items()}
    for s in sorted(quota, key=lambda s: quota[s] - alloc[s], reverse=True)[: total - sum(alloc.values())]:
        alloc[s] += 1

    rng = random.Random(args.seed)
    drawn = []
    for s in sorted(strata):
        drawn += rng.sample(sorted(strata[s], key=lambda p: p["id"]), alloc[s])
    rng.shuffle(drawn)  # every split keeps the strata's proportions in expectation
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, n in args.splits:
        with open(args.out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for p in drawn[start : start + n]:
                f.write(json.dumps({"id": p["id"], "title": p["title"], "abstract": p["abstract"]}) + "\n")
        start += n
    print({s: alloc[s] for s in sorted(alloc, key=alloc.get, reverse=True)})


if __name__ == "__main__":
    main()
