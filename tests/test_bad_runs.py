"""Hostile settings, checkpoints, kills and resumes: a one-line error naming the setting, file or line
(or a warning), never garbage output, mixed rows or debris. Numbers refer to the cases of the issue "No
silent loss, no garbage out"."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from accelerate.utils import set_seed
from test_predict_cli import Killed
from test_training import fit, make_cfg, papers, synthetic_targets, weights  # noqa: F401  (module fixture)

from abstract_tagger import Tagger, pipeline, training
from abstract_tagger.checkpoint import export_checkpoint
from abstract_tagger.prediction import CheckpointError

def broken_checkpoint(tiny_checkpoint, tmp_path):  # noqa: F811
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    return path


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
def test_5_6_broken_checkpoint_is_refused_naming_it(tiny_checkpoint, tmp_path, damage, message):  # noqa: F811
    path = broken_checkpoint(tiny_checkpoint, tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as err:
        Tagger.from_pretrained(path, precision="fp32")
    assert "thresholds.json" in str(err.value) or str(path) in str(err.value)


def test_6_non_finite_loss_stops_training_before_any_state(root, papers, taxonomy, tmp_path):  # noqa: F811
    cfg = make_cfg(root, "trainer.epochs=1", "trainer.batch_size=8", "trainer.log_every=1")
    probs = synthetic_targets(papers, taxonomy)
    probs[3, 0] = np.nan  # a NaN target, like an infinite learning rate, makes the loss NaN
    set_seed(cfg.seed)
    backbone = pipeline.load_model(cfg, taxonomy.ids)
    accelerator = training.make_accelerator(cfg)
    model = accelerator.prepare(backbone.model)
    with pytest.raises(ValueError, match="training diverged: loss nan at optimizer step 1"):
        training.fit(cfg.trainer, accelerator, model, backbone.tokenizer, cfg.model.max_length, papers[:-8],
                     probs[:-8], papers[-8:], (probs[-8:] > 0.5).astype(np.int8), taxonomy.ids, tmp_path / "state",
                     cfg.trainer.epochs)
    assert not (tmp_path / "state").exists()


def test_7_kill_as_a_state_is_created_resumes_from_the_last_complete_one(root, papers, taxonomy, tmp_path,  # noqa: F811
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


def test_7_export_clears_what_a_killed_export_left(tiny_checkpoint, taxonomy, tmp_path):  # noqa: F811
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint)
    (tmp_path / ".checkpoint.k1ll3d").mkdir()  # a temp dir of an export killed with SIGKILL
    (tmp_path / ".checkpoint.k1ll3d/model.safetensors").write_bytes(b"half")
    export_checkpoint(model, AutoTokenizer.from_pretrained(tiny_checkpoint), tmp_path / "checkpoint",
                      thresholds=dict.fromkeys(taxonomy.ids, 0.5), taxonomy=taxonomy, max_length=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]



def test_7_resumed_self_training_run_reports_every_epoch_of_every_round(root, papers, taxonomy, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    """metrics.json and loss.png are built from `Trained.rounds`: after a kill in round 1 and a resume,
    each round's result still covers its epochs before the kill."""
    # 40 training papers / batch 8 = 5 batches an epoch; each round's states at batches 5 and 10.
    overrides = ["trainer.epochs=2", "trainer.self_training.rounds=1", "trainer.self_training.epochs=2",
                 "trainer.batch_size=8", "trainer.log_every=1"]
    weak = synthetic_targets(papers, taxonomy)
    split = pipeline.Split(np.arange(40), {"dev/a": np.arange(40, 48)}, {"dev/a": (weak[40:] > 0.5).astype(np.int8)})

    def train(run_dir, *more):
        cfg = make_cfg(root, *overrides, *more)
        set_seed(cfg.seed)
        backbone = pipeline.load_model(cfg, taxonomy.ids)
        return pipeline.train(cfg, training.make_accelerator(cfg), backbone, papers, split, weak[:40],
                              np.zeros(40, dtype=bool), weak, taxonomy.ids, run_dir)

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
