"""Held-out scores as users run a checkpoint: title and abstract only, no arXiv categories, beside
the same papers as given (with their categories). Rows: the weak labels (the label model over the
labelling functions; text only, the `arxiv` function abstains), the checkpoint's model alone at 0.5
(no rules.json), and what predict.py ships (rule blend and per-tag thresholds). The dev columns are
in-sample for the shipped thresholds (chosen on them); test/recent is the honest one.

    python bench/text_only.py                                   # the published checkpoint
    python bench/text_only.py --checkpoint outputs/main/checkpoint -- data.gold_train=...

The weak labels come from the cache train.py and label.py fill (computed when absent).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from abstract_tagger import Tagger  # noqa: E402
from abstract_tagger.data.corpus import read_gold_sets  # noqa: E402
from abstract_tagger.labeling.functions import ABSTAIN  # noqa: E402
from abstract_tagger.labeling.label_model import LearnedLabelModel, MajorityVote  # noqa: E402
from abstract_tagger.labeling.weak_labels import build_weak_labels  # noqa: E402
from abstract_tagger.metrics import score  # noqa: E402
from train_config import parse_with_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="default: the published checkpoint")
    args, cfg = parse_with_config(parser)
    checkpoint = args.checkpoint or Path(cfg.paths.checkpoints_dir) / cfg.paths.published

    weak = build_weak_labels(cfg)
    tag_ids, labeling = weak.tag_ids, OmegaConf.to_container(cfg.labeling, resolve=True)
    gold_sets = {f"{split}/{name}": gold for split, named in read_gold_sets(cfg.data.gold, tag_ids).items()
                 for name, gold in named.items()}
    wanted = {pid for gold in gold_sets.values() for pid in gold.tags}
    papers, votes = [], []
    for i in range(weak.n_chunks):
        chunk, _, chunk_votes = weak.chunk(i)
        rows = [r for r, p in enumerate(chunk) if p.id in wanted]
        papers += [chunk[r] for r in rows]
        votes.append(chunk_votes[rows])
    votes = np.concatenate(votes)
    # The label model train.py used, fitted again on the same votes (deterministic).
    label_model = (LearnedLabelModel(labeling["label_model"]) if labeling["model"] == "learned" else MajorityVote())
    label_model.fit(weak.fit_votes(labeling["fit_max_records"]))
    text_votes = votes.copy()
    text_votes[:, weak.report["functions"].index("arxiv"), :] = ABSTAIN
    stripped = [dataclasses.replace(p, categories=()) for p in papers]

    tagger = Tagger.from_pretrained(checkpoint)
    predictions = {}
    for inputs, name, given in ((papers, "as given", votes), (stripped, "text only", text_votes)):
        predictions[("weak labels", name)] = label_model.predict_proba(given) >= labeling["threshold"]
        predictions[("what predict.py ships", name)] = tagger.scores(inputs) >= tagger.thresholds
    blend, tagger.blend = tagger.blend, None
    predictions[("model alone, 0.5", "as given")] = predictions[("model alone, 0.5", "text only")] = \
        tagger.scores(papers, threshold=0.5) >= 0.5  # the model never reads categories
    tagger.blend = blend

    print(f"checkpoint: {checkpoint}; {len(papers)} gold papers; micro / macro F1")
    columns = [(set_name, kind) for set_name in gold_sets for kind in ("as given", "text only")]
    print("| predictions | " + " | ".join(f"{s} {k}" for s, k in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in ("weak labels", "model alone, 0.5", "what predict.py ships"):
        cells = []
        for set_name, kind in columns:
            gold = gold_sets[set_name]
            rows = gold.rows(papers)
            s = score(predictions[(row, kind)][rows], gold.labels(tag_ids), tag_ids)
            cells.append(f"{s.micro_f1:.3f} / {s.macro_f1:.3f}")
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
