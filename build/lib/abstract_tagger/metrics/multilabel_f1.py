"""Multi-label F1 as an `evaluate` metric: micro and macro F1 plus per-label precision, recall, F1.

Load it by path, which needs no network: `evaluate.load(abstract_tagger.metrics.MULTILABEL_F1)`.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support

_DESCRIPTION = """Micro and macro F1 over multi-label 0/1 indicator rows, and precision/recall/F1 per label.
A label with no gold positives and no predicted positives scores 0 (sklearn zero_division=0)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of 0/1 rows, one per example, one column per label.
    references: list of 0/1 rows, same shape.
    label_names: optional list of label names for the per-label entries (default: column index).
Returns:
    micro_f1, macro_f1, micro_precision, micro_recall, and per_label: {name: {precision, recall, f1, support}}.
"""


class MultilabelF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("int8")),
                "references": datasets.Sequence(datasets.Value("int8")),
            }),
        )

    def _compute(self, predictions, references, label_names=None):
        pred = np.asarray(predictions, dtype=np.int8)
        gold = np.asarray(references, dtype=np.int8)
        names = list(label_names) if label_names is not None else [str(i) for i in range(gold.shape[1])]
        p, r, f, support = precision_recall_fscore_support(gold, pred, average=None, zero_division=0)
        micro_p, micro_r, micro_f, _ = precision_recall_fscore_support(gold, pred, average="micro", zero_division=0)
        return {
            "micro_f1": float(micro_f),
            "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
            "micro_precision": float(micro_p),
            "micro_recall": float(micro_r),
            "per_label": {
                n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
                for i, n in enumerate(names)
            },
        }
