"""The checkpoint's model card (README.md): `model_card.md`, a Jinja template, filled from `CardFacts`
through huggingface_hub's ModelCard, which also writes the Hub metadata header (base model, license,
model-index). Imports data and training (the evaluation it reports)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from abstract_tagger.common.config import plain
from abstract_tagger.common.files import write_json
from abstract_tagger.data.taxonomy import Taxonomy
from abstract_tagger.training.evaluation import Evaluation

TEMPLATE = Path(__file__).with_name("model_card.md")
# The card's facts in a training run's directory, where publishing reads them.
FACTS_FILE = "card.json"
# The score table's rows: (SetScores field, what it is).
ROWS = (("weak", "weak labels (all labelling functions, 0.5)"),
        ("model_flat", "model alone, 0.5"),
        ("model", "model alone, policy thresholds"),
        ("shipped", "what predict.py ships"))


@dataclass(frozen=True)
class OnnxFacts:
    """What publishing measured of the ONNX graphs: per graph {same_tags, max_score_diff} against torch
    fp32 on `n_dev` dev papers, and the disagreement it refuses."""

    agreement: Mapping[str, Mapping[str, float]]
    n_dev: int
    max_disagreement: float


@dataclass(frozen=True)
class CardFacts:
    """What the card says: the backbone as loaded, the corpus' counts ({sources: {name: n}, train: n,
    held_out: {name: n}}), the labelling functions, the training settings and the run's evaluation;
    `onnx` once publishing has checked the graphs. Training saves them in the run directory
    (`FACTS_FILE`), so publishing renders the card again through the same template."""

    backbone: str
    corpus: Mapping[str, Any]
    functions: Sequence[str]
    training: Mapping[str, Any]
    evaluation: Evaluation
    taxonomy: Taxonomy
    onnx: OnnxFacts | None = None

    def save(self, path: Path) -> None:
        data = {**{f.name: getattr(self, f.name) for f in fields(self)}, "evaluation": self.evaluation.to_dict(),
                "taxonomy": self.taxonomy.to_dict(), "onnx": asdict(self.onnx) if self.onnx else None,
                "functions": list(self.functions)}
        # default=plain: settings straight from the run's config (pos_weight={tag: w}) are OmegaConf nodes.
        write_json(path, data, indent=1, default=plain)

    @classmethod
    def load(cls, path: Path) -> CardFacts:
        if not path.is_file():
            raise ValueError(f"{path}: not found; it is written by training runs of this version: retrain, "
                             "then publish")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{**data, "evaluation": Evaluation.from_dict(data["evaluation"]),
                          "taxonomy": Taxonomy.from_config(data["taxonomy"]),
                          "onnx": OnnxFacts(**data["onnx"]) if data["onnx"] else None})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not the facts of a model card ({type(e).__name__}: {e})") from None


def _hub_id(backbone: str) -> str:
    """The Hub id for `base_model`: the card's backbone name without its note ("... (bundled with ...)")."""
    return backbone.split(" (", 1)[0]


def _eval_results(evaluation: Evaluation) -> list[EvalResult]:
    """Hub `model-index` results: what predict.py ships, on every gold set. Each set is its own dataset
    config: the Hub groups results by task, dataset type, config and split, and the dev sets share a split."""
    return [EvalResult(task_type="text-classification", task_name="Multi-label research-area tagging",
                       dataset_type="abstract-tagger-gold", dataset_name=f"gold {name}", dataset_config=name,
                       dataset_split=name.split("/")[0], metric_type="f1", metric_name=f"{avg}-F1",
                       metric_value=round(getattr(s.shipped, f"{avg}_f1"), 4), metric_args={"average": avg})
            for name, s in evaluation.sets.items() for avg in ("micro", "macro")]


def model_card(facts: CardFacts) -> str:
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-classification", license="apache-2.0",
        base_model=_hub_id(facts.backbone), language=["en"], model_name="abstract-tagger",
        tags=["multi-label-classification", "scientific-papers", "weak-supervision"],
        eval_results=_eval_results(facts.evaluation))
    card = ModelCard.from_template(data, template_path=str(TEMPLATE), rows=ROWS, backbone=facts.backbone,
                                   corpus=facts.corpus, functions=list(facts.functions), training=facts.training,
                                   evaluation=facts.evaluation, taxonomy=facts.taxonomy, onnx=facts.onnx,
                                   # Numbers as the config spells them: 0.3, not 0.30000000000000004.
                                   g=lambda x: f"{x:g}")
    return str(card).rstrip("\n") + "\n"
