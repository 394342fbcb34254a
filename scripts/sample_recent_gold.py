"""Draw the papers of the recent-corpus gold sets (run once, before any labelling function changed).

Stratified by primary arXiv category, proportional allocation: every category with at least 1% of
the corpus is its own stratum, the rest share one. Seeded, so the draw is reproducible:

    python scripts/sample_recent_gold.py ../shared/data/arxiv_2025_26.jsonl.gz --out-dir data/gold_draw

writes `test.jsonl` and `dev.jsonl` (id, title, abstract): the papers to label by hand following
ANNOTATION.md, from title and abstract alone (categories are left out on purpose).
"""

import argparse
import gzip
import json
import random
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--test", type=int, default=220)
    ap.add_argument("--dev", type=int, default=110)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()

    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        papers = [json.loads(line) for line in f]
    by_primary = defaultdict(list)
    for p in papers:
        by_primary[p["categories"].split()[0]].append(p)
    strata = defaultdict(list)
    for cat, members in by_primary.items():
        strata[cat if len(members) >= 0.01 * len(papers) else "other"].extend(members)

    # Largest-remainder proportional allocation of test + dev over the strata.
    total = args.test + args.dev
    quota = {s: total * len(m) / len(papers) for s, m in strata.items()}
    alloc = {s: int(q) for s, q in quota.items()}
    for s in sorted(quota, key=lambda s: quota[s] - alloc[s], reverse=True)[: total - sum(alloc.values())]:
        alloc[s] += 1

    rng = random.Random(args.seed)
    drawn = []
    for s in sorted(strata):
        drawn += rng.sample(sorted(strata[s], key=lambda p: p["id"]), alloc[s])
    rng.shuffle(drawn)  # test and dev each keep the strata's proportions in expectation
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("test", drawn[: args.test]), ("dev", drawn[args.test :])):
        with open(args.out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for p in part:
                f.write(json.dumps({"id": p["id"], "title": p["title"], "abstract": p["abstract"]}) + "\n")
    print({s: alloc[s] for s in sorted(alloc, key=alloc.get, reverse=True)})


if __name__ == "__main__":
    main()
