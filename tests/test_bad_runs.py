"""Hostile settings, checkpoints, kills and resumes: a one-line error naming the setting, file or line
(or a warning), never garbage output, mixed rows or debris. Numbers refer to the cases of the issue "No
silent loss, no garbage out"."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from abstract_tagger import Tagger
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

