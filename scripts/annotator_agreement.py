"""Agreement between two hand-labelled files of the same papers, as micro/macro F1 with the project's
metric (the first file as reference; F1 is symmetric in micro, nearly so in macro):

    python scripts/annotator_agreement.py data/gold_recent_test.jsonl data/gold_recent_test_relabel.jsonl

The second annotator labelled 100 test/recent papers blind (drawn with seed 2028), following the same
rules: the ceiling any model's test score is read against.
"""

import argparse

import numpy as np
import yaml

from abstract_tagger.data.corpus import read_gold
from abstract_tagger.data.taxonomy import Taxonomy
from abstract_tagger.metrics import score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--taxonomy", default="conf/taxonomy/default.yaml")
    args = ap.parse_args()
    tag_ids = Taxonomy.from_config(yaml.safe_load(open(args.taxonomy, encoding="utf-8"))).ids
    ref, other = read_gold(args.reference, tag_ids), read_gold(args.other, tag_ids)
    ids = [pid for pid in other.tags if pid in ref.tags]
    missing = sorted(set(other.tags) - set(ids))
    if missing:
        raise SystemExit(f"{args.other}: {len(missing)} papers are not in {args.reference}, e.g. {missing[0]}")
    as_rows = lambda gold: np.array([[t in gold.tags[pid] for t in tag_ids] for pid in ids], dtype=np.int8)  # noqa: E731
    s = score(as_rows(other), as_rows(ref), tag_ids)
    print(f"{len(ids)} papers: micro-F1 {s.micro_f1:.3f}, macro-F1 {s.macro_f1:.3f}, "
          f"precision {s.micro_precision:.3f}, recall {s.micro_recall:.3f}")
    for tag in tag_ids:
        m = s.per_tag[tag]
        print(f"  {tag:26s} F1 {m['f1']:.2f} (support {int(m['support'])})")


if __name__ == "__main__":
    main()
