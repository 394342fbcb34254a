"""The training loop in-process on a tiny randomly initialised BERT with synthetic soft targets:
loss falls, kill-and-resume equals an uninterrupted run, backbone fallback, config checks,
thresholds and export."""

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from helpers import CALIBRATION, fit, make_cfg, weights
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from abstract_tagger import Tagger, pipeline
from abstract_tagger.checkpoint.export import export_checkpoint
from abstract_tagger.checkpoint.format import load_thresholds
from abstract_tagger.common.bundled import BUNDLED_MINILM, resolve_path
from abstract_tagger.common.config import ConfigError
from abstract_tagger.data.corpus import read_seed_dump
from abstract_tagger.training.backbone import BackboneUnavailable, load_backbone
from abstract_tagger.training.checks import validate


@pytest.fixture(scope="module")
def papers(root):
    return [p for p in read_seed_dump(root / "data/hf_papers_seed.txt")][:48]


def test_loss_falls_and_export_loads(root, papers, taxonomy, tmp_path):
    # Unweighted BCE, so the loss values are comparable from the first step to the last.
    cfg = make_cfg(root, "trainer.epochs=6", "trainer.batch_size=8", "trainer.log_every=1", "trainer.lr=3e-3",
                   "trainer.pos_weight=null")
    result = fit(cfg, papers, taxonomy, tmp_path)
    assert np.mean(result.losses[-3:]) < 0.8 * np.mean(result.losses[:3]), result.losses
    assert len(result.epoch_metrics) == 6
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["batch-25", "batch-30"]  # keep_states=2

    thresholds = {t: 0.3 for t in taxonomy.ids}
    result.backbone.tokenizer.model_max_length = 64
    out = export_checkpoint(result.backbone.model.half(), result.backbone.tokenizer, tmp_path / "checkpoint",
                            thresholds=thresholds, taxonomy=taxonomy, calibration=CALIBRATION, card="# card\n")
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.problem_type == "multi_label_classification"
    assert [model.config.id2label[i] for i in range(18)] == taxonomy.ids
    assert next(model.parameters()).dtype == torch.float16
    assert AutoTokenizer.from_pretrained(out).model_max_length == 64
    assert load_thresholds(out, taxonomy.ids) == thresholds
    texts = ["Speech recognition for children.", "Policy optimization with rewards in Markov decision processes."]
    on_torch, on_onnx = (Tagger.from_pretrained(out, backend=b, precision="fp32") for b in ("torch", "onnx"))
    np.testing.assert_allclose(on_onnx.scores(texts), on_torch.scores(texts), atol=1e-5)
    # Atomic overwrite: a second export replaces the first and leaves no temp dirs behind.
    export_checkpoint(result.backbone.model, result.backbone.tokenizer, out, thresholds=thresholds,
                      taxonomy=taxonomy, calibration=CALIBRATION, card="")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "state"]


