"""The model card: the template filled from CardFacts, with its Hub metadata readable by huggingface_hub."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from abstract_tagger.checkpoint.card import CardFacts, model_card
from abstract_tagger.common.bundled import BUNDLED_MINILM, describe
from abstract_tagger.metrics import Scores
from abstract_tagger.training.evaluation import Evaluation, SetScores

TRAINING = {"epochs": 2, "loss": "BCE", "pos_weight": None, "hand_papers": 0, "hand_weight": 1.0,
            "clean_phase_epochs": 0, "self_training_rounds": 0, "self_training_epochs": 1,
            "self_training_model_weight": 0.3, "batch_size": 32, "max_length": 128, "lr": 1e-4, "head_lr": 2e-3,
            "precision": "fp32", "seed": 0, "threshold_folds": 5}


def _facts(taxonomy, **training) -> CardFacts:
    def scores(f1: float) -> Scores:
        return Scores(f1, f1 - 0.1, f1, f1, {}, 10)

    sets = {"dev": SetScores(scores(0.8), scores(0.81), scores(0.82), scores(0.83)),
            "test/recent": SetScores(scores(0.7), scores(0.71), scores(0.72), scores(0.73))}
    evaluation = Evaluation(sets=sets, dev_in_sample=scores(0.9), threshold_policy="flat",
                            policy_candidates={"flat": 0.8}, blend_weight=0.4, blend_candidates={0.0: 0.7, 0.4: 0.75},
                            thresholds={t: 0.5 for t in taxonomy.ids})
    return CardFacts(backbone=describe(BUNDLED_MINILM), corpus={"sources": {"recent": 100}, "train": 90,
                     "held_out": {"dev/seed": 5}}, functions=["keywords", "arxiv"], training={**TRAINING, **training},
                     evaluation=evaluation, taxonomy=taxonomy)


def test_card_metadata_names_the_hub_base_model_and_what_ships(taxonomy):
    card = ModelCard(model_card(_facts(taxonomy)))
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"  # without the bundling note
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-classification"
    results = {(r.dataset_name, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert results == {("gold dev", "micro-F1"): 0.83, ("gold dev", "macro-F1"): 0.73,
                       ("gold test/recent", "micro-F1"): 0.73, ("gold test/recent", "macro-F1"): 0.63}


@pytest.mark.parametrize("training, says", [
    ({}, "2 epoch(s) on the weak labels (no self-training rounds);"),
    ({"self_training_rounds": 1, "self_training_epochs": 2},
     "then 1 self-training round(s) of 2 epoch(s) on\n  0.7 x weak labels + 0.3 x the model's own probabilities"),
    ({"hand_papers": 1999, "clean_phase_epochs": 1}, "then 1 epoch(s) on the hand-labelled papers alone;"),
    ({"hand_papers": 1999, "hand_weight": 2.0}, "counted 2.0x in the loss"),
])
def test_card_describes_the_recipe(taxonomy, training, says):
    text = model_card(_facts(taxonomy, **training))
    assert says in text
    assert "| what predict.py ships | 0.830 | 0.730 | 0.730 | 0.630 |" in text
    assert f"| `{taxonomy.ids[0]}` | {taxonomy.tags[0].name} | 0.50 |" in text
    assert "mixed with the rule functions' probabilities at weight 0.4" in text
