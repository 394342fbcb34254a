"""Tagger on a tiny BERT trained a few steps here, plus the published checkpoint with plain transformers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from abstract_tagger import Tagger
from abstract_tagger.corpus import Paper
from abstract_tagger.prediction import CheckpointError, check_checkpoint

from helpers import SPEECH, TRAIN

PUBLISHED = Path(__file__).resolve().parents[1] / "checkpoints/abstract-tagger-minilm"


@pytest.fixture(scope="session")
def tagger(tiny_checkpoint) -> Tagger:
    return Tagger.from_pretrained(tiny_checkpoint, precision="fp32", batch_size=2)


def test_predict_accepts_strings_records_and_papers(tagger):
    title, abstract = SPEECH
    results = tagger.predict([
        f"{title}. {abstract}",
        {"title": title, "abstract": abstract},
        Paper(id="p1", title=title, abstract=abstract),
    ])
    assert [r["tags"] for r in results] == [["speech-audio"]] * 3
    assert list(results[0]["scores"]) == tagger.labels
    assert results[0]["scores"] == pytest.approx(results[2]["scores"], abs=1e-6)


def test_each_trained_abstract_gets_its_tag_in_input_order(tagger):
    results = tagger.predict([{"title": t, "abstract": a} for (t, a), _ in TRAIN])
    assert [r["tags"] for r in results] == [[tag] for _, tag in TRAIN]


def test_length_sorted_batches_give_the_scores_of_one_at_a_time(tagger):
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN] + ["Speech.", "A " + "long vision paper " * 20]
    batched = tagger.scores(texts)
    single = np.concatenate([tagger.scores([t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_top_k_and_threshold_overrides(tagger):
    scores = tagger.scores([f"{t}. {a}" for (t, a), _ in TRAIN])
    everything = tagger.decide(scores, threshold=0.0)
    assert all(len(tags) == len(tagger.labels) for tags in everything)
    assert everything[0][0] == "speech-audio"
    assert tagger.decide(scores, threshold=0.0, top_k=2) == [tags[:2] for tags in everything]
    assert tagger.decide(scores, threshold=1.01) == [[], [], []]


def test_record_without_abstract_is_an_error(tagger):
    with pytest.raises(ValueError, match="no abstract"):
        tagger.predict([{"id": "x", "title": "only a title"}])


def test_bf16_and_fp32_agree_on_tags(tiny_checkpoint):
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN]
    fp32 = Tagger.from_pretrained(tiny_checkpoint, precision="fp32")
    bf16 = Tagger.from_pretrained(tiny_checkpoint, precision="bf16", recheck_margin=0)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype is None
    a, b = fp32.scores(texts), bf16.scores(texts)
    assert 0 < np.abs(a - b).max() < 0.05
    assert fp32.decide(a) == bf16.decide(b)


def test_bf16_rescores_rows_near_a_threshold_in_fp32(tiny_checkpoint):
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN]
    fp32 = Tagger.from_pretrained(tiny_checkpoint, precision="fp32").scores(texts)
    bf16 = Tagger.from_pretrained(tiny_checkpoint, precision="bf16", recheck_margin=0.02)
    thresholds = dict(zip(bf16.labels, bf16.thresholds.tolist()))
    raw = Tagger(bf16.model, bf16.tokenizer, thresholds, precision="bf16", recheck_margin=0).scores(texts)
    everything = Tagger(bf16.model, bf16.tokenizer, thresholds, precision="bf16", recheck_margin=1.0)
    near = (np.abs(raw - 0.5) < 0.02).any(axis=1)
    rescored = bf16.scores(texts, threshold=0.5)
    np.testing.assert_array_equal(rescored[near], fp32[near])
    np.testing.assert_array_equal(rescored[~near], raw[~near])
    np.testing.assert_array_equal(everything.scores(texts), fp32)


@pytest.mark.parametrize("remove", ["config.json", "tokenizer.json", "thresholds.json", "model.safetensors"])
def test_incomplete_checkpoint_names_the_missing_file(tiny_checkpoint, tmp_path, remove):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (broken / remove).unlink()
    with pytest.raises(CheckpointError, match=rf"missing {remove.replace('.', '[.]')}"):
        Tagger.from_pretrained(broken)


def test_pickle_only_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights .*pytorch_model.bin"):
        check_checkpoint(broken)


@pytest.mark.slow
def test_published_checkpoint_tags_with_plain_pipeline():
    from transformers import pipeline

    thresholds = json.loads((PUBLISHED / "thresholds.json").read_text())
    classify = pipeline("text-classification", model=str(PUBLISHED), top_k=None, truncation=True)
    text = f"{SPEECH[0]}. {SPEECH[1]}"
    scores = {s["label"]: s["score"] for s in classify([text])[0]}
    assert set(scores) == set(thresholds)
    assert max(scores, key=scores.get) == "speech-audio"
    assert scores["speech-audio"] >= thresholds["speech-audio"]
    assert Tagger.from_pretrained(PUBLISHED).predict([text])[0]["tags"][0] == "speech-audio"


@pytest.mark.slow
def test_published_checkpoint_reproduces_its_model_card_on_gold_dev(root, taxonomy, tmp_path):
    """predict.py on the seed dump, scored on gold dev, gives the card's shipped-thresholds row."""
    from abstract_tagger.corpus import read_gold
    from abstract_tagger.thresholds import score

    shipped_row = "model, shipped thresholds (tuned on all of dev: in-sample)"

    out = tmp_path / "seed.jsonl"
    subprocess.run([sys.executable, str(root / "predict.py"), f"input={root / 'data/hf_papers_seed.txt'}",
                    f"output={out}", f"checkpoint={PUBLISHED}", "progress=false"], check=True, cwd=tmp_path)
    gold = read_gold(root / "data/gold_dev.jsonl", taxonomy.ids)
    rows = {r["id"]: r["tags"] for r in map(json.loads, out.read_text().splitlines()) if r["id"] in gold.tags}
    assert len(rows) == len(gold)
    pred = np.array([[t in rows[pid] for t in taxonomy.ids] for pid in gold.tags])
    got = score(pred, gold.labels(taxonomy.ids), taxonomy.ids)
    card = (PUBLISHED / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith(f"| {shipped_row} |"))
    micro, macro = (float(x) for x in row.strip("|").split("|")[1:3])
    assert got.micro_f1 == pytest.approx(micro, abs=0.01)
    assert got.macro_f1 == pytest.approx(macro, abs=0.01)