def test_resume_after_kill_matches_uninterrupted_run(root, papers, taxonomy, tmp_path, monkeypatch):
    # 40 training papers / batch 8 = 5 batches an epoch; states at batches 2, 4, 5 (epoch end), 6, 8, 10
    overrides = ["trainer.epochs=2", "trainer.batch_size=8", "trainer.save_every=2", "trainer.keep_states=5"]
    full = weights(fit(make_cfg(root, *overrides), papers, taxonomy, tmp_path / "full").backbone.model)

    save_state = Accelerator.save_state

    def save_then_die(self, output_dir, **kw):
        save_state(self, output_dir, **kw)
        if "batch-8" in output_dir:  # mid-epoch 2, before the save completes: resume takes batch-6 and skips batches
            raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(make_cfg(root, *overrides), papers, taxonomy, tmp_path / "killed")
    monkeypatch.undo()
    resumed = weights(fit(make_cfg(root, *overrides, "trainer.resume=auto"), papers, taxonomy,
                          tmp_path / "killed").backbone.model)
    assert resumed.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    # And it really differs from the state it resumed from.
    fresh = weights(fit(make_cfg(root, "trainer.epochs=1", "trainer.batch_size=8"), papers, taxonomy,
                        tmp_path / "one").backbone.model)
    assert not torch.allclose(fresh["classifier.weight"], full["classifier.weight"])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, taxonomy):
    """A pretrained-style encoder directory (no classification head), as a local fallback."""
    path = tmp_path_factory.mktemp("tiny-backbone")
    tok = AutoTokenizer.from_pretrained(resolve_path(BUNDLED_MINILM))
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_fallback_warns_and_trains(root, papers, taxonomy, tiny_model_dir, tmp_path, caplog):
    cfg = make_cfg(root, "model=scibert", f"model.name_or_path={tmp_path}/no-such-model",
                   f"model.fallback={tiny_model_dir}", "model.max_length=32", "trainer.epochs=1")
    with caplog.at_level(logging.WARNING, logger="abstract_tagger.training.backbone"):
        result = fit(cfg, papers, taxonomy, tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.name == "abstract_tagger.training.backbone"]
    assert len(warnings) == 1 and "falling back" in warnings[0] and str(tiny_model_dir) in warnings[0]
    assert result.backbone.fell_back and result.backbone.source == str(tiny_model_dir)
    assert result.backbone.model.config.num_labels == 18
    assert result.losses


def test_fallback_trains_with_its_own_settings(root, papers, taxonomy, tiny_model_dir, tmp_path):
    """SciBERT's learning rates collapse the bundled MiniLM: the fallback brings its own."""
    cfg = make_cfg(root, "model=scibert", f"model.name_or_path={tmp_path}/no-such-model",
                   f"model.fallback.name_or_path={tiny_model_dir}", "model.fallback.max_length=24",
                   "model.fallback.lr=0.0123", "model.fallback.head_lr=0.0456", "trainer.epochs=1")
    result = fit(cfg, papers, taxonomy, tmp_path / "run")
    assert result.backbone.fell_back
    assert (cfg.model.max_length, cfg.trainer.lr, cfg.trainer.head_lr) == (24, 0.0123, 0.0456)
    explicit = make_cfg(root, "model=scibert", f"model.name_or_path={tmp_path}/no-such-model",
                        f"model.fallback.name_or_path={tiny_model_dir}", "trainer.lr=0.002", "trainer.epochs=1")
    fit(explicit, papers, taxonomy, tmp_path / "run2")
    assert explicit.trainer.lr == 0.002 and explicit.trainer.head_lr == 3e-3


def test_missing_backbone_without_fallback_is_a_clear_error(root, taxonomy, tmp_path):
    cfg = make_cfg(root, "model=scibert", f"model.name_or_path={tmp_path}/nope", "model.fallback=null")
    with pytest.raises(BackboneUnavailable, match=r"model.name_or_path=.*nope.*model.fallback is null"):
        load_backbone(cfg.model, taxonomy.ids)


