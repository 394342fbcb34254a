"""The training run's parts on small fixtures: gold papers held out, hand labels as training
targets, self-training rounds, and the rule blend through export, Tagger and predict.py."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from accelerate.utils import set_seed
from helpers import BACKENDS, SPEECH, TRAIN, minilm_tokenizer, weak_labels_on_disk
from hydra import compose, initialize_config_dir

from abstract_tagger import Tagger, pipeline
from abstract_tagger.checkpoint.format import RULES_FILE, CheckpointError, save_rules
from abstract_tagger.common.config import register_resolvers
from abstract_tagger.data.corpus import CorpusError, GoldSet, Paper, read_seed_dump
from abstract_tagger.labeling.label_model import MajorityVote
from abstract_tagger.labeling.rule_blend import RuleBlend, all_vote_patterns, rule_functions
from abstract_tagger.training.data import papers_dataset, training_data


def make_cfg(root, *overrides):
    register_resolvers()
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        return compose("train", overrides=["model=tiny", "logger=none", "trainer.precision=fp32", *overrides])


def gold_set(papers, tags_by_row):
    ids = [papers[r].id for r in tags_by_row]
    return GoldSet("gold.jsonl", {pid: tags for pid, tags in zip(ids, tags_by_row.values())},
                   {pid: papers[r].title for pid, r in zip(ids, tags_by_row)}, {pid: i + 1 for i, pid in enumerate(ids)})


@pytest.fixture(scope="module")
def papers(root):
    return list(read_seed_dump(root / "data/hf_papers_seed.txt"))[:40]


def data_of(cfg, tmp_path, papers, weak, sets, hand, taxonomy):
    """`hand`: one GoldSet, a list of them (the sets of data.gold_train), or None."""
    hand = [hand] if isinstance(hand, GoldSet) else (hand or [])
    return training_data(cfg, weak_labels_on_disk(tmp_path / "weak", papers, weak, taxonomy.ids), sets, hand,
                         taxonomy.ids, minilm_tokenizer(), 64)


def test_the_blend_reuses_the_votes_the_weak_labels_stored(root, papers, taxonomy, tmp_path, monkeypatch):
    """The rule functions voted on every paper when the weak labels were made: the blend is fitted on
    those stored votes, and comes out the same as when the functions vote again."""
    from dataclasses import replace

    from abstract_tagger.training import evaluation

    cfg = make_cfg(root, f"paths.cache_dir={tmp_path / 'cache'}")
    rules = rule_functions(taxonomy, cfg.labeling.keywords.min_abstract_hits)
    weak = np.random.default_rng(0).random((40, len(taxonomy))).astype(np.float32)
    sets = {"dev": {"a": gold_set(papers, {i: ["nlp"] if i % 2 else [] for i in range(10)})}}
    data = training_data(cfg, weak_labels_on_disk(tmp_path / "weak", papers, weak, taxonomy.ids, functions=rules),
                         sets, [], taxonomy.ids, minilm_tokenizer(), 64)
    pool = data.held_out + list(papers[10:20])
    probs = np.random.default_rng(1).random((len(pool), len(taxonomy))).astype(np.float32)
    voted = []

    class Counting:
        def __init__(self, taxonomy, min_hits):
            self.functions = rule_functions(taxonomy, min_hits)
            self.names = self.functions.names

        def __call__(self, batch):
            voted.append(len(batch))
            return self.functions(batch)

    monkeypatch.setattr(evaluation, "rule_functions", Counting)
    blend, weights, shipped = evaluation.fit_blend(cfg, taxonomy, data, pool, probs)
    assert voted == []  # every vote came from the weak labels' chunks
    again, weights_again, shipped_again = evaluation.fit_blend(cfg, taxonomy, replace(data, vote_names=[]), pool, probs)
    assert sum(voted) >= len(pool)  # without stored votes of the rule functions, they vote again
    np.testing.assert_array_equal(blend.table, again.table)
    assert weights == weights_again
    np.testing.assert_array_equal(shipped, shipped_again)


def test_gold_papers_are_held_out_and_hand_labels_override_weak_targets(root, papers, taxonomy, tmp_path):
    cfg = make_cfg(root, f"paths.cache_dir={tmp_path / 'cache'}")
    sets = {"dev": {"a": gold_set(papers, {0: ["nlp"], 1: []})}, "test": {"b": gold_set(papers, {2: ["nlp"]})}}
    weak = np.full((40, len(taxonomy)), 0.3, dtype=np.float32)
    hand = gold_set(papers, {5: ["speech-audio"], 7: []})
    data = data_of(cfg, tmp_path, papers, weak, sets, hand, taxonomy)
    assert [p.id for p in data.held_out] == [p.id for p in papers[:3]] and data.n_corpus == 40
    assert data.train["id"] == [p.id for p in papers[3:]]
    assert data.split.of("dev") == ["dev/a"] and data.split.rows("test").tolist() == [2]
    targets, is_hand = np.array(data.train["labels"]), np.array(data.train["hand"])
    row5, row7 = data.train["id"].index(papers[5].id), data.train["id"].index(papers[7].id)
    assert data.n_hand == 2 and is_hand[row5] and is_hand[row7]
    assert targets[row5, taxonomy.index("speech-audio")] == 1 and targets[row5].sum() == 1
    assert targets[row7].sum() == 0
    assert np.all(targets[~is_hand] == np.float32(0.3))
    with pytest.raises(CorpusError, match=r"gold.jsonl:1: .*is in a dev or test gold set"):
        data_of(cfg, tmp_path, papers, weak, sets, gold_set(papers, {1: ["nlp"]}), taxonomy)
    with pytest.raises(ValueError, match="data.gold.dev"):
        data_of(cfg, tmp_path, papers, weak, {"test": sets["test"]}, None, taxonomy)


def test_clean_training_sets_are_named_files_trained_on_together(root, papers, taxonomy, tmp_path):
    """data.gold_train: one file, or {name: file or null}. Every named set's papers train on their hand
    labels; a paper in two sets is an error naming the second file's line."""
    from abstract_tagger.data.corpus import read_gold_train

    def gold_file(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": papers[r].id, "title": papers[r].title, "tags": tags}) + "\n"
                                for r, tags in rows.items()))
        return str(path)

    recent, older = gold_file("recent.jsonl", {5: ["nlp"]}), gold_file("older.jsonl", {7: ["speech-audio"], 9: []})
    cfg = make_cfg(root, f"paths.cache_dir={tmp_path / 'cache'}")
    weak = np.full((40, len(taxonomy)), 0.3, dtype=np.float32)
    sets = {"dev": {"a": gold_set(papers, {0: ["nlp"]})}}
    hand = read_gold_train({"recent": recent, "older": older, "dropped": None}, taxonomy.ids)
    data = data_of(cfg, tmp_path, papers, weak, sets, hand, taxonomy)
    targets, ids = np.array(data.train["labels"]), data.train["id"]
    assert data.n_hand == 3 and sorted(np.flatnonzero(data.train["hand"])) == sorted(
        ids.index(papers[r].id) for r in (5, 7, 9))
    assert targets[ids.index(papers[7].id)].tolist() == [float(t == "speech-audio") for t in taxonomy.ids]
    assert [g.path for g in read_gold_train(older, taxonomy.ids)] == [older] and read_gold_train(None, taxonomy.ids) == []
    again = gold_file("again.jsonl", {8: ["nlp"], 5: ["nlp"]})
    with pytest.raises(CorpusError, match=r"again.jsonl:2: .*also in gold set train/recent"):
        read_gold_train({"recent": recent, "again": again}, taxonomy.ids)


