"""Publishing a run's checkpoint: fp16 weights, same tags, size limit, atomic swap, offline dry-run push."""

import json
import shutil
import socket

import numpy as np
import pytest
from safetensors import safe_open
from helpers import TRAIN

from abstract_tagger import Tagger
from abstract_tagger.publish import main


@pytest.fixture
def run_dir(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path / "run/checkpoint")
    return tmp_path / "run"


def test_publish_writes_fp16_weights_that_tag_the_same(run_dir, tmp_path, capsys):
    out = tmp_path / "checkpoints"
    (out / "tiny").mkdir(parents=True)
    (out / "tiny/stale.txt").write_text("from an older publish")
    main([str(run_dir), "name=tiny", f"out_dir={out}"])
    dest = out / "tiny"
    assert sorted(p.name for p in out.iterdir()) == ["tiny"]  # no temp or backup directory left
    assert not (dest / "stale.txt").exists()
    with safe_open(dest / "model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} >= {"torch.float16"}
    assert json.loads((dest / "config.json").read_text())["dtype"] == "float32"
    assert (dest / "model.safetensors").stat().st_size < 0.6 * (run_dir / "checkpoint/model.safetensors").stat().st_size
    assert "changed tag decisions 0" in capsys.readouterr().out

    texts = [f"{t}. {a}" for (t, a), _ in TRAIN]
    before = Tagger.from_pretrained(run_dir / "checkpoint", precision="fp32")
    after = Tagger.from_pretrained(dest, precision="fp32")
    np.testing.assert_allclose(before.scores(texts), after.scores(texts), atol=5e-3)
    assert after.predict(texts) and [r["tags"] for r in after.predict(texts)] == [[tag] for _, tag in TRAIN]


def test_publish_refuses_a_checkpoint_over_the_size_limit(run_dir, tmp_path):
    with pytest.raises(SystemExit, match="^error: .*over max_mb=0.1"):
        main([str(run_dir), f"out_dir={tmp_path / 'checkpoints'}", "max_mb=0.1"])
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_publish_refuses_pickle_weights(run_dir, tmp_path):
    (run_dir / "checkpoint/model.safetensors").rename(run_dir / "checkpoint/pytorch_model.bin")
    with pytest.raises(SystemExit, match="^error: .*only pickle weights"):
        main([str(run_dir), f"out_dir={tmp_path / 'checkpoints'}"])


def test_push_dry_run_lists_files_and_touches_no_network(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the dry run reached for the network")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    monkeypatch.setattr(socket, "socket", no_network)
    main([str(run_dir), f"out_dir={tmp_path / 'checkpoints'}", "push_to_hub=true", "repo_id=me/tagger",
          "dry_run=true"])
    out = capsys.readouterr().out
    assert "dry run: would upload" in out and "https://huggingface.co/me/tagger" in out
    for name in ("model.safetensors", "config.json", "tokenizer.json", "thresholds.json", "taxonomy.yaml"):
        assert f"  {name}  " in out


def test_push_needs_a_repo_id(run_dir, tmp_path):
    with pytest.raises(SystemExit, match="repo_id"):
        main([str(run_dir), f"out_dir={tmp_path / 'checkpoints'}", "push_to_hub=true", "dry_run=true"])
