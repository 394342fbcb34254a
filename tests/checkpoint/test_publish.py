"""Publishing a run's checkpoint: fp16 weights, same tags, size limit, atomic swap, offline dry-run push."""

import json
import shutil
import socket

import numpy as np
import onnx
import pytest
from helpers import CALIBRATION, TRAIN, card_facts, run_publish
from huggingface_hub import ModelCard
from onnx import numpy_helper
from safetensors import safe_open

from abstract_tagger import Tagger
from abstract_tagger.checkpoint.card import CardFacts, model_card
from abstract_tagger.checkpoint.onnx_export import export_onnx
from abstract_tagger.common.cpu import cpu_has_native_bf16


@pytest.fixture
def run_dir(tiny_checkpoint, tmp_path, taxonomy):
    shutil.copytree(tiny_checkpoint, tmp_path / "run/checkpoint")
    card_facts(taxonomy).save(tmp_path / "run/card.json")  # what training saves beside its checkpoint
    return tmp_path / "run"


@pytest.mark.slow
def test_publish_writes_fp16_weights_that_tag_the_same(run_dir, tmp_path, capsys):
    out = tmp_path / "checkpoints"
    (out / "tiny").mkdir(parents=True)
    (out / "tiny/stale.txt").write_text("from an older publish")
    run_publish(f"run_dir={run_dir}", "name=tiny", f"out_dir={out}")
    dest = out / "tiny"
    assert sorted(p.name for p in out.iterdir()) == ["tiny"]  # no temp or backup directory left
    assert not (dest / "stale.txt").exists()
    with safe_open(dest / "model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} >= {"torch.float16"}
    assert json.loads((dest / "config.json").read_text())["dtype"] == "float32"
    assert (dest / "model.safetensors").stat().st_size < 0.6 * (run_dir / "checkpoint/model.safetensors").stat().st_size
    out = capsys.readouterr().out
    assert "changed tag decisions 0" in out
    for engine in ("openvino", "onnx"):  # 87 seed + 110 recent dev papers
        assert f"ONNX {engine} fp32: same tag set as torch fp32 on 100.0% of 197 dev papers" in out
    # OpenVINO's bf16, auto's pick on CPUs with AMX, is checked where the CPU has bf16; ONNX Runtime has none.
    bf16_rows = {"openvino bf16", "openvino bf16 + fp32 recheck"} if cpu_has_native_bf16() else set()
    assert {line.split(":")[0].removeprefix("ONNX ") for line in out.splitlines() if " bf16" in line} == bf16_rows

    # The ONNX graphs read the fp16 weights from model.safetensors: the int8 weights are all they add.
    assert {"model.onnx", "model_quantized.onnx"} <= {p.name for p in dest.iterdir()}
    assert (dest / "model.onnx").stat().st_size + (dest / "model_quantized.onnx").stat().st_size < 0.5 * (
        dest / "model.safetensors").stat().st_size
    # The card is rendered again from the facts training saved, with the ONNX agreement added.
    card = (dest / "README.md").read_text()
    assert card.startswith(model_card(CardFacts.load(run_dir / "card.json")).rstrip())
    assert ModelCard(card).data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert "| openvino fp32 | 100.0% |" in card and "| onnx fp32 | 100.0% |" in card
    assert ("| openvino bf16 + fp32 recheck | 100.0% |" in card) == cpu_has_native_bf16()
    assert card.count("## ONNX graphs") == 1

    texts = [f"{t}. {a}" for (t, a), _ in TRAIN]
    before = Tagger.from_pretrained(run_dir / "checkpoint", precision="fp32")
    for backend in ("torch", "onnx", "openvino"):
        after = Tagger.from_pretrained(dest, backend=backend, precision="fp32")
        np.testing.assert_allclose(before.scores(texts), after.scores(texts), atol=5e-3)
        assert [r["tags"] for r in after.predict(texts)] == [[tag] for _, tag in TRAIN]


@pytest.mark.slow
def test_publish_refuses_an_onnx_graph_that_tags_differently(run_dir, tmp_path, monkeypatch):
    from abstract_tagger import publish

    def export_a_bad_fp32_graph(checkpoint, calibration):
        written = export_onnx(checkpoint, calibration)
        graph = onnx.load(written["model.onnx"], load_external_data=False)
        bias = next(t for t in graph.graph.initializer if "classifier.bias" in t.name)
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 3.0, bias.name))  # every logit +3
        onnx.save(graph, written["model.onnx"])
        return written

    monkeypatch.setattr(publish, "export_onnx", export_a_bad_fp32_graph)
    with pytest.raises(SystemExit, match=r"^error: ONNX graph\(s\) \['openvino fp32'.*'onnx fp32'.*\] disagree with torch fp32"):
        run_publish(f"run_dir={run_dir}", f"out_dir={tmp_path / 'checkpoints'}")
    assert list((tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("bad, key", [("max_disagreement=2", "max_disagreement"),
                                      ("dev_sets.recent.papers=data/no_such.jsonl", "dev_sets.recent.papers")])
def test_bad_agreement_settings_fail_before_any_work(run_dir, tmp_path, bad, key):
    with pytest.raises(SystemExit, match=f"^error: {key}="):
        run_publish(f"run_dir={run_dir}", f"out_dir={tmp_path / 'checkpoints'}", bad)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_publish_refuses_a_checkpoint_over_the_size_limit(run_dir, tmp_path):
    with pytest.raises(SystemExit, match="^error: .*over max_mb=0.1"):
        run_publish(f"run_dir={run_dir}", f"out_dir={tmp_path / 'checkpoints'}", "max_mb=0.1")
    assert list((tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.slow
def test_publish_refuses_pickle_weights(run_dir, tmp_path):
    (run_dir / "checkpoint/model.safetensors").rename(run_dir / "checkpoint/pytorch_model.bin")
    with pytest.raises(SystemExit, match="^error: .*only pickle weights"):
        run_publish(f"run_dir={run_dir}", f"out_dir={tmp_path / 'checkpoints'}")


@pytest.mark.slow
def test_push_dry_run_lists_files_and_touches_no_network(run_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the dry run reached for the network")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    monkeypatch.setattr(socket, "socket", no_network)
    run_publish(f"run_dir={run_dir}", f"out_dir={tmp_path / 'checkpoints'}", "push_to_hub=true", "repo_id=me/tagger",
            "dry_run=true")
    out = capsys.readouterr().out
    assert "dry run: would upload" in out and "https://huggingface.co/me/tagger" in out
    for name in ("model.safetensors", "model.onnx", "model_quantized.onnx", "config.json", "tokenizer.json",
                 "thresholds.json", "taxonomy.yaml"):
        assert f"  {name}  " in out


@pytest.mark.slow
def test_push_needs_a_repo_id(run_dir, tmp_path):
    with pytest.raises(SystemExit, match="repo_id"):
        run_publish(f"run_dir={run_dir}", f"out_dir={tmp_path / 'checkpoints'}", "push_to_hub=true", "dry_run=true")


@pytest.mark.slow
def test_publish_py_is_a_hydra_entry_point(root, run_dir, tmp_path):
    import subprocess
    import sys

    def publish_py(*args):
        return subprocess.run([sys.executable, str(root / "publish.py"), *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)

    out = tmp_path / "checkpoints"
    proc = publish_py(f"run_dir={run_dir}", "name=tiny", f"out_dir={out}", "dry_run=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"dry run: {out / 'tiny'} left as it is" in proc.stdout and not out.exists()
    missing = publish_py()
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "run_dir" in missing.stderr
    assert "dev_sets" in publish_py("--help").stdout


def test_a_run_without_card_facts_is_refused_before_any_work(run_dir, tmp_path):
    (run_dir / "card.json").unlink()
    with pytest.raises(SystemExit, match=r"^error: .*card.json: not found; .* retrain"):
        run_publish(f"run_dir={run_dir}", f"out_dir={tmp_path / 'checkpoints'}")
    assert not (tmp_path / "checkpoints").exists()