def test_max_train_papers_keeps_a_seeded_sample_and_every_hand_label(root, papers, taxonomy, tmp_path):
    sets = {"dev": {"a": gold_set(papers, {0: ["nlp"]})}}
    weak = np.random.default_rng(0).random((40, len(taxonomy))).astype(np.float32)
    hand = gold_set(papers, {39: ["nlp"]})

    def sample(seed, limit=10):
        cfg = make_cfg(root, f"paths.cache_dir={tmp_path / 'cache'}", f"data.max_train_papers={limit}", f"seed={seed}")
        return data_of(cfg, tmp_path, papers, weak, sets, hand, taxonomy).train["id"]

    first, again, other = sample(1), sample(1), sample(2)
    assert first == again and first != other
    in_sample = [pid for pid in first if pid != papers[39].id]
    assert len(in_sample) == 10 and papers[39].id in first  # hand labels stay beside the sample
    assert first == [p.id for p in papers if p.id in set(first)]  # corpus order kept
    assert sample(1, limit=1000) == [p.id for p in papers[1:]]  # a limit above the corpus keeps everything


def test_max_steps_stops_training_at_the_budget(root, papers, taxonomy, tmp_path):
    from helpers import fit as fit_tiny

    cfg = make_cfg(root, "trainer.epochs=5", "trainer.max_steps=3", "trainer.batch_size=4", "trainer.log_every=1")
    fitted = fit_tiny(cfg, papers, taxonomy, tmp_path)
    assert fitted.steps == [1, 2, 3] and fitted.epoch_steps == [3] and len(fitted.epoch_metrics) == 1
    # Beyond one epoch (32 papers / batch 4 = 8 steps each): a cut-short third epoch.
    longer = fit_tiny(make_cfg(root, "trainer.max_steps=19", "trainer.batch_size=4", "trainer.log_every=100"),
                      papers, taxonomy, tmp_path / "longer")
    assert longer.epoch_steps == [8, 16, 19]


