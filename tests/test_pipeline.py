"""The training run's parts on small fixtures: gold papers held out, hand labels as training
targets, self-training rounds, and the rule blend through export, Tagger and predict.py."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from abstract_tagger import Tagger, pipeline
from abstract_tagger.config_checks import register_resolvers
from abstract_tagger.corpus import CorpusError, GoldSet, Paper, read_seed_dump
from abstract_tagger.labeling.label_model import MajorityVote
from abstract_tagger.prediction import CheckpointError
from abstract_tagger.rule_blend import RULES_FILE, RuleBlend, all_vote_patterns, rule_functions
from helpers import BACKENDS, SPEECH, TRAIN


def make_cfg(root, *overrides):
    register_resolvers()
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        return compose("train", overrides=["model=tiny", "logger=none", "trainer.precision=no", *overrides])


def gold_set(papers, tags_by_row):
    ids = [papers[r].id for r in tags_by_row]
    return GoldSet("gold.jsonl", {pid: tags for pid, tags in zip(ids, tags_by_row.values())},
                   {pid: papers[r].title for pid, r in zip(ids, tags_by_row)}, {pid: i + 1 for i, pid in enumerate(ids)})


@pytest.fixture(scope="module")
def papers(root):
    return list(read_seed_dump(root / "data/hf_papers_seed.txt"))[:40]


def test_gold_papers_are_held_out_and_hand_labels_override_weak_targets(papers, taxonomy):
    sets = {"dev": {"a": gold_set(papers, {0: ["nlp"], 1: []})}, "test": {"b": gold_set(papers, {2: ["nlp"]})}}
    split = pipeline.split_corpus(papers, sets, taxonomy.ids)
    assert set(split.train) == set(range(3, 40))
    assert split.of("dev") == ["dev/a"] and split.rows("test").tolist() == [2]
    weak = np.full((40, len(taxonomy)), 0.3, dtype=np.float32)
    hand = gold_set(papers, {5: ["speech-audio"], 7: []})
    targets, is_hand = pipeline.training_targets(papers, split, weak, hand, taxonomy.ids)
    row5, row7 = list(split.train).index(5), list(split.train).index(7)
    assert is_hand.sum() == 2 and is_hand[row5] and is_hand[row7]
    assert targets[row5, taxonomy.index("speech-audio")] == 1 and targets[row5].sum() == 1
    assert targets[row7].sum() == 0
    assert np.all(targets[~is_hand] == np.float32(0.3))
    with pytest.raises(CorpusError, match=r"gold.jsonl:1: .*is in a dev or test gold set"):
        pipeline.training_targets(papers, split, weak, gold_set(papers, {1: ["nlp"]}), taxonomy.ids)
    with pytest.raises(ValueError, match="data.gold.dev"):
        pipeline.split_corpus(papers, {"test": sets["test"]}, taxonomy.ids)


def test_self_training_rounds_relabel_with_the_model_and_keep_hand_labels(root, papers, taxonomy, tmp_path,
                                                                           monkeypatch):
    cfg = make_cfg(root, "trainer.epochs=1", "trainer.self_training.rounds=2", "trainer.self_training.epochs=1",
                   "trainer.self_training.model_weight=0.5", "trainer.batch_size=8", "trainer.log_every=1")
    split = pipeline.split_corpus(papers, {"dev": {"a": gold_set(papers, {i: ["nlp"] for i in range(8)})}},
                                  taxonomy.ids)
    weak = np.random.default_rng(0).random((40, len(taxonomy))).astype(np.float32)
    targets, hand = pipeline.training_targets(papers, split, weak, gold_set(papers, {10: ["nlp"]}), taxonomy.ids)
    seen = []
    fit = pipeline.fit

    def spy(t, accelerator, model, tokenizer, max_length, train_papers, train_targets, *args):
        seen.append(train_targets.copy())
        return fit(t, accelerator, model, tokenizer, max_length, train_papers, train_targets, *args)

    monkeypatch.setattr(pipeline, "fit", spy)
    backbone = pipeline.load_model(cfg, taxonomy.ids)
    accelerator = pipeline.make_accelerator(cfg)
    trained = pipeline.train(cfg, accelerator, backbone, papers, split, targets, hand, weak, taxonomy.ids, tmp_path)
    assert len(trained.rounds) == 3 and all(r.losses for r in trained.rounds)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["round-0", "round-1", "round-2"]
    np.testing.assert_array_equal(seen[0], targets)
    for later in seen[1:]:
        assert not np.allclose(later[~hand], targets[~hand])  # half the model's probabilities now
        np.testing.assert_array_equal(later[hand], targets[hand])  # hand labels stay
    # The mix is (weak + model) / 2, so it stays within half a unit of the weak labels.
    assert np.abs(seen[1][~hand] - weak[split.train][~hand]).max() <= 0.5 + 1e-6


def test_rule_table_covers_every_vote_pattern(taxonomy):
    patterns = all_vote_patterns(3, len(taxonomy))
    assert patterns.shape == (27, 3, len(taxonomy))
    assert len({tuple(p[:, 0]) for p in patterns}) == 27
    corpus = [Paper("x", "Speech recognition", "Audio. Speech.")]
    blend = RuleBlend.fit(taxonomy, 2, rule_functions(taxonomy, 2)(corpus), MajorityVote(), 0.5)
    np.testing.assert_allclose(blend.table, MajorityVote().predict_proba(patterns))
    probs = blend.rule_probs([Paper("p", "Automatic speech recognition for audio", "We transcribe speech audio.",
                                    ("eess.AS",))])
    assert probs[0, taxonomy.index("speech-audio")] == 1.0 and probs[0, taxonomy.index("causal-inference")] == 0.0


@pytest.fixture
def blended_checkpoint(tiny_onnx_checkpoint, taxonomy, tmp_path):
    path = shutil.copytree(tiny_onnx_checkpoint, tmp_path / "blended")
    votes = rule_functions(taxonomy, 2)([Paper("x", "x", "x")])
    RuleBlend.fit(taxonomy, 2, votes, MajorityVote(), weight=0.4).save(path)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_blend_round_trips_through_the_checkpoint_tagger_and_predict_py(blended_checkpoint, tiny_onnx_checkpoint,
                                                                        taxonomy, tmp_path, root, backend):
    records = [{"id": f"r{i}", "title": t, "abstract": a} for i, ((t, a), _) in enumerate(TRAIN)]
    alone = Tagger.from_pretrained(tiny_onnx_checkpoint, backend=backend, precision="fp32")
    blended = Tagger.from_pretrained(blended_checkpoint, backend=backend, precision="fp32")
    assert alone.blend is None and blended.blend.weight == 0.4
    rules = blended.blend.rule_probs([Paper(r["id"], r["title"], r["abstract"]) for r in records])
    np.testing.assert_allclose(blended.scores(records), 0.6 * alone.scores(records) + 0.4 * rules, atol=1e-6)
    assert rules[0, taxonomy.index("speech-audio")] == 1.0  # the speech abstract fires the speech rules

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([sys.executable, str(root / "predict.py"), f"input={src}", f"output={out}",
                           f"checkpoint={blended_checkpoint}", f"backend={backend}", "precision=fp32",
                           "progress=false"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = blended.predict(records)
    assert [r["tags"] for r in rows] == [e["tags"] for e in expected]
    np.testing.assert_allclose([list(r["scores"].values()) for r in rows],
                               [list(e["scores"].values()) for e in expected], atol=1e-4)  # 4 decimals written


def test_a_malformed_rules_file_is_refused(blended_checkpoint):
    data = json.loads((blended_checkpoint / RULES_FILE).read_text())
    data["weight"] = 1.5
    (blended_checkpoint / RULES_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"rules.json"):
        Tagger.from_pretrained(blended_checkpoint)


def test_a_single_speech_string_still_gets_its_tag(blended_checkpoint):
    assert "speech-audio" in Tagger.from_pretrained(blended_checkpoint).predict([f"{SPEECH[0]}. {SPEECH[1]}"])[0]["tags"]
