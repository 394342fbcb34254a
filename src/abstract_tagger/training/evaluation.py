"""What a trained model's scores are worth, measured honestly: the rule blend's weight, the threshold
policy and the thresholds are chosen on the dev sets (k-fold held-out), test sets are only scored.
Imports data, labeling and the rest of training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from abstract_tagger.data.corpus import Paper
from abstract_tagger.data.taxonomy import Taxonomy
from abstract_tagger.labeling.label_model import LearnedLabelModel
from abstract_tagger.labeling.rule_blend import RuleBlend, rule_functions
from abstract_tagger.metrics import Scores, score
from abstract_tagger.training import thresholds as thr
from abstract_tagger.training.data import Split, TrainingData, stored_votes
from abstract_tagger.training.thresholds import choose_weight


@dataclass(frozen=True)
class SetScores:
    """Scores of one gold set. Dev sets: `model` and `shipped` are k-fold held-out (each paper scored
    with choices made on the other folds). Test sets: everything chosen on dev, applied as is."""

    weak: Scores            # weak labels (label model over all functions) at 0.5
    model_flat: Scores      # model alone at 0.5
    model: Scores           # model alone, thresholds by the policy
    shipped: Scores         # what predict.py does: model (+ rule blend) with the shipped thresholds

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name).to_dict() for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SetScores:
        return cls(**{f.name: Scores.from_dict(data[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class Evaluation:
    sets: dict[str, SetScores]
    dev_in_sample: Scores   # the shipped thresholds on the dev papers they were chosen on
    threshold_policy: str
    policy_candidates: dict[str, float]  # policy -> k-fold held-out mean F1 on dev
    blend_weight: float
    blend_candidates: dict[float, float]  # weight -> k-fold held-out mean F1 on dev
    thresholds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-shaped (blend weights as strings)."""
        return {"sets": {name: s.to_dict() for name, s in self.sets.items()},
                "dev_in_sample": self.dev_in_sample.to_dict(), "threshold_policy": self.threshold_policy,
                "policy_candidates": self.policy_candidates, "blend_weight": self.blend_weight,
                "blend_candidates": {str(w): v for w, v in self.blend_candidates.items()},
                "thresholds": self.thresholds}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        return cls(sets={name: SetScores.from_dict(s) for name, s in data["sets"].items()},
                   dev_in_sample=Scores.from_dict(data["dev_in_sample"]), threshold_policy=data["threshold_policy"],
                   policy_candidates=dict(data["policy_candidates"]), blend_weight=data["blend_weight"],
                   blend_candidates={float(w): v for w, v in data["blend_candidates"].items()},
                   thresholds=dict(data["thresholds"]))


def fit_blend(cfg: DictConfig, taxonomy: Taxonomy, data: TrainingData, pool: Sequence[Paper],
              pool_probs: np.ndarray) -> tuple[RuleBlend | None, dict[float, float], np.ndarray]:
    """The rule blend (None where `rule_blend.weights` is [0]), every candidate weight's k-fold dev
    score, and the probabilities it ships for every paper of `pool` (the held-out papers, then the first
    training papers). Its label model is fitted on the rule votes of the first `labeling.fit_max_records`
    training papers: the votes the weak labels stored, where they ran the rule functions; else the rule
    functions vote again, once on each paper."""
    if list(cfg.rule_blend.weights) == [0.0]:
        return None, {0.0: 0.0}, pool_probs
    min_hits = cfg.labeling.keywords.min_abstract_hits
    rules = rule_functions(taxonomy, min_hits)
    n_review = len(pool) - len(data.held_out)
    n_fit = min(cfg.labeling.fit_max_records, len(data.train))
    stored = stored_votes(data, rules.names)
    train_votes = np.concatenate([stored(votes) if stored else rules(papers)
                                  for papers, _, votes in data.train_papers(max(n_fit, n_review))])
    held_out_votes = stored(data.held_out_votes) if stored else rules(data.held_out)
    blend = RuleBlend.fit(taxonomy, min_hits, train_votes[:n_fit], LearnedLabelModel(cfg.labeling.label_model))
    rule_probs = blend.probs_from_votes(np.concatenate([held_out_votes, train_votes[:n_review]]))
    dev_rows = data.split.rows("dev")
    weights = choose_weight(pool_probs[dev_rows], rule_probs[dev_rows], data.split.gold("dev"), taxonomy.ids,
                            cfg.rule_blend.weights, OmegaConf.to_container(cfg.thresholds, resolve=True), cfg.seed)
    blend.weight = max(weights, key=lambda w: (round(weights[w], 6), -w))  # the lowest weight among equals
    return blend, weights, blend.mix(pool_probs, rule_probs)


def evaluate_run(cfg: DictConfig, split: Split, model_probs: np.ndarray, shipped_probs: np.ndarray,
                 weak_probs: np.ndarray, blend_weight: float, blend_candidates: dict[float, float],
                 tag_ids: list[str]) -> Evaluation:
    """Choose the thresholds on dev for the model alone and for what ships; score every gold set."""
    tcfg = OmegaConf.to_container(cfg.thresholds, resolve=True)
    dev_rows, dev_gold = split.rows("dev"), split.gold("dev")
    model_choice = thr.choose(model_probs[dev_rows], dev_gold, tag_ids, tcfg, cfg.seed)
    shipped_choice = thr.choose(shipped_probs[dev_rows], dev_gold, tag_ids, tcfg, cfg.seed)
    model_cut = np.array([model_choice.thresholds[t] for t in tag_ids])
    shipped_cut = np.array([shipped_choice.thresholds[t] for t in tag_ids])

    sets: dict[str, SetScores] = {}
    offset = 0
    for name in [*split.of("dev"), *split.of("test")]:
        rows, gold = split.sets[name], split.labels[name]
        if name.startswith("dev/"):
            # Slices of the k-fold held-out predictions over all dev papers.
            part = slice(offset, offset + len(rows))
            offset += len(rows)
            model_pred, shipped_pred = model_choice.heldout_pred[part], shipped_choice.heldout_pred[part]
        else:
            model_pred, shipped_pred = model_probs[rows] >= model_cut, shipped_probs[rows] >= shipped_cut
        sets[name] = SetScores(
            weak=score(weak_probs[rows] >= 0.5, gold, tag_ids),
            model_flat=score(model_probs[rows] >= 0.5, gold, tag_ids),
            model=score(model_pred, gold, tag_ids),
            shipped=score(shipped_pred, gold, tag_ids),
        )
    # All dev sets together, as chosen on.
    sets["dev"] = SetScores(
        weak=score(weak_probs[dev_rows] >= 0.5, dev_gold, tag_ids),
        model_flat=score(model_probs[dev_rows] >= 0.5, dev_gold, tag_ids),
        model=model_choice.heldout, shipped=shipped_choice.heldout)
    return Evaluation(
        sets=sets,
        dev_in_sample=score(shipped_probs[dev_rows] >= shipped_cut, dev_gold, tag_ids),
        threshold_policy=shipped_choice.policy,
        policy_candidates={k: v.mean_f1 for k, v in shipped_choice.candidates.items()},
        blend_weight=blend_weight,
        blend_candidates=blend_candidates,
        thresholds=shipped_choice.thresholds,
    )