def test_self_training_rounds_relabel_with_the_model_and_keep_hand_labels(root, papers, taxonomy, tmp_path,
                                                                           monkeypatch):
    cfg = make_cfg(root, "trainer.epochs=1", "trainer.self_training.rounds=2", "trainer.self_training.epochs=1",
                   "trainer.self_training.model_weight=0.5", "trainer.batch_size=8", "trainer.log_every=1",
                   f"paths.cache_dir={tmp_path / 'cache'}")
    weak = np.random.default_rng(0).random((40, len(taxonomy))).astype(np.float32)
    data = data_of(cfg, tmp_path, papers, weak, {"dev": {"a": gold_set(papers, {i: ["nlp"] for i in range(8)})}},
                   gold_set(papers, {10: ["nlp"]}), taxonomy)
    targets, hand = np.array(data.train["labels"]), np.array(data.train["hand"])
    seen = []
    fit = pipeline.fit

    def spy(t, accelerator, model, tokenizer, data, *args):
        seen.append(np.array(data.train["labels"]))
        return fit(t, accelerator, model, tokenizer, data, *args)

    monkeypatch.setattr(pipeline, "fit", spy)
    backbone = pipeline.load_model(cfg, taxonomy.ids)
    accelerator = pipeline.make_accelerator(cfg)
    logged = []  # the steps trackers get: wandb drops one lower than a step already logged
    monkeypatch.setattr(accelerator, "log", lambda values, step=None, **kw: logged.append(step))
    trained = pipeline.train(cfg, accelerator, backbone, data, taxonomy.ids, tmp_path)
    assert len(trained.rounds) == 3 and all(r.losses for r in trained.rounds)
    assert logged == sorted(logged) and logged[-1] == trained.steps == sum(r.epoch_steps[-1] for r in trained.rounds)
    # Each round starts where the one before ended, for the trackers and for loss.png alike.
    ends = [r.epoch_steps[-1] for r in trained.rounds]
    assert trained.first_steps == [0, ends[0], ends[0] + ends[1], trained.steps]
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["round-0", "round-1", "round-2"]
    np.testing.assert_array_equal(seen[0], targets)
    for later in seen[1:]:
        assert not np.allclose(later[~hand], targets[~hand])  # half the model's probabilities now
        np.testing.assert_array_equal(later[hand], targets[hand])  # hand labels stay
    # The mix is (weak + model) / 2, so it stays within half a unit of the weak labels.
    assert np.abs(seen[1][~hand] - weak[8:][~hand]).max() <= 0.5 + 1e-6


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
    save_rules(RuleBlend.fit(taxonomy, 2, votes, MajorityVote(), weight=0.4), path)
    return path


@pytest.mark.slow
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


def test_the_tests_never_cache_into_the_checkout(root):
    """bf16 embeddings depend slightly on their batch, so vectors a test left in the checkout's .cache made
    the next `make train` of a fresh clone train a slightly different model; tests cache elsewhere."""
    from pathlib import Path

    cache = Path(make_cfg(root).paths.cache_dir).resolve()
    assert not cache.is_relative_to(root) and cache == Path(os.environ["ABSTRACT_TAGGER_CACHE"]).resolve()


def test_papers_are_tokenised_a_thousand_at_a_time():
    """A fast tokenizer holds each text's truncated-off tokens until the call returns: one call on the
    20,000-paper review pool took 800 MB."""
    from abstract_tagger.training.data import encode

    tokenizer, calls = minilm_tokenizer(), []

    def spy(texts, **kwargs):
        calls.append(len(texts))
        return tokenizer(texts, **kwargs)

    papers = [Paper(f"p{i}", f"Title {i}", "An abstract about speech. " * (i % 7 + 1)) for i in range(2500)]
    inputs = encode(spy, papers, 32)
    assert calls == [1000, 1000, 500]
    assert inputs == dict(tokenizer([p.text for p in papers], truncation=True, max_length=32))


