"""Gold-dev scores of the weak labels, a TF-IDF + logistic-regression baseline trained on the same
weak labels, and (with --run-dir) a trained model, side by side. Thresholds for every row are
tuned the same k-fold way as train.py's.

    python bench/baselines.py                                 # default corpus and labeling config
    python bench/baselines.py --run-dir outputs/main          # add the model row from metrics.json
    python bench/baselines.py -- data=seed_only               # Hydra overrides after --
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
from hydra import compose, initialize_config_dir  # noqa: E402
from scipy.sparse import vstack  # noqa: E402
from sklearn.feature_extraction.text import TfidfVectorizer  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from abstract_tagger import thresholds as thr  # noqa: E402
from abstract_tagger.config_checks import register_resolvers  # noqa: E402
from abstract_tagger.corpus import read_gold  # noqa: E402
from abstract_tagger.labeling import build_weak_labels  # noqa: E402
from abstract_tagger.training import split_gold_dev  # noqa: E402


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
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config")
    args = parser.parse_args()

    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    weak = build_weak_labels(cfg)
    gold = read_gold(cfg.data.gold_dev, weak.tag_ids)
    train_rows, dev_rows, dev_y = split_gold_dev(weak.papers, gold, weak.tag_ids, cfg.data.gold_dev)
    texts = [p.text for p in weak.papers]
    baseline = tfidf_logreg([texts[i] for i in train_rows], weak.probs[train_rows], [texts[i] for i in dev_rows])
    k, seed = cfg.trainer.threshold_folds, cfg.seed
    rows = {}
    for name, probs in (("weak labels", weak.probs[dev_rows]), ("TF-IDF + logistic regression", baseline)):
        ev = thr.evaluate_probs(probs, dev_y, weak.tag_ids, k, seed)
        rows[name] = (ev["flat"], ev["tuned_kfold"])
    if args.run_dir:
        dev = json.loads((args.run_dir / "metrics.json").read_text())["dev"]
        rows["fine-tuned model"] = (dev["model, threshold 0.5"], dev["model, tuned thresholds (k-fold)"])

    print(f"gold dev: {len(dev_rows)} papers; training: {len(train_rows)} papers with weak soft targets\n")
    print("| predictions | micro-F1 @0.5 | macro-F1 @0.5 | micro-F1 tuned (k-fold) | macro-F1 tuned (k-fold) |")
    print("|---|---|---|---|---|")
    for name, (flat, tuned) in rows.items():
        print(f"| {name} | {flat['micro_f1']:.3f} | {flat['macro_f1']:.3f} | "
              f"{tuned['micro_f1']:.3f} | {tuned['macro_f1']:.3f} |")


if __name__ == "__main__":
    main()