def test_hub_id_offline_fails_fast(root, taxonomy, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = make_cfg(root, "model=scibert", "model.name_or_path=allenai/not-a-cached-model", "model.fallback=null")
    start = time.perf_counter()
    with pytest.raises(BackboneUnavailable, match="HF_HUB_OFFLINE"):
        load_backbone(cfg.model, taxonomy.ids)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("override, key", [
    ("trainer.lr=0", "trainer.lr"),
    ("trainer.lr=-1e-5", "trainer.lr"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("+trainer.pos_weight={not-a-tag: 2.0}", "trainer.pos_weight"),
    ("data.gold.dev.seed=/no/such/gold.jsonl", "data.gold.dev.seed"),
    ("data.gold_train=/no/such/gold.jsonl", "data.gold_train"),
    ("data.gold_train.recent=/no/such/gold.jsonl", "data.gold_train.recent"),
    ("data.gold_train.recent=3", "data.gold_train.recent"),
    ("data.gold_train=3", "data.gold_train"),
    ("thresholds.policy=best", "thresholds.policy"),
    ("thresholds.folds=1", "thresholds.folds"),
    ("trainer.self_training.rounds=-1", "trainer.self_training.rounds"),
    ("trainer.self_training.model_weight=1.5", "trainer.self_training.model_weight"),
    ("rule_blend.weights=[0.2,2.0]", "rule_blend.weights"),
    ("data.sources.seed.path=/no/such/seed.txt", "data.sources.seed.path"),
    ("trainer.resume=/no/such/state", "trainer.resume"),
    ("export.dtype=int8", "export.dtype"),
    ("trainer.hand_weight=0", "trainer.hand_weight"),
    ("trainer.clean_phase.epochs=-1", "trainer.clean_phase.epochs"),
    (("trainer.clean_phase.epochs=2", "data.gold_train=null"), "trainer.clean_phase.epochs"),  # no hand labels
    (("trainer.clean_phase.epochs=2", "data.gold_train.recent=null", "data.gold_train.seed=null", "data.gold_train.older=null"),
     "trainer.clean_phase.epochs"),  # every set dropped
    ("trainer.clean_phase.lr=0", "trainer.clean_phase.lr"),
])
def test_bad_config_values_name_the_key(root, taxonomy, override, key):
    overrides = override if isinstance(override, tuple) else (override.replace("+trainer.pos_weight", "trainer.pos_weight"),)
    cfg = make_cfg(root, *overrides)
    with pytest.raises(ConfigError, match=rf"^{key}="):
        validate(cfg, taxonomy.ids)


@pytest.mark.parametrize("overrides", [(), ("model=minilm", "trainer.pos_weight={nlp: 2.0}"), ("data=seed_only",),
                                       ("experiment=smoke",), ("trainer/loss=asl", "trainer.pos_weight=null")])
def test_shipped_configs_are_valid(root, taxonomy, overrides):
    cfg = make_cfg(root, *overrides)
    assert validate(cfg, taxonomy.ids) is None  # raises ConfigError on the first bad value


def test_review_ranks_biggest_disagreements_first(tmp_path, papers):
    weak = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.1]], dtype=np.float32)
    model = np.array([[0.9, 0.1], [0.1, 0.9], [0.4, 0.1]], dtype=np.float32)
    pool = pipeline.Pool(papers[:3], weak=weak, shipped=model)
    pipeline.write_review(tmp_path / "review.jsonl", pool, np.array([0.5, 0.5]), 0.5, ["a", "b"],
                          {papers[1].id: ["b"]}, size=10)
    rows = [json.loads(line) for line in (tmp_path / "review.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [papers[1].id, papers[2].id]  # paper 0 agrees: not listed
    assert rows[0]["model_tags"] == ["b"] and rows[0]["weak_tags"] == ["a"] and rows[0]["gold_tags"] == ["b"]
    assert set(rows[0]["differences"]) == {"a", "b"}


def test_a_review_that_fails_midway_leaves_the_last_one_whole(tmp_path, papers):
    """review.jsonl used to be written row by row: an error (or a kill) midway left a truncated file
    in place of the last run's review."""
    weak = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.1]], dtype=np.float32)
    model = np.array([[0.1, 0.1], [0.1, 0.9], [0.4, 0.1]], dtype=np.float32)
    broken = [papers[0], papers[1], dataclasses.replace(papers[2], abstract=object())]  # cannot be written as JSON
    path = tmp_path / "review.jsonl"
    path.write_text("the last run's review\n")
    with pytest.raises(TypeError):
        pipeline.write_review(path, pipeline.Pool(broken, weak=weak, shipped=model), np.array([0.5, 0.5]), 0.5,
                              ["a", "b"], {}, size=10)
    assert path.read_text() == "the last run's review\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["review.jsonl"]


def test_progress_in_a_log_file_is_one_line_per_refresh(monkeypatch):
    """A log used to hold thousands of `\\r` frames on one line; off a terminal each refresh is a line.
    Training and predict.py share the bar."""
    import io

    from abstract_tagger.common.progress import progress_bar

    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    bar = progress_bar(total=30, unit="sample")
    assert bar.mininterval == 60.0
    bar.mininterval = 0
    for _ in range(3):
        bar.update(10)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) >= 3
    assert lines[-1].startswith("100%") and "30/30" in lines[-1]
