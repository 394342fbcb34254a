"""The model blended with the cheap rule functions at prediction time.

The fine-tuned model and the labelling functions make different mistakes: on held-out papers the
average of the two beat both. The embedding function would cost a second encoder pass per paper,
but the rule functions (keywords in title and abstract, arXiv categories) cost microseconds. Their
votes index a table of P(tag | rule votes), read off a label model fitted on the corpus's rule votes
(3 functions x 3 outcomes = 27 rows per tag), and prediction mixes

    p = (1 - weight) * p_model + weight * p_rules

`weight` is chosen on the dev sets by k-fold held-out score (0: the model alone). Everything the
blend needs (patterns, categories, the table, the weight) is stored in the checkpoint as
`rules.json`, read with numpy and `re` only, so the ONNX prediction path can use it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from abstract_tagger.data.corpus import Paper
from abstract_tagger.data.taxonomy import Taxonomy
from abstract_tagger.labeling.functions import ArxivFunction, KeywordFunctions, LabelingFunctions

_OUTCOMES = 3  # abstain, negative, positive (vote + 1)


def rule_functions(taxonomy: Taxonomy, min_abstract_hits: int) -> LabelingFunctions:
    return LabelingFunctions([KeywordFunctions(taxonomy, min_abstract_hits), ArxivFunction(taxonomy)])


def _pattern_index(votes: np.ndarray) -> np.ndarray:
    """[papers, functions, tags] votes -> [papers, tags] row of the table (base-3 number of the votes)."""
    powers = _OUTCOMES ** np.arange(votes.shape[1])
    return np.einsum("nft,f->nt", votes.astype(np.int64) + 1, powers)


def all_vote_patterns(n_functions: int, n_tags: int) -> np.ndarray:
    """Every combination of votes, [3**functions, functions, tags], in table-row order."""
    rows = np.arange(_OUTCOMES ** n_functions)
    digits = (rows[:, None] // _OUTCOMES ** np.arange(n_functions)) % _OUTCOMES - 1
    return np.repeat(digits[:, :, None], n_tags, axis=2).astype(np.int8)


@dataclass
class RuleBlend:
    """Rule probabilities by table lookup, mixed into model probabilities with `weight`."""

    taxonomy: Taxonomy
    min_abstract_hits: int
    table: np.ndarray  # [3**functions, tags]: P(tag | rule votes)
    weight: float

    def __post_init__(self):
        self.functions = rule_functions(self.taxonomy, self.min_abstract_hits)

    @classmethod
    def fit(cls, taxonomy: Taxonomy, min_abstract_hits: int, votes: np.ndarray, label_model: Any,
            weight: float = 0.0) -> RuleBlend:
        """Fit `label_model` (unfitted, e.g. LearnedLabelModel) on a corpus's votes of
        `rule_functions(taxonomy, min_abstract_hits)` and tabulate it."""
        label_model.fit(votes)
        table = label_model.predict_proba(all_vote_patterns(votes.shape[1], len(taxonomy)))
        return cls(taxonomy, min_abstract_hits, np.asarray(table, dtype=np.float32), weight)

    def probs_from_votes(self, votes: np.ndarray) -> np.ndarray:
        """P(tag | rule votes) [papers, tags] for votes of `self.functions`."""
        return np.take_along_axis(self.table, _pattern_index(votes), axis=0)

    def rule_probs(self, papers: Sequence[Paper]) -> np.ndarray:
        if not len(papers):
            return np.zeros((0, len(self.taxonomy)), np.float32)
        return self.probs_from_votes(self.functions(papers))

    def mix(self, model_probs: np.ndarray, rule_probs: np.ndarray) -> np.ndarray:
        return mix(model_probs, rule_probs, self.weight)

    def model_cut(self, cut: np.ndarray | float, rule_probs: np.ndarray) -> np.ndarray:
        """The model score at which the blended score crosses `cut`, per paper and tag: (cut - w * rules)
        / (1 - w), clipped to [0, 1] (0 or 1 where the rules alone decide)."""
        w = self.weight
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.clip((cut - w * rule_probs) / (1 - w), 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": self.weight,
            "min_abstract_hits": self.min_abstract_hits,
            "functions": self.functions.names,
            "tags": {t.id: {"name": t.name, "description": t.description, "keywords": dict(t.keywords),
                            "arxiv": list(t.arxiv)} for t in self.taxonomy.tags},
            "table": self.table.round(6).tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tag_ids: Sequence[str]) -> RuleBlend:
        """The blend `to_dict` wrote; ValueError where it does not match `tag_ids` or is malformed."""
        taxonomy = Taxonomy.from_config({"tags": data["tags"]})
        table = np.asarray(data["table"], dtype=np.float32)
        blend = cls(taxonomy, int(data["min_abstract_hits"]), table, float(data["weight"]))
        if taxonomy.ids != list(tag_ids) or table.shape != (_OUTCOMES ** len(blend.functions.names), len(tag_ids)):
            raise ValueError("does not match the checkpoint's labels or is malformed")
        # `not 0 <= x <= 1` also catches NaN. The table holds probabilities: 5.0 gave "probabilities" of 3.
        if not 0 <= blend.weight <= 1 or not ((table >= 0) & (table <= 1)).all():
            raise ValueError("the weight and every table value must be probabilities in [0, 1]")
        return blend


def mix(model_probs: np.ndarray, rule_probs: np.ndarray, weight: float) -> np.ndarray:
    return ((1 - weight) * model_probs + weight * rule_probs).astype(np.float32)
