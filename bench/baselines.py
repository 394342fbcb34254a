"""Scores of the weak labels, a TF-IDF + logistic-regression baseline trained on the same targets
as train.py (weak soft targets, hand labels for the papers of `data.gold_train`), and (with --run-dir)
a trained model, side by side, on every gold set. Thresholds come from the same policy as train.py's,
chosen on dev (k-fold there) and applied to test as is.

    python bench/baselines.py                                 # default corpus and labeling config
    python bench/baselines.py --run-dir outputs/main          # add the model row from metrics.json
    python bench/baselines.py -- data.gold_train=null         # weak labels only; Hydra overrides after --
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from scipy.sparse import vstack  # noqa: E402
from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from abstract_tagger.labeling.weak_labels import build_weak_labels  # noqa: E402
from abstract_tagger.metrics import score  # noqa: E402
from abstract_tagger.pipeline import load_model, load_training_data  # noqa: E402
from abstract_tagger.training import thresholds as thr  # noqa: E402
from train_config import parse_with_config  # noqa: E402


def tfidf_logreg(train_texts, train_probs, test_texts, c: float = 4.0) -> np.ndarray:
    """One logistic regression per tag on soft targets: every paper appears as a positive with
    weight p and a negative with weight 1 - p, which minimises the same cross-entropy as BCE."""
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2, max_features=50_000)
    x, x_test = vec.fit_transform(train_texts), vec.transform(test_texts)
    xx = vstack([x, x])
    out = np.zeros((x_test.shape[0], train_probs.shape[1]), np.float32)
    for j in range(train_probs.shape[1]):
        p = train_probs[:, j]
        y = np.r_[np.ones(len(p)), np.zeros(len(p))]
        clf = LogisticRegression(C=c, max_iter=2000).fit(xx, y, sample_weight=np.r_[p, 1 - p])
        out[:, j] = clf.predict_proba(x_test)[:, 1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a train.py run directory (reads its metrics.json)")
    args, cfg = parse_with_config(parser)
    weak = build_weak_labels(cfg)
    tag_ids = weak.tag_ids
    backbone = load_model(cfg, tag_ids)  # its tokenizer: the training data is stored tokenised
    data = load_training_data(cfg, weak, tag_ids, backbone.tokenizer)
    split, weak_probs = data.split, data.held_out_weak
    train = list(data.train_papers(len(data.train)))
    baseline = tfidf_logreg([p.text for papers, _, _ in train for p in papers],
                            np.concatenate([targets for _, targets, _ in train]), [p.text for p in data.held_out])
    tcfg = OmegaConf.to_container(cfg.thresholds, resolve=True)
    dev_rows, dev_gold = split.rows("dev"), split.gold("dev")
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    for name, probs in (("weak labels", weak_probs), ("TF-IDF + logistic regression", baseline)):
        choice = thr.choose(probs[dev_rows], dev_gold, tag_ids, tcfg, cfg.seed)
        cut = np.array([choice.thresholds[t] for t in tag_ids])
        rows[name] = {"dev @0.5": score(probs[dev_rows] >= 0.5, dev_gold, tag_ids),
                      "dev policy (k-fold)": choice.heldout}
        for test in split.of("test"):
            rows[name][f"{test} policy"] = score(probs[split.sets[test]] >= cut, split.labels[test], tag_ids)
    rows = {name: {col: (s.micro_f1, s.macro_f1) for col, s in cols.items()} for name, cols in rows.items()}
    if args.run_dir:
        scores = json.loads((args.run_dir / "metrics.json").read_text())["scores"]
        for kind, name in (("model", "fine-tuned model alone"), ("shipped", "fine-tuned model as shipped")):
            rows[name] = {"dev @0.5": (scores["dev"]["model_flat"]["micro_f1"], scores["dev"]["model_flat"]["macro_f1"]),
                          "dev policy (k-fold)": (scores["dev"][kind]["micro_f1"], scores["dev"][kind]["macro_f1"])}
            for test in split.of("test"):
                rows[name][f"{test} policy"] = (scores[test][kind]["micro_f1"], scores[test][kind]["macro_f1"])

    print(f"dev: {len(dev_rows)} papers, " + ", ".join(f"{n}: {len(r)}" for n, r in split.sets.items())
          + f"; training: {len(data.train)} papers ({data.n_hand} of them hand-labelled)\n")
    columns = list(next(iter(rows.values())))
    print("| predictions | " + " | ".join(f"{c} micro | {c} macro" for c in columns) + " |")
    print("|---|" + "---|---|" * len(columns))
    for name, cols in rows.items():
        print(f"| {name} | " + " | ".join(f"{cols[c][0]:.3f} | {cols[c][1]:.3f}" if c in cols else "| "
                                          for c in columns) + " |")


if __name__ == "__main__":
    main()
