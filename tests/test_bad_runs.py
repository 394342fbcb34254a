"""Hostile settings, checkpoints, kills and resumes: a one-line error naming the setting, file or line
(or a warning), never garbage output, mixed rows or debris. Numbers refer to the cases of the issue "No
silent loss, no garbage out"."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from helpers import (
    CALIBRATION,
    Killed,
    card_facts,
    fit,
    labelled_dataset,
    make_cfg,
    minilm_tokenizer,
    records,
    run_publish,
    synthetic_targets,
    weights,
    write_jsonl,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from abstract_tagger import Tagger, pipeline
from abstract_tagger.checkpoint.export import export_checkpoint
from abstract_tagger.checkpoint.format import CheckpointError, save_rules
from abstract_tagger.common.config import ConfigError
from abstract_tagger.data.corpus import CorpusError, read_seed_dump
from abstract_tagger.inference.files import OutputFiles, predict_file, validate_predict
from abstract_tagger.training import loop as training
from abstract_tagger.training.checks import validate
from abstract_tagger.training.data import Split, TrainingData

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def papers(root):
    return list(read_seed_dump(root / "data/hf_papers_seed.txt"))[:48]


@pytest.fixture(scope="module")
def tagger(tiny_checkpoint):
    return Tagger.from_pretrained(tiny_checkpoint, precision="fp32")


def predict_cfg(root, *overrides):
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        return compose("predict", overrides=list(overrides))


def broken_checkpoint(tiny_checkpoint, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    return path


@pytest.mark.parametrize("override, key", [
    ("chunk_size=0", "chunk_size"), ("chunk_size=-1", "chunk_size"), ("batch_size=-3", "batch_size"),
    ("batch_size=0", "batch_size"), ("batch_size=abc", "batch_size"), ("threshold=1.5", "threshold"),
    ("threshold=-0.5", "threshold"), ("top_k=0", "top_k"), ("top_k=-1", "top_k"), ("output=x.csv.gz", "output"),
    ("precision=fp8", "precision"), ("on_error=ignore", "on_error"), ("shard=2/2", "shard"),
])
def test_3_9_bad_predict_setting_names_the_key(root, tmp_path, override, key):
    src = write_jsonl(tmp_path / "in.jsonl", records(2))
    cfg = predict_cfg(root, f"input={src}", f"output={tmp_path / 'out.jsonl'}", override)
    with pytest.raises(ConfigError, match=rf"^{key}="):
        validate_predict(cfg)


def test_2_9_output_over_the_input_or_a_directory_is_refused(root, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", records(2))
    before = (tmp_path / "in.jsonl").read_bytes()
    for output, reason in ((src, "would overwrite the input"), (f"{tmp_path}/./in.jsonl", "would overwrite the input"),
                           (str(tmp_path), "is a directory")):
        with pytest.raises(ConfigError, match=f"^output=.*{reason}"):
            validate_predict(predict_cfg(root, f"input={src}", f"output={output}"))
    (tmp_path / "link.jsonl").symlink_to(src)
    with pytest.raises(ConfigError, match="would overwrite the input"):
        validate_predict(predict_cfg(root, f"input={tmp_path / 'link.jsonl'}", f"output={src}"))
    assert (tmp_path / "in.jsonl").read_bytes() == before
    validate_predict(predict_cfg(root, f"input={src}", f"output={tmp_path / 'out.jsonl'}"))  # a good one passes


def killed_run(tagger, src, out, monkeypatch, after=0):
    """A run killed as it tags its chunk `after` (0: before any row is written)."""
    calls, scores = [], tagger.scores

    def dies(texts, **kw):
        calls.append(1)
        if len(calls) > after:
            raise Killed
        return scores(texts, **kw)

    monkeypatch.setattr(tagger, "scores", dies)
    with pytest.raises(Killed):
        predict_file(tagger, src, out, chunk_size=2, progress=False)
    monkeypatch.undo()


def test_4_resume_refuses_a_replaced_input_or_another_checkpoint(tagger, tiny_checkpoint, tmp_path, monkeypatch):
    src, out = write_jsonl(tmp_path / "in.jsonl", records(6)), tmp_path / "out.jsonl"
    killed_run(tagger, src, out, monkeypatch)
    write_jsonl(tmp_path / "in.jsonl", records(7)[1:])  # same path, other papers
    with pytest.raises(ValueError, match="different input_content"):
        predict_file(tagger, src, out, chunk_size=2, progress=False, resume=True)
    assert OutputFiles(out).journal.exists()  # the refusal keeps the partial run for a resume that fits

    write_jsonl(tmp_path / "in.jsonl", records(6))
    killed_run(tagger, src, out, monkeypatch)
    other = broken_checkpoint(tiny_checkpoint, tmp_path)
    (other / "thresholds.json").write_text(json.dumps({t: 0.3 for t in tagger.labels}))
    with pytest.raises(ValueError, match="different checkpoint_weights"):
        predict_file(Tagger.from_pretrained(other, precision="fp32"), src, out, chunk_size=2, progress=False,
                     resume=True)


def test_4_checkpoint_fingerprint_covers_the_rule_blend(tagger, taxonomy, monkeypatch):
    from abstract_tagger.inference.files import _weights_digest
    from abstract_tagger.labeling.rule_blend import RuleBlend, rule_functions

    before = _weights_digest(tagger)
    table = np.full((3 ** len(rule_functions(taxonomy, 1).names), len(taxonomy)), 0.5, dtype=np.float32)
    monkeypatch.setattr(tagger, "blend", RuleBlend(taxonomy, 1, table, 0.3))
    with_blend = _weights_digest(tagger)
    monkeypatch.setattr(tagger, "blend", RuleBlend(taxonomy, 1, table, 0.4))
    assert len({before, with_blend, _weights_digest(tagger)}) == 3


def drop_classifier(path):
    state = load_file(path / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("classifier.")}, path / "model.safetensors",
              metadata={"format": "pt"})


def nan_weights(path):
    state = load_file(path / "model.safetensors")
    state["classifier.weight"] = torch.full_like(state["classifier.weight"], math.nan)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def seventeen_labels(path):
    config = json.loads((path / "config.json").read_text())
    config["id2label"] = {str(i): config["id2label"][str(i)] for i in range(17)}
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    (path / "config.json").write_text(json.dumps(config))


def half_weights(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def thresholds(value):
    def damage(path):
        (path / "thresholds.json").write_text(
            json.dumps(dict.fromkeys(json.loads((path / "thresholds.json").read_text()), value)))
    return damage


@pytest.mark.parametrize("damage, message", [
    (drop_classifier, "lacks classifier.bias, classifier.weight; they would be random"),
    (thresholds(2.0), r"thresholds must be numbers in \[0, 1\]"),
    (thresholds(-1), r"thresholds must be numbers in \[0, 1\]"),
    (thresholds(math.nan), r"thresholds must be numbers in \[0, 1\]"),
    (seventeen_labels, "cannot load: RuntimeError"),
    (half_weights, "cannot load: SafetensorError"),
    (nan_weights, r"non-finite \(NaN/inf\) weights in classifier.weight"),
], ids=["no-classifier", "threshold-2", "threshold-minus-1", "threshold-nan", "17-labels", "half-safetensors",
        "nan-weights"])
def test_5_6_broken_checkpoint_is_refused_naming_it(tiny_checkpoint, tmp_path, damage, message):
    path = broken_checkpoint(tiny_checkpoint, tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as err:
        Tagger.from_pretrained(path, precision="fp32")
    assert "thresholds.json" in str(err.value) or str(path) in str(err.value)


def test_6_infinite_learning_rate_fails_at_start(root, taxonomy):
    with pytest.raises(ConfigError, match=r"^trainer.lr=inf: must be a positive number"):
        validate(make_cfg(root, "trainer.lr=inf"), taxonomy.ids)


def test_6_non_finite_loss_stops_training_before_any_state(root, papers, taxonomy, tmp_path):
    cfg = make_cfg(root, "trainer.epochs=1", "trainer.batch_size=8", "trainer.log_every=1")
    probs = synthetic_targets(papers, taxonomy)
    probs[3, 0] = np.nan  # a NaN target, like an infinite learning rate, makes the loss NaN
    set_seed(cfg.seed)
    backbone = pipeline.load_model(cfg, taxonomy.ids)
    accelerator = training.make_accelerator(cfg)
    model = accelerator.prepare(backbone.model)
    with pytest.raises(ValueError, match="training diverged: loss nan at optimizer step 1"):
        tok, length = backbone.tokenizer, cfg.model.max_length
        data = training.FitData(labelled_dataset(papers[:-8], probs[:-8], tok, length),
                                labelled_dataset(papers[-8:], probs[-8:], tok, length),
                                (probs[-8:] > 0.5).astype(np.int8), taxonomy.ids)
        training.fit(cfg.trainer, accelerator, model, tok, data, tmp_path / "state", training.Phase.weak(cfg.trainer))
    assert not (tmp_path / "state").exists()


def test_7_kill_as_a_state_is_created_resumes_from_the_last_complete_one(root, papers, taxonomy, tmp_path,
                                                                          monkeypatch):
    # 40 papers / batch 8 = 5 batches an epoch; states at the ends of epochs 1 and 2 (batches 5, 10).
    overrides = ["trainer.epochs=3", "trainer.batch_size=8", "trainer.log_every=1"]
    full = fit(make_cfg(root, *overrides), papers, taxonomy, tmp_path / "full")

    def mkdir_then_die(self, output_dir, **kw):
        if "batch-10" in output_dir:
            Path(output_dir).mkdir(parents=True)  # the kill lands right after the folder appears
            raise Killed
        return save_state(self, output_dir, **kw)

    save_state = Accelerator.save_state
    monkeypatch.setattr(Accelerator, "save_state", mkdir_then_die)
    with pytest.raises(Killed):
        fit(make_cfg(root, *overrides), papers, taxonomy, tmp_path / "killed")
    monkeypatch.undo()
    resumed = fit(make_cfg(root, *overrides, "trainer.resume=auto"), papers, taxonomy, tmp_path / "killed")
    for k, v in weights(full.backbone.model).items():
        torch.testing.assert_close(weights(resumed.backbone.model)[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # The history covers the epochs before the kill too, as metrics.json and loss.png need.
    assert [m["epoch"] for m in resumed.epoch_metrics] == [1, 2, 3]
    assert resumed.steps == full.steps and resumed.epoch_steps == full.epoch_steps
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "killed/state").iterdir()) == ["batch-10", "batch-15"]  # no debris


def test_7_export_clears_what_a_killed_export_left(tiny_checkpoint, taxonomy, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint)
    (tmp_path / ".checkpoint.k1ll3d").mkdir()  # a temp dir of an export killed with SIGKILL
    (tmp_path / ".checkpoint.k1ll3d/model.safetensors").write_bytes(b"half")
    export_checkpoint(model, AutoTokenizer.from_pretrained(tiny_checkpoint, model_max_length=64), tmp_path / "checkpoint",
                      thresholds=dict.fromkeys(taxonomy.ids, 0.5), taxonomy=taxonomy, calibration=CALIBRATION)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.fixture
def published(tiny_checkpoint, tmp_path, taxonomy):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run / "checkpoint")
    card_facts(taxonomy).save(run / "card.json")
    out = tmp_path / "checkpoints"
    (out / "tiny").mkdir(parents=True)
    (out / "tiny/model.safetensors").write_bytes(b"the published weights")
    return run, out


@pytest.mark.slow
def test_8_dry_run_leaves_the_published_checkpoint_alone(published, capsys):
    run, out = published
    run_publish(f"run_dir={run}", "name=tiny", f"out_dir={out}", "push_to_hub=true", "repo_id=me/tiny", "dry_run=true")
    assert (out / "tiny/model.safetensors").read_bytes() == b"the published weights"
    assert sorted(p.name for p in out.iterdir()) == ["tiny"]
    assert "dry run: would upload" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("bad", [["push_to_hub=true"], ["max_mb=-1"], ["name=../x"], ["dry_run=maybe"]])
def test_8_bad_publish_settings_fail_before_touching_anything(published, bad):
    run, out = published
    with pytest.raises(SystemExit, match=r"^error: (repo_id|max_mb|name|dry_run)="):
        run_publish(f"run_dir={run}", "name=tiny", f"out_dir={out}", *bad)
    assert (out / "tiny/model.safetensors").read_bytes() == b"the published weights"


@pytest.mark.slow
def test_10_predict_cli_errors_are_one_line_without_traceback(root, tiny_checkpoint, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", records(2))
    broken = broken_checkpoint(tiny_checkpoint, tmp_path)
    half_weights(broken)
    for args, message in ((["batch_size=0"], "error: batch_size=0: must be a positive integer"),
                          ([f"checkpoint={broken}"], f"error: {broken}: cannot load"),
                          (["output=???"], "error: Missing mandatory value: output")):
        proc = subprocess.run([sys.executable, str(root / "predict.py"), f"input={src}", "output=out.jsonl",
                               f"checkpoint={tiny_checkpoint}", "progress=false", *args],
                              cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "in.jsonl"]


@pytest.mark.slow
def test_10_label_cli_errors_are_one_line_without_traceback(root, tmp_path):
    proc = subprocess.run([sys.executable, str(root / "label.py"), f"hydra.run.dir={tmp_path / 'run'}",
                           f"data.sources.seed.path={tmp_path / 'missing.txt'}"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "error: data.sources.seed.path=" in proc.stderr and "file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_10_failed_predict_run_leaves_no_debris(tagger, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", records(3) + [{"id": "bad"}])
    with pytest.raises(CorpusError, match=":4: missing title"):
        predict_file(tagger, src, tmp_path / "out.jsonl", chunk_size=2, on_error="raise", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_12_empty_input_is_a_warning(tagger, tmp_path, caplog, content):
    (tmp_path / "in.jsonl").write_text(content)
    with caplog.at_level(logging.WARNING):
        stats = predict_file(tagger, tmp_path / "in.jsonl", tmp_path / "out.jsonl", progress=False)
    assert stats.read == 0 and "no records (empty input)" in caplog.text

def test_7_resumed_self_training_run_reports_every_epoch_of_every_round(root, papers, taxonomy, tmp_path,
                                                                       monkeypatch):
    """metrics.json and loss.png are built from `Trained.rounds`: after a kill in round 1 and a resume,
    each round's result still covers its epochs before the kill."""
    # 40 training papers / batch 8 = 5 batches an epoch; each round's states at batches 5 and 10.
    overrides = ["trainer.epochs=2", "trainer.self_training.rounds=1", "trainer.self_training.epochs=2",
                 "trainer.batch_size=8", "trainer.log_every=1"]
    weak = synthetic_targets(papers, taxonomy)
    train_rows = labelled_dataset(papers[:40], weak[:40], minilm_tokenizer(), 64).add_column("hand", [False] * 40)
    data = TrainingData(train_rows, papers[40:48], weak[40:48],
                        Split({"dev/a": np.arange(8)}, {"dev/a": (weak[40:48] > 0.5).astype(np.int8)}), 48, {},
                        vote_names=[], held_out_votes=np.zeros((8, 0, len(taxonomy)), np.int8))

    def train(run_dir, *more):
        cfg = make_cfg(root, *overrides, *more)
        set_seed(cfg.seed)
        backbone = pipeline.load_model(cfg, taxonomy.ids)
        return pipeline.train(cfg, training.make_accelerator(cfg), backbone, data, taxonomy.ids, run_dir)

    full = train(tmp_path / "full")

    def die_in_round_1(self, output_dir, **kw):
        if "round-1" in output_dir and "batch-10" in output_dir:
            raise Killed
        return save_state(self, output_dir, **kw)

    save_state = Accelerator.save_state
    monkeypatch.setattr(Accelerator, "save_state", die_in_round_1)
    with pytest.raises(Killed):
        train(tmp_path / "killed")
    monkeypatch.undo()
    resumed = train(tmp_path / "killed", "trainer.resume=auto")
    assert len(resumed.rounds) == 2
    for got, want in zip(resumed.rounds, full.rounds):
        assert [m["epoch"] for m in got.epoch_metrics] == [1, 2]
        assert got.steps == want.steps and got.epoch_steps == want.epoch_steps and got.seen == want.seen == 80
        np.testing.assert_allclose(got.losses, want.losses, rtol=1e-5)
        assert got.seconds > 0 and got.samples_per_s > 0
    for k, v in weights(full.backbone.model).items():
        torch.testing.assert_close(weights(resumed.backbone.model)[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("damage", ["cut-short", "zeroed"])
def test_13_resume_of_a_damaged_partial_output_redoes_the_damaged_chunks(tagger, tmp_path, monkeypatch, caplog,
                                                                         damage):
    """A disk or copy failure (not a kill) cut the partial output short, or left zeros in it: the resumed
    run keeps only the chunks whose bytes match the journal's digests; it never pads with NUL bytes."""
    src = write_jsonl(tmp_path / "in.jsonl", records(11) + [{"id": "bad"}] + records(8))
    predict_file(tagger, src, tmp_path / "once.jsonl", chunk_size=2, progress=False)
    out = tmp_path / "out.jsonl"
    killed_run(tagger, src, out, monkeypatch, after=7)
    files = OutputFiles(out)
    data = files.partial.read_bytes()
    if damage == "cut-short":  # truncate -s 50%
        files.partial.write_bytes(data[: len(data) // 2])
    else:  # a block of zeros inside the file, the length unchanged
        files.partial.write_bytes(data[:300] + b"\0" * 200 + data[500:])
    with caplog.at_level(logging.WARNING):
        stats = predict_file(tagger, src, out, chunk_size=2, progress=False, resume=True)
    assert f"{files.partial}: cut short or damaged from its chunk" in caplog.text
    assert out.read_bytes() == (tmp_path / "once.jsonl").read_bytes() and b"\0" not in out.read_bytes()
    assert files.rejects.read_bytes() == OutputFiles(tmp_path / "once.jsonl").rejects.read_bytes()
    assert stats.summary() == "read 20 = tagged 19 + rejected 1"


def test_14_second_run_on_the_same_output_is_refused_at_start(tagger, tmp_path, monkeypatch):
    """shard=0/2 and shard=1/2 started together with one output=: the second refuses before writing."""
    from abstract_tagger.common.files import OutputBusy

    src, out = write_jsonl(tmp_path / "in.jsonl", records(8)), tmp_path / "out.jsonl"
    predict_file(tagger, src, tmp_path / "alone.jsonl", chunk_size=2, shard=(0, 2), progress=False)
    scores, refused = tagger.scores, []

    def second_run_starts_meanwhile(texts, **kw):
        if not refused:
            with pytest.raises(OutputBusy, match=rf"^output={out}: another run is writing it") as err:
                predict_file(tagger, src, out, chunk_size=2, shard=(1, 2), progress=False)
            refused.append(err)
        return scores(texts, **kw)

    monkeypatch.setattr(tagger, "scores", second_run_starts_meanwhile)
    predict_file(tagger, src, out, chunk_size=2, shard=(0, 2), progress=False)
    assert refused and out.read_bytes() == (tmp_path / "alone.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.jsonl", "in.jsonl", "out.jsonl"]  # lock gone
    monkeypatch.undo()
    predict_file(tagger, src, out, chunk_size=2, shard=(1, 2), progress=False)  # free once the first is done


@pytest.mark.parametrize("key, value", [
    ("batch_size", -1), ("batch_size", 0), ("num_threads", -2), ("precision", "fp8"), ("backend", "tensorrt"),
    ("recheck_margin", -0.5), ("top_k", -1), ("top_k", 0), ("threshold", 1.5), ("threshold", math.nan),
    ("threshold", -0.1), ("chunk_size", 0), ("max_chars", -5), ("on_error", "ignore"), ("shard", "2/2"),
])
def test_15_api_refuses_what_the_cli_refuses_naming_the_key(root, tiny_checkpoint, tagger, tmp_path, key, value):
    """One check for predict.py's settings and the Python API's arguments."""
    src = write_jsonl(tmp_path / "in.jsonl", records(2))
    with pytest.raises(ConfigError, match=rf"^{key}="):
        validate_predict(predict_cfg(root, f"input={src}", f"output={tmp_path / 'out.jsonl'}", f"{key}={value}"))
    with pytest.raises(ConfigError, match=rf"^{key}="):
        if key in ("batch_size", "num_threads", "precision", "backend", "recheck_margin"):
            Tagger.from_pretrained(tiny_checkpoint, **{key: value})
        elif key in ("top_k", "threshold"):
            tagger.predict(["Speech recognition. We transcribe audio."], **{key: value})
        elif key == "shard":
            predict_file(tagger, src, tmp_path / "out.jsonl", progress=False, shard=(2, 2))
        else:
            predict_file(tagger, src, tmp_path / "out.jsonl", progress=False, **{key: value})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("bare", ["Title. Abstract about speech.", {"title": "T", "abstract": "A speech paper."}])
def test_15_one_text_given_bare_is_refused_not_tagged_character_by_character(tagger, bare):
    with pytest.raises(TypeError, match="expected a list of texts or records, got a single"):
        tagger.predict(bare)
    with pytest.raises(TypeError, match="wrap it in a list"):
        tagger.scores(bare)


def resaved_with_a_longer_header(path):
    """The same tensors, saved again with metadata: every tensor's bytes move to another offset."""
    save_file(load_file(path / "model.safetensors"), path / "model.safetensors",
              metadata={"format": "pt", "note": "re-saved " * 40})


def other_weights_same_layout(path):
    state = load_file(path / "model.safetensors")
    state["classifier.bias"] = state["classifier.bias"] + 1
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def short_position_table(path):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))


def rules_table(value):
    def damage(path):
        from abstract_tagger.data.taxonomy import Taxonomy
        from abstract_tagger.labeling.rule_blend import RuleBlend, rule_functions

        taxonomy = Taxonomy.from_config(OmegaConf.load(Path(os.environ["PROJECT_ROOT"]) / "conf/taxonomy/default.yaml"))
        table = np.full((3 ** len(rule_functions(taxonomy, 1).names), len(taxonomy)), value, dtype=np.float32)
        save_rules(RuleBlend(taxonomy, 1, table, 0.5), path)
    return damage


def thresholds_list(path):
    (path / "thresholds.json").write_text(json.dumps([0.5] * 18))


def corrupt_tokenizer(path):
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordPiece", "vocab": 3}}')


@pytest.mark.parametrize("backend", ["openvino", "onnx", "torch"])
@pytest.mark.parametrize("damage, message", [
    (resaved_with_a_longer_header, "model.onnx: made from another model.safetensors"),
    (other_weights_same_layout, "model.onnx: made from another model.safetensors"),
    (short_position_table, "config.json: max_position_embeddings=16 is below the tokenizer's model_max_length=64"),
    (rules_table(5.0), r"rules.json: the weight and every table value must be probabilities in \[0, 1\]"),
    (rules_table(-0.1), r"rules.json: the weight and every table value must be probabilities in \[0, 1\]"),
    (thresholds_list, "thresholds.json: expected a JSON object, got list"),
    (corrupt_tokenizer, "cannot load"),
], ids=["longer-header", "other-weights", "short-positions", "rules-5", "rules-negative", "thresholds-list",
        "corrupt-tokenizer"])
def test_16_checkpoint_files_that_disagree_are_refused_naming_the_file(tiny_onnx_checkpoint, tmp_path, damage,
                                                                       message, backend):
    path = broken_checkpoint(tiny_onnx_checkpoint, tmp_path)
    damage(path)
    if damage in (resaved_with_a_longer_header, other_weights_same_layout) and backend == "torch":
        Tagger.from_pretrained(path, backend="torch", precision="fp32")  # torch reads the file as it is
        return
    with pytest.raises(CheckpointError, match=message) as err:
        Tagger.from_pretrained(path, backend=backend, precision="fp32")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_17_output_inside_a_checkpoint_is_refused(root, tiny_checkpoint, tagger, tmp_path):
    ckpt = broken_checkpoint(tiny_checkpoint, tmp_path)
    before = (ckpt / "thresholds.json").read_bytes()
    src = write_jsonl(tmp_path / "in.jsonl", records(2))
    for output in (ckpt / "thresholds.json", ckpt / "tags.jsonl"):
        with pytest.raises(ConfigError, match=rf"^output=.*is inside the checkpoint directory {ckpt}"):
            validate_predict(predict_cfg(root, f"input={src}", f"output={output}"))
        with pytest.raises(ConfigError, match="is inside the checkpoint directory"):
            predict_file(tagger, src, output, progress=False)
    assert (ckpt / "thresholds.json").read_bytes() == before and not (ckpt / "tags.jsonl").exists()


@pytest.mark.slow
def test_17_publish_onto_the_runs_own_checkpoint_is_refused(published):
    run, _ = published
    before = (run / "checkpoint/model.safetensors").read_bytes()
    for out_dir, name in ((run, "checkpoint"), (run / "checkpoint", "sub")):
        with pytest.raises(SystemExit, match=r"^error: out_dir=.*the run's own checkpoint"):
            run_publish(f"run_dir={run}", f"name={name}", f"out_dir={out_dir}")
    assert (run / "checkpoint/model.safetensors").read_bytes() == before


def test_17_kill_between_the_renames_never_leaves_the_previous_rejects_beside_the_new_output(tagger, tmp_path,
                                                                                           monkeypatch):
    from abstract_tagger.inference import files as predict_files

    out, files = tmp_path / "out.jsonl", OutputFiles(tmp_path / "out.jsonl")
    predict_file(tagger, write_jsonl(tmp_path / "old.jsonl", records(2) + [{"id": "old-bad"}]), out, progress=False)
    assert "old-bad" not in files.rejects.read_text() and files.rejects.exists()
    replace = os.replace

    def killed_once_the_output_is_renamed(a, b):
        replace(a, b)
        if Path(b) == out:
            raise Killed

    monkeypatch.setattr(predict_files.os, "replace", killed_once_the_output_is_renamed)
    with pytest.raises(Killed):
        predict_file(tagger, write_jsonl(tmp_path / "new.jsonl", records(3) + [{"title": "new bad"}]), out,
                     progress=False)
    assert len(out.read_text().splitlines()) == 3  # the new output ...
    assert not files.rejects.exists()  # ... never beside the old run's rejects


def test_17_rewriting_weak_labels_on_a_full_disk_keeps_the_previous_file(papers, taxonomy, tmp_path, monkeypatch):
    from helpers import weak_labels_on_disk

    from abstract_tagger.labeling import weak_labels as wl

    labels = weak_labels_on_disk(tmp_path / "cache", papers, synthetic_targets(papers, taxonomy), taxonomy.ids)
    monkeypatch.setattr(wl, "to_markdown", lambda report: "# report\n")  # the helper's result has no report
    run = tmp_path / "run"
    labels.write(run)
    good = (run / "weak_labels.jsonl").read_bytes()
    (run / "rejects.jsonl").write_text('{"file": "old", "line": 1, "reason": "a previous run"}\n')
    probs = wl._load_probs

    def disk_full_at_chunk_2(root, i):
        if i == 2:
            raise OSError(28, "No space left on device")
        return probs(root, i)

    monkeypatch.setattr(wl, "_load_probs", disk_full_at_chunk_2)
    with pytest.raises(OSError, match="No space left"):
        labels.write(run)
    assert (run / "weak_labels.jsonl").read_bytes() == good
    assert sorted(p.name for p in run.iterdir()) == ["lf_report.json", "lf_report.md", "weak_labels.jsonl"]


def test_18_resume_with_other_training_settings_is_refused_naming_them(root, papers, taxonomy, tmp_path):
    overrides = ["trainer.epochs=2", "trainer.batch_size=8", "trainer.log_every=1"]
    fit(make_cfg(root, "trainer.epochs=1", *overrides[1:]), papers, taxonomy, tmp_path / "run")
    states = tmp_path / "run/state"
    before = sorted(p.name for p in states.iterdir())
    with pytest.raises(ValueError, match=r"cannot resume from .*batch-5: it was made with other settings: "
                                         r"phase.epochs \(1 -> 2\), phase.lr \(.* -> 0.0005\), seed \(\d+ -> 7\), "
                                         r"trainer.batch_size \(8 -> 4\), .*trainer.epochs \(1 -> 2\), trainer.lr \(0.001 -> 0.0005\); "):
        fit(make_cfg(root, *overrides, "trainer.batch_size=4", "trainer.lr=0.0005", "seed=7", "trainer.resume=auto"),
            papers, taxonomy, tmp_path / "run")
    assert sorted(p.name for p in states.iterdir()) == before
    # The same settings resume (log_every and the like change nothing the weights depend on).
    fit(make_cfg(root, "trainer.epochs=1", *overrides[1:2], "trainer.log_every=2", "trainer.resume=auto"), papers,
        taxonomy, tmp_path / "run")
