"""Label models: turn a vote matrix [papers, functions, tags] into P(tag | votes) [papers, tags].

`MajorityVote` is the baseline. `LearnedLabelModel` fits one snorkel `LabelModel` per tag, which
estimates each function's accuracy from how the functions agree and disagree, without gold.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from abstract_tagger.labeling.functions import NEGATIVE, POSITIVE

LABEL_MODELS = ("majority", "learned")


class MajorityVote:
    """Share of non-abstaining votes that are positive; no votes at all means negative."""

    def fit(self, votes: np.ndarray) -> MajorityVote:
        return self

    def predict_proba(self, votes: np.ndarray) -> np.ndarray:
        pos = (votes == POSITIVE).sum(axis=1)
        total = pos + (votes == NEGATIVE).sum(axis=1)
        return np.divide(pos, total, out=np.zeros(pos.shape, dtype=np.float32), where=total > 0).astype(np.float32)


@contextlib.contextmanager
def _caller_random_state_kept() -> Iterator[None]:
    """snorkel's `fit` seeds Python's, numpy's and torch's global generators. Without this, a training
    run's dropout and shuffling depended on whether its weak labels came from the cache (no fit) or
    were computed (a fit reseeded torch with the label model's seed)."""
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class LearnedLabelModel:
    """One snorkel `LabelModel` per tag over the functions that ever vote on that tag.

    Tags are rare, and snorkel's default prior is uniform (50% positive), which would pull every
    paper with a single positive vote over 0.5. With `class_balance: majority` the prior is the
    tag's positive rate under majority vote on the fitting corpus (clipped), which needs no gold.
    snorkel needs three functions to identify their accuracies; a tag with fewer than `min_functions`
    falls back to majority vote.
    """

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)
        self.models: list[Any] = []
        self.columns: list[np.ndarray] = []
        self.priors: np.ndarray | None = None

    def fit(self, votes: np.ndarray) -> LearnedLabelModel:
        with _caller_random_state_kept():
            return self._fit(votes)

    def _fit(self, votes: np.ndarray) -> LearnedLabelModel:
        from snorkel.labeling.model import LabelModel

        fit_kwargs = {k: self.cfg[k] for k in ("n_epochs", "lr", "l2", "seed")}
        lo, hi = self.cfg["prior_clip"]
        if self.cfg["class_balance"] == "majority":
            priors = np.clip((MajorityVote().predict_proba(votes) >= 0.5).mean(axis=0), lo, hi)
        elif self.cfg["class_balance"] == "uniform":
            priors = np.full(votes.shape[2], 0.5)
        else:
            raise ValueError(f"labeling.label_model.class_balance must be majority or uniform, "
                             f"got {self.cfg['class_balance']!r}")
        self.priors = priors
        self.models, self.columns = [], []
        for t in range(votes.shape[2]):
            cols = np.flatnonzero((votes[:, :, t] != -1).any(axis=0))
            model = None
            if len(cols) >= self.cfg["min_functions"]:
                model = LabelModel(cardinality=2, verbose=False)
                model.fit(votes[:, cols, t], class_balance=[1 - priors[t], priors[t]], progress_bar=False,
                          **fit_kwargs)
            self.models.append(model)
            self.columns.append(cols)
        return self

    def accuracies(self) -> list[dict[int, float]]:
        """Per tag: {function column: estimated accuracy}; empty for majority-vote tags."""
        return [dict(zip(cols.tolist(), m.get_weights().tolist())) if m is not None else {}
                for m, cols in zip(self.models, self.columns)]

    def predict_proba(self, votes: np.ndarray) -> np.ndarray:
        if not self.models:
            raise RuntimeError("fit the label model before predicting")
        probs = np.empty((votes.shape[0], votes.shape[2]), dtype=np.float32)
        for t, (model, cols) in enumerate(zip(self.models, self.columns)):
            probs[:, t] = (model.predict_proba(votes[:, cols, t])[:, 1] if model is not None
                           else MajorityVote().predict_proba(votes[:, cols, t:t + 1])[:, 0])
        return probs
