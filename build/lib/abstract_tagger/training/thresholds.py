"""Per-tag decision thresholds, and honest (cross-fitted) estimates of what they give.

A threshold tuned per tag on ~200 dev papers (a few positives for rare tags) mostly fits noise: on
held-out papers such thresholds scored below a flat 0.5. So the shipped thresholds come from a
*policy* (`conf/thresholds/`):

- `flat`: every tag at `default` (0.5);
- `tuned`: per tag, the grid threshold that maximises the tag's F1 on dev;
- `guarded`: `tuned` only for the tags where tuning beats `default` on held-out folds by at least
  `min_gain` F1 (an inner cross-validation), `default` elsewhere;
- `auto`: the candidate policy (`candidates`) whose k-fold held-out dev score is best, simplest
  first among equals.

Every policy is scored the same honest way: each dev paper is predicted with thresholds the
policy fitted on the other folds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import KFold

from abstract_tagger.labeling.rule_blend import mix
from abstract_tagger.metrics import Scores, score

POLICIES = ("flat", "guarded", "tuned")  # simplest first: ties go to the earlier one


def _f1(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """F1 per column for a stack of candidate predictions [..., n, tags]."""
    tp = (pred & gold).sum(-2)
    denom = pred.sum(-2) + gold.sum(-2)
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def _folds(n: int, k: int, seed: int):
    return KFold(n_splits=min(k, n), shuffle=True, random_state=seed).split(np.arange(n))


@dataclass(frozen=True)
class ThresholdPolicy:
    """One way of turning dev probabilities + gold into per-tag thresholds (see the module doc)."""

    name: str
    grid: np.ndarray
    default: float = 0.5
    min_gain: float = 0.0
    folds: int = 5
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str | None = None, seed: int = 0) -> ThresholdPolicy:
        """`cfg` is the `thresholds` config group; `name` overrides its policy (for `auto`'s candidates)."""
        g = cfg["grid"]
        grid = np.round(np.arange(g["start"], g["stop"] + g["step"] / 2, g["step"]), 4)
        return cls(name or cfg["policy"], grid, cfg["default"], cfg["min_gain"], cfg["folds"], seed)

    def tune(self, probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
        """The grid threshold per tag that maximises that tag's F1; ties go to the one nearest `default`,
        so flat F1 stretches do not push to an extreme. Tags with no gold positive keep `default`."""
        gold = gold.astype(bool)
        f1 = _f1(probs[None] >= self.grid[:, None, None], gold[None])  # [grid, tags]
        order = np.argsort(np.abs(self.grid - self.default), kind="stable")
        thresholds = self.grid[order[np.argmax(f1[order], axis=0)]].astype(np.float64)
        thresholds[gold.sum(0) == 0] = self.default
        return thresholds

    def _tuning_helps(self, probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
        """Per tag: does tuning beat `default` by `min_gain` F1 on held-out inner folds (counts pooled)?"""
        gold = gold.astype(bool)
        tuned_pred = np.zeros_like(gold)
        for fit_idx, eval_idx in _folds(len(probs), self.folds, self.seed + 1):
            tuned_pred[eval_idx] = probs[eval_idx] >= self.tune(probs[fit_idx], gold[fit_idx])
        gain = _f1(tuned_pred, gold) - _f1(probs >= self.default, gold)
        return gain >= self.min_gain

    def fit(self, probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
        if self.name == "flat":
            return np.full(probs.shape[1], self.default)
        tuned = self.tune(probs, gold)
        if self.name == "tuned":
            return tuned
        if self.name == "guarded":
            return np.where(self._tuning_helps(probs, gold), tuned, self.default)
        raise ValueError(f"thresholds.policy must be one of {('auto',) + POLICIES}, got {self.name!r}")

    def heldout_predictions(self, probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
        """0/1 predictions where every paper is scored with thresholds fitted on the other folds."""
        pred = np.zeros(gold.shape, dtype=np.int8)
        for fit_idx, eval_idx in _folds(len(probs), self.folds, self.seed):
            pred[eval_idx] = probs[eval_idx] >= self.fit(probs[fit_idx], gold[fit_idx])
        return pred


@dataclass(frozen=True)
class ThresholdChoice:
    """What `choose` decided: the policy, its thresholds fitted on all of dev (what the checkpoint
    ships), its honest k-fold dev score, and every candidate's (for `auto`)."""

    policy: str
    thresholds: dict[str, float]
    heldout: Scores
    heldout_pred: np.ndarray
    candidates: dict[str, Scores]


def choose(probs: np.ndarray, gold: np.ndarray, tag_ids: Sequence[str], cfg: Mapping[str, Any],
           seed: int = 0) -> ThresholdChoice:
    """Apply the configured policy (`auto`: pick the best candidate by k-fold held-out dev score)."""
    names = list(cfg["candidates"]) if cfg["policy"] == "auto" else [cfg["policy"]]
    policies = {name: ThresholdPolicy.from_config(cfg, name, seed) for name in names}
    preds = {name: p.heldout_predictions(probs, gold) for name, p in policies.items()}
    heldout = {name: score(pred, gold, tag_ids) for name, pred in preds.items()}
    best = max(names, key=lambda n: (round(heldout[n].mean_f1, 6), -POLICIES.index(n)))
    thresholds = policies[best].fit(probs, gold)
    return ThresholdChoice(best, dict(zip(tag_ids, thresholds.tolist())), heldout[best], preds[best], heldout)


def choose_weight(model_probs: np.ndarray, rule_probs: np.ndarray, gold: np.ndarray, tag_ids: Sequence[str],
                  weights: Sequence[float], thresholds_cfg: Mapping[str, Any], seed: int = 0) -> dict[float, float]:
    """Held-out dev score (mean of micro and macro F1, thresholds chosen by the policy under k-fold)
    of every candidate weight; the caller takes the best."""
    return {w: choose(mix(model_probs, rule_probs, w), gold, tag_ids, thresholds_cfg, seed).heldout.mean_f1
            for w in weights}
