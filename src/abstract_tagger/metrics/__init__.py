"""Multi-label scores (micro/macro F1, per-tag precision/recall/F1) through `evaluate`, with the metric
module shipped in this package and loaded by path (works offline). Imports nothing of the package."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

MULTILABEL_F1 = str(Path(__file__).with_name("multilabel_f1.py"))


@cache
def _metric():
    import evaluate

    return evaluate.load(MULTILABEL_F1)


@dataclass(frozen=True)
class Scores:
    """Multi-label scores of 0/1 predictions against gold; `per_tag`: {tag: {precision, recall, f1, support}}."""

    micro_f1: float
    macro_f1: float
    micro_precision: float
    micro_recall: float
    per_tag: Mapping[str, Mapping[str, float]]
    n_papers: int

    @property
    def mean_f1(self) -> float:
        return (self.micro_f1 + self.macro_f1) / 2

    def to_dict(self) -> dict[str, Any]:
        return {"micro_f1": self.micro_f1, "macro_f1": self.macro_f1, "micro_precision": self.micro_precision,
                "micro_recall": self.micro_recall, "n_papers": self.n_papers, "per_tag": dict(self.per_tag)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scores:
        return cls(**data)


def score(pred: np.ndarray, gold: np.ndarray, tag_ids: Sequence[str]) -> Scores:
    """Micro/macro F1 and per-tag P/R/F1 of 0/1 predictions, through the shipped evaluate metric."""
    m = _metric().compute(predictions=np.asarray(pred, dtype=np.int8), references=np.asarray(gold, dtype=np.int8),
                          label_names=list(tag_ids))
    return Scores(m["micro_f1"], m["macro_f1"], m["micro_precision"], m["micro_recall"], m["per_label"], len(gold))
