"""The model card: the template filled from CardFacts, with its Hub metadata readable by huggingface_hub."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import card_facts
from huggingface_hub import ModelCard

from abstract_tagger.checkpoint.card import CardFacts, OnnxFacts, model_card


def test_card_metadata_names_the_hub_base_model_and_what_ships(taxonomy):
    facts = card_facts(taxonomy)
    seed = replace(facts.evaluation.sets["dev"], shipped=replace(facts.evaluation.sets["dev"].shipped, micro_f1=0.63,
                                                                  macro_f1=0.53))
    facts = replace(facts, evaluation=replace(facts.evaluation, sets={"dev/seed": seed, **facts.evaluation.sets}))
    card = ModelCard(model_card(facts))
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"  # without the bundling note
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-classification"
    results = [(r.dataset_name, r.metric_name, r.metric_value) for r in card.data.eval_results]
    # One model-index entry per gold set: two dev sets share a split, and the Hub groups results by
    # task, dataset type, config and split (it had put dev/seed's scores under the pooled dev set's name).
    assert results == [("gold dev/seed", "micro-F1", 0.63), ("gold dev/seed", "macro-F1", 0.53),
                       ("gold dev", "micro-F1", 0.83), ("gold dev", "macro-F1", 0.73),
                       ("gold test/recent", "micro-F1", 0.73), ("gold test/recent", "macro-F1", 0.63)]
    assert len(card.data.to_dict()["model-index"][0]["results"]) == 3


@pytest.mark.parametrize("training, says", [
    ({}, "2 epoch(s) on the weak labels (no self-training rounds);"),
    ({"self_training_rounds": 1, "self_training_epochs": 2},
     "then 1 self-training round(s) of 2 epoch(s) on\n  0.7 x weak labels + 0.3 x the model's own probabilities"),
    ({"hand_papers": 1999, "clean_phase_epochs": 1}, "then 1 epoch(s) on the hand-labelled papers alone;"),
    ({"hand_papers": 1999, "hand_weight": 2.0}, "counted 2x in the loss"),
    # Not 0.30000000000000004:
    ({"self_training_rounds": 1, "self_training_model_weight": 0.7}, "0.3 x weak labels + 0.7 x"),
])
def test_card_describes_the_recipe(taxonomy, training, says):
    text = model_card(card_facts(taxonomy, **training))
    assert says in text
    assert "| what predict.py ships | 0.830 | 0.730 | 0.730 | 0.630 |" in text
    assert f"| `{taxonomy.ids[0]}` | {taxonomy.tags[0].name} | 0.50 |" in text
    assert "mixed with the rule functions' probabilities at weight 0.4" in text


def test_facts_round_trip_and_publishing_adds_the_onnx_section(taxonomy, tmp_path):
    facts = card_facts(taxonomy, hand_papers=5)
    facts.save(tmp_path / "card.json")
    assert model_card(CardFacts.load(tmp_path / "card.json")) == model_card(facts)
    assert "## ONNX Runtime" not in model_card(facts)
    onnx = OnnxFacts({"fp32": {"same_tags": 1.0, "max_score_diff": 1e-6}, "int8 + fp32 recheck": {
        "same_tags": 0.995, "max_score_diff": 0.3}}, n_dev=197, max_disagreement=0.005)
    card = model_card(replace(CardFacts.load(tmp_path / "card.json"), onnx=onnx))
    assert "on the\n197 gold-dev papers" in card and "graph over 0.5% disagreement is not published" in card
    assert "| int8 + fp32 recheck | 99.5% | 0.3 |" in card
    assert ModelCard(card).data.base_model == "sentence-transformers/all-MiniLM-L6-v2"


def test_facts_of_any_config_save_and_bad_facts_name_their_file(taxonomy, tmp_path):
    """A {tag: weight} pos_weight (an OmegaConf node in the run) is saved as plain data; a damaged
    card.json is refused naming the file."""
    from omegaconf import OmegaConf

    facts = card_facts(taxonomy, pos_weight=OmegaConf.create({"nlp": 2.0}))
    facts.save(tmp_path / "card.json")
    assert "pos_weight {'nlp': 2.0}" in model_card(CardFacts.load(tmp_path / "card.json"))
    (tmp_path / "card.json").write_text("{}")
    with pytest.raises(ValueError, match=r"card.json: not the facts of a model card"):
        CardFacts.load(tmp_path / "card.json")
