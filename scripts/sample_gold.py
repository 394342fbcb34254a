"""Draw papers to label by hand from a corpus file, stratified by primary arXiv category.

The file is read as training reads a corpus source (format guessed from its name, or `--format`;
titles de-duplicated, `--max-chars` as `data.max_chars`), so the drawn ids are the ids training gives
those papers (`--id-prefix` as the data config's source name where the file has no ids). A paper
that another source of the corpus also holds is still dropped there as a duplicate: training names
it. Stratified by primary arXiv category, proportional allocation: every category with at least 1%
of the papers is its own stratum, the rest share one (a file without categories is one stratum).
Seeded, so each draw is reproducible. The recent gold sets (drawn once, before any labelling
function changed):

    python scripts/sample_gold.py ../shared/data/arxiv_2025_26.jsonl.gz --out-dir data/gold_draw

writes `test.jsonl` (220) and `dev.jsonl` (110). The recent clean training core, drawn from the
committed slice's papers outside every dev and test set (so `make train`'s corpus is unchanged):

    python scripts/sample_gold.py data/arxiv_recent_subset.jsonl.gz --out-dir data/gold_draw \
        --splits train=2000 --seed 2027 --exclude data/gold_recent_dev.jsonl data/gold_recent_test.jsonl

The older clean core: every seed-page paper outside gold_dev, and 372 of the older arXiv sample:

    python scripts/sample_gold.py data/hf_papers_seed.txt --id-prefix seed --out-dir data/gold_draw \
        --splits seed=128 --seed 2029 --exclude data/gold_dev.jsonl
    python scripts/sample_gold.py data/arxiv_ml_sample.csv --id-prefix arxiv_sample \
        --fields title=titles abstract=summaries categories=terms --out-dir data/gold_draw --splits older=372 --seed 2029

Each output holds id, title, abstract: the papers to label by hand following ANNOTATION.md, from
title and abstract alone (categories are left out on purpose).
"""

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

from abstract_tagger.data.corpus import CorpusError, read_corpus


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
    ap.add_argument("--format", help="the corpus reader (seed, jsonl, arxiv, csv); default: from the name")
    ap.add_argument("--id-prefix", help="ids of papers without one: PREFIX-LINE, as the data config's source name")
    ap.add_argument("--fields", nargs="*", default=[], metavar="KEY=COLUMN", help="the source's `fields`")
    ap.add_argument("--max-chars", type=int, default=20000, help="as data.max_chars")
    args = ap.parse_args()

    source = {"path": str(args.corpus), "format": args.format, "id_prefix": args.id_prefix,
              "fields": dict(f.split("=", 1) for f in args.fields) or None}
    excluded = {json.loads(line)["id"] for path in args.exclude for line in path.open(encoding="utf-8") if line.strip()}
    try:  # a draw from a file the corpus would not read whole is not reproducible: a bad record stops it
        papers = [p for p in read_corpus({args.corpus.stem: source}, max_chars=args.max_chars) if p.id not in excluded]
    except CorpusError as e:
        sys.exit(str(e))
    by_primary = defaultdict(list)
    for p in papers:
        by_primary[p.categories[0] if p.categories else ""].append(p)
    strata = defaultdict(list)
    for cat, members in by_primary.items():
        strata[cat if len(members) >= 0.01 * len(papers) else "other"].extend(members)

    # Largest-remainder proportional allocation of all splits together over the strata.
    total = sum(n for _, n in args.splits)
    if total > len(papers):
        sys.exit(f"--splits: {total} papers asked for, {len(papers)} to draw from")
    quota = {s: total * len(m) / len(papers) for s, m in strata.items()}
    alloc = {s: int(q) for s, q in quota.items()}
    for s in sorted(quota, key=lambda s: quota[s] - alloc[s], reverse=True)[: total - sum(alloc.values())]:
        alloc[s] += 1

    rng = random.Random(args.seed)
    drawn = []
    for s in sorted(strata):
        drawn += rng.sample(sorted(strata[s], key=lambda p: p.id), alloc[s])
    rng.shuffle(drawn)  # every split keeps the strata's proportions in expectation
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, n in args.splits:
        with open(args.out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for p in drawn[start : start + n]:
                f.write(json.dumps({"id": p.id, "title": p.title, "abstract": p.abstract}) + "\n")
        start += n
    print({s or "(no category)": alloc[s] for s in sorted(alloc, key=alloc.get, reverse=True)})


if __name__ == "__main__":
    main()