def test_clean_phase_trains_on_hand_labels_alone_and_moves_towards_them(root, papers, taxonomy, tmp_path,
                                                                         monkeypatch):
    tags = ["nlp", "speech-audio", "computer-vision", "reinforcement-learning"]
    hand_rows = {10 + i: [tags[i % 4]] for i in range(8)}
    cfg = make_cfg(root, "trainer.epochs=1", "trainer.batch_size=4", "trainer.log_every=1", "trainer.pos_weight=null",
                   "trainer.clean_phase.epochs=8", "trainer.clean_phase.lr=3e-3", "trainer.hand_weight=3",
                   f"paths.cache_dir={tmp_path / 'cache'}")
    weak = np.full((40, len(taxonomy)), 0.2, dtype=np.float32)
    data = data_of(cfg, tmp_path, papers, weak, {"dev": {"a": gold_set(papers, {i: ["nlp"] for i in range(8)})}},
                   gold_set(papers, hand_rows), taxonomy)
    set_seed(cfg.seed)
    backbone = pipeline.load_model(cfg, taxonomy.ids)
    accelerator = pipeline.make_accelerator(cfg)
    hand_data = papers_dataset([papers[r] for r in hand_rows], backbone.tokenizer, 64)
    hand_labels = np.array([[float(t in row_tags) for t in taxonomy.ids] for row_tags in hand_rows.values()])

    def hand_loss(model):  # mean BCE of the model's scores against the hand labels
        p = np.clip(pipeline.model_probs(cfg, accelerator, model, backbone.tokenizer, hand_data), 1e-6, 1 - 1e-6)
        return -np.mean(hand_labels * np.log(p) + (1 - hand_labels) * np.log(1 - p))

    seen, before = [], []
    fit = pipeline.fit

    def spy(t, accelerator, model, tokenizer, data, *args):
        seen.append((data.train["id"], np.array(data.train["labels"])))
        before.append(hand_loss(model))
        return fit(t, accelerator, model, tokenizer, data, *args)

    monkeypatch.setattr(pipeline, "fit", spy)
    trained = pipeline.train(cfg, accelerator, backbone, data, taxonomy.ids, tmp_path)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["clean", "round-0"]
    assert len(seen) == 2 and len(seen[0][0]) == 32  # every training paper, then the hand-labelled ones alone
    assert seen[1][0] == [papers[r].id for r in hand_rows]
    np.testing.assert_array_equal(seen[1][1], hand_labels)  # hard targets, not the weak 0.2
    clean = trained.rounds[1]
    assert np.mean(clean.losses[-3:]) < 0.8 * np.mean(clean.losses[:3])
    # The clean phase moves the model to the hand labels (it starts where the weak-label epochs left it).
    assert hand_loss(trained.backbone.model) < 0.8 * before[1]


def test_hand_weight_counts_hand_labelled_papers_more():
    import torch

    from abstract_tagger.training.loop import _weighted_mean

    losses = torch.tensor([[1.0, 1.0], [3.0, 5.0]])  # per-paper means 1 and 4
    hand = torch.tensor([False, True])
    assert _weighted_mean(losses, hand, 1.0).item() == 2.5
    assert _weighted_mean(losses, hand, 3.0).item() == (1 + 3 * 4) / 4
    assert _weighted_mean(losses, None, 3.0).item() == 2.5


@pytest.mark.parametrize("row, error", [
    ({"tags": ["not-a-tag"]}, r"hand.jsonl:2: .*unknown tag"),
    ({"id": "no-such-paper"}, r"hand.jsonl:2: no-such-paper: not in the corpus"),
    ({"title": "Another title"}, r"hand.jsonl:2: .*gold title 'Another title' does not match"),
    ({"paper": 0}, r"hand.jsonl:2: .*is in a dev or test gold set"),
])
def test_clean_training_file_is_checked_line_by_line(root, papers, taxonomy, tmp_path, row, error):
    """data.gold_train: ids and titles must match corpus papers, tags the taxonomy, and no paper may be a
    dev or test paper; each fault names the file and line."""
    from abstract_tagger.data.corpus import read_gold

    cfg = make_cfg(root, f"paths.cache_dir={tmp_path / 'cache'}")
    paper = papers[row.pop("paper", 6)]
    rows = [{"id": papers[5].id, "title": papers[5].title, "tags": ["nlp"]},
            {"id": paper.id, "title": paper.title, "tags": ["speech-audio"], **row}]
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    weak = np.full((40, len(taxonomy)), 0.3, dtype=np.float32)
    sets = {"dev": {"a": gold_set(papers, {0: ["nlp"]})}}
    with pytest.raises(CorpusError, match=error):
        data_of(cfg, tmp_path, papers, weak, sets, read_gold(path, taxonomy.ids), taxonomy)
