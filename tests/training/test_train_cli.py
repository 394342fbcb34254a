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


# Every test here launches train.py (a process, often several).
pytestmark = pytest.mark.slow


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
    for name in ("per_tag_f1.png", "loss.png", "review.jsonl", "weak_labels.jsonl", "lf_report.md", "card.json"):
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


def test_optuna_search_space_names_existing_settings_and_a_dev_metric(root):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from abstract_tagger.common.config import register_resolvers
    from abstract_tagger.pipeline import check_optimized_metric

    register_resolvers()
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=minilm", "hparams_search=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key  # a typo would sweep nothing
    assert cfg.optimized_metric.startswith("dev/")
    check_optimized_metric(cfg)


def test_optuna_sweep_runs_two_trials_and_reports_the_best(root, tmp_path):
    from abstract_tagger.data.corpus import read_seed_dump

    # Hand labels for seed papers outside gold_dev, so the search's clean-phase trials have some.
    dev_ids = {json.loads(line)["id"] for line in (root / "data/gold_dev.jsonl").open()}
    hand = [p for p in read_seed_dump(root / "data/hf_papers_seed.txt") if p.id not in dev_ids][:20]
    (tmp_path / "hand.jsonl").write_text("".join(
        json.dumps({"id": p.id, "title": p.title, "tags": [("nlp", "computer-vision")[i % 2]]}) + "\n"
        for i, p in enumerate(hand)))
    proc = train(root, *SMALL, "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                 f"data.gold_train={tmp_path / 'hand.jsonl'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import yaml

    result = yaml.safe_load((tmp_path / "sweep/optimization_results.yaml").read_text())
    values = [json.loads((tmp_path / "sweep" / n / "metrics.json").read_text())["scores"]["dev"]["shipped"]
              for n in ("0", "1")]
    assert result["best_value"] == pytest.approx(max((v["micro_f1"] + v["macro_f1"]) / 2 for v in values))
    assert set(result["best_params"]) == {"trainer.lr", "trainer.head_lr", "trainer.epochs", "trainer.hand_weight",
                                          "trainer.clean_phase.epochs"}
