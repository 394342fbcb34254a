"""train.py end to end as a user runs it: single process, 2-process DDP through torchrun, a multirun
sweep, --help and start-up config errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

SMALL = ["experiment=smoke"]


def train(root, *args, cwd=None, launcher=(sys.executable,), timeout=180):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, str(root / "train.py"), *args], cwd=cwd or root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def check_checkpoint(ckpt, taxonomy):
    model = AutoModelForSequenceClassification.from_pretrained(ckpt)
    assert model.config.problem_type == "multi_label_classification"
    assert model.config.num_labels == 18
    assert [model.config.id2label[i] for i in range(18)] == taxonomy.ids
    thresholds = json.loads((ckpt / "thresholds.json").read_text())
    assert list(thresholds) == taxonomy.ids and all(0 < v < 1 for v in thresholds.values())
    text = "Quantizing large language models. We prune and distil transformers for faster inference."
    scores = pipeline("text-classification", model=str(ckpt), top_k=None)([text])[0]
    by_label = {s["label"]: s["score"] for s in scores}
    assert set(by_label) == set(taxonomy.ids)
    # pipeline applies a sigmoid per tag (multi-label), not a softmax over tags.
    tok = AutoTokenizer.from_pretrained(ckpt)
    with torch.no_grad():
        expected = torch.sigmoid(model(**tok(text, return_tensors="pt")).logits)[0].numpy()
    np.testing.assert_allclose([by_label[t] for t in taxonomy.ids], expected, rtol=1e-4, atol=1e-5)
    tagged = [t for t in taxonomy.ids if by_label[t] >= thresholds[t]]
    assert tagged == [t for t, p in zip(taxonomy.ids, expected) if p >= thresholds[t]]
    assert "multi-label" in (ckpt / "README.md").read_text()


def test_train_tiny_default_corpus(root, taxonomy, tmp_path):
    """The default corpus and gold sets end to end (rule functions only, to keep the test short)."""
    run_dir = tmp_path / "run"
    proc = train(root, "model=tiny", "logger=none", "labeling=rules", f"hydra.run.dir={run_dir}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_checkpoint(run_dir / "checkpoint", taxonomy)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    held_out = metrics["corpus"]["held_out"]
    assert held_out == {"dev/seed": 87, "dev/recent": 110, "test/recent": 220}
    assert metrics["corpus"]["train"] + sum(held_out.values()) == 6437  # 6438 read, one duplicate title
    assert set(metrics["scores"]) == {"dev/seed", "dev/recent", "test/recent", "dev"}
    assert set(metrics["scores"]["dev"]) == {"weak", "model_flat", "model", "shipped"}
    assert metrics["threshold_policy"] in ("flat", "guarded", "tuned")
    assert len(metrics["epochs"]) == 2
    card = (run_dir / "checkpoint/README.md").read_text()
    assert "base_model:" in card and "model-index:" in card and "test/recent" in card
    for name in ("per_tag_f1.png", "loss.png", "review.jsonl", "weak_labels.jsonl", "lf_report.md"):
        assert (run_dir / name).stat().st_size > 0, name
    review = [json.loads(line) for line in (run_dir / "review.jsonl").read_text().splitlines()]
    gaps = [r["disagreement"] for r in review]
    assert gaps == sorted(gaps, reverse=True) and review[0]["differences"]


def test_torchrun_two_processes_one_run_dir(root, taxonomy, tmp_path):
    # No hydra.run.dir: both ranks must still agree on one timestamped directory.
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    proc = train(root, *SMALL, cwd=tmp_path, launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs/smoke").iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".checkpoint")) == []
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    check_checkpoint(run_dir / "checkpoint", taxonomy)
    # The main process logs the export once.
    assert proc.stderr.count("checkpoint: ") + proc.stdout.count("checkpoint: ") == 1


def test_multirun_sweep_one_dir_per_run(root, tmp_path):
    proc = train(root, "-m", *SMALL, "trainer.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for n, lr in (("0", 0.001), ("1", 0.003)):
        assert (tmp_path / n / "checkpoint/model.safetensors").is_file()
        assert f"lr: {lr}" in (tmp_path / n / ".hydra/config.yaml").read_text()


def test_help_lists_config_groups(root):
    proc = train(root, "--help")
    assert proc.returncode == 0
    for group in ("data:", "taxonomy:", "labeling:", "model: minilm, scibert, tiny", "trainer:", "logger:",
                  "experiment:"):
        assert group in proc.stdout, group


@pytest.mark.parametrize("override, key", [("trainer.lr=0", "trainer.lr"),
                                           ("trainer.batch_size=0", "trainer.batch_size")])
def test_bad_value_fails_at_start_naming_the_key(root, tmp_path, override, key):
    proc = train(root, *SMALL, override, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert f"error: {key}=" in proc.stderr
    assert not (tmp_path / "checkpoint").exists()
