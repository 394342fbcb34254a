"""Build the committed slice of the recent arXiv corpus that the default config trains on.

    python scripts/make_recent_subset.py ../shared/data/arxiv_2025_26.jsonl.gz data/arxiv_recent_subset.jsonl.gz

Keeps every paper of the recent gold sets (data/gold_recent_*.jsonl: they are scored, never
trained on) plus a seeded random sample of `--papers` others, in the corpus's layout. The output is
byte-for-byte reproducible (fixed seed, gzip without a timestamp).
"""

import argparse
import gzip
import json
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--papers", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--gold", type=Path, nargs="+",
                    default=[Path("data/gold_recent_test.jsonl"), Path("data/gold_recent_dev.jsonl")])
    args = ap.parse_args()

    gold_ids = {json.loads(line)["id"] for path in args.gold for line in path.open(encoding="utf-8") if line.strip()}
    with gzip.open(args.corpus, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    gold = [line for line in lines if json.loads(line)["id"] in gold_ids]
    assert len(gold) == len(gold_ids), f"{len(gold_ids) - len(gold)} gold papers are not in {args.corpus}"
    others = [line for line in lines if json.loads(line)["id"] not in gold_ids]
    keep = gold + random.Random(args.seed).sample(others, args.papers)
    random.Random(args.seed).shuffle(keep)
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(("\n".join(keep) + "\n").encode("utf-8"))
    print(f"{args.out}: {len(keep)} papers ({len(gold)} gold, {args.papers} sampled)")


if __name__ == "__main__":
    main()
