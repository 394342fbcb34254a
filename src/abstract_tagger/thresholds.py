"""Per-tag decision thresholds tuned on gold dev, and an honest (k-fold) estimate of what they give."""

from __future__ import annotations

from functools import cache

import numpy as np
from sklearn.model_selection import KFold

# Candidate thresholds; a coarse grid keeps tuning on ~90 papers from chasing single examples.
GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
DEFAULT = 0.5


@cache
def _metric():
    import evaluate

    from abstract_tagger.metrics import MULTILABEL_F1

    return evaluate.load(MULTILABEL_F1)


def score(pred: np.ndarray, gold: np.ndarray, tag_ids: list[str]) -> dict:
    """Micro/macro F1 and per-tag P/R/F1 of 0/1 predictions, through the shipped evaluate metric."""
    return _metric().compute(predictions=pred.astype(np.int8), references=gold.astype(np.int8), label_names=tag_ids)


def _f1(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """F1 per column for a stack of candidate predictions [..., n, tags]."""
    tp = (pred & gold).sum(-2)
    denom = pred.sum(-2) + gold.sum(-2)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def tune(probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """The grid threshold per tag that maximises that tag's F1; ties go to the one nearest 0.5.
    Tags with no gold positive keep 0.5: there is nothing to tune on."""
    gold = gold.astype(bool)
    f1 = _f1(probs[None] >= GRID[:, None, None], gold[None])  # [grid, tags]
    # Prefer thresholds near 0.5 among equals, so flat F1 stretches do not push to an extreme.
    order = np.argsort(np.abs(GRID - DEFAULT), kind="stable")
    best = order[np.argmax(f1[order], axis=0)]
    thresholds = GRID[best].astype(np.float64)
    thresholds[gold.sum(0) == 0] = DEFAULT
    return thresholds


def kfold_predictions(probs: np.ndarray, gold: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """0/1 predictions where every paper is scored with thresholds tuned on the other folds."""
    pred = np.zeros_like(gold, dtype=np.int8)
    for fit_idx, eval_idx in KFold(n_splits=min(k, len(probs)), shuffle=True, random_state=seed).split(probs):
        pred[eval_idx] = probs[eval_idx] >= tune(probs[fit_idx], gold[fit_idx])
    return pred


def evaluate_probs(probs: np.ndarray, gold: np.ndarray, tag_ids: list[str], k: int = 5, seed: int = 0) -> dict:
    """Dev metrics of probabilities at a flat 0.5 and with k-fold-tuned per-tag thresholds, plus the
    thresholds tuned on all of dev (what the checkpoint ships) and their in-sample score (what
    predict.py reproduces on dev; optimistic, since they were tuned on those papers)."""
    shipped = tune(probs, gold)
    return {
        "flat": score(probs >= DEFAULT, gold, tag_ids),
        "tuned_kfold": score(kfold_predictions(probs, gold, k, seed), gold, tag_ids),
        "shipped": score(probs >= shipped, gold, tag_ids),
        "thresholds": dict(zip(tag_ids, shipped.tolist())),
    }
