"""Training throughput of train.py's Accelerate loop vs Hugging Face `Trainer`, same model, data,
batch size, max length and precision, measured in one process, alternating runs.

    python bench/train_throughput.py                       # bundled MiniLM, 192 papers, 2 rounds
    python bench/train_throughput.py --model tiny --papers 512

Prints samples/s of each and the ratio (ours / Trainer). Both time only their training loop
(Trainer: its reported train_samples_per_second; ours: time inside the training batches).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments  # noqa: E402

from abstract_tagger.common.cpu import cpu_description  # noqa: E402
from abstract_tagger.data.corpus import read_corpus  # noqa: E402
from abstract_tagger.data.taxonomy import Taxonomy  # noqa: E402
from abstract_tagger.training import loop as training  # noqa: E402
from abstract_tagger.training.backbone import load_backbone  # noqa: E402
from abstract_tagger.training.data import papers_dataset  # noqa: E402
from train_config import compose_train  # noqa: E402


def ours(cfg, backbone, data, tag_ids, workdir: Path) -> float:
    accelerator = training.make_accelerator(cfg)
    model = accelerator.prepare(backbone.model)
    dev = data.select(range(8))
    fit_data = training.FitData(data, dev, np.zeros((8, len(tag_ids)), np.int8), tag_ids)
    result = training.fit(cfg.trainer, accelerator, model, backbone.tokenizer, fit_data, workdir,
                          training.Phase.weak(cfg.trainer))
    return result.samples_per_s


def hf_trainer(cfg, backbone, data, workdir: Path, precision: str) -> float:
    t = cfg.trainer
    args = TrainingArguments(
        output_dir=str(workdir), per_device_train_batch_size=t.batch_size, num_train_epochs=t.epochs,
        # transformers 5: a float warmup_steps < 1 is a ratio of the total steps.
        learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_ratio, max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16", fp16=precision == "fp16", save_strategy="no", eval_strategy="no",
        use_cpu=not torch.cuda.is_available(), report_to=[], logging_steps=t.log_every, disable_tqdm=True,
        seed=cfg.seed, dataloader_num_workers=0,
    )
    trainer = Trainer(model=backbone.model, args=args, train_dataset=data,
                      data_collator=DataCollatorWithPadding(backbone.tokenizer))
    return trainer.train().metrics["train_samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="conf/model option (default: minilm)")
    parser.add_argument("--papers", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=2, help="alternating ours/Trainer runs of each")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.batch_size=32")
    args = parser.parse_args()

    cfg = compose_train([f"model={args.model}", "logger=none", "trainer.epochs=1", "trainer.head_lr=null",
                         *args.overrides])
    tag_ids = Taxonomy.from_config(cfg.taxonomy).ids
    sources = {k: dict(v) for k, v in cfg.data.sources.items()}
    papers = [p for _, p in zip(range(args.papers), read_corpus(sources, max_chars=cfg.data.max_chars))]
    # Throughput does not depend on label values; fixed random soft targets keep both runs identical.
    targets = np.random.default_rng(0).random((len(papers), len(tag_ids))).astype(np.float32)
    precision = training.resolve_precision(cfg.trainer.precision)

    runs: dict[str, list[float]] = {"ours": [], "trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            # A fresh model each run (same seed), so neither starts from the other's weights.
            for name in runs:
                torch.manual_seed(cfg.seed)
                backbone = load_backbone(cfg.model, tag_ids)
                data = papers_dataset(papers, backbone.tokenizer, cfg.model.max_length, targets)
                workdir = Path(tmp) / f"{name}{r}"
                runs[name].append(ours(cfg, backbone, data, tag_ids, workdir) if name == "ours"
                                  else hf_trainer(cfg, backbone, data, workdir, precision))
            print(f"round {r + 1}: ours {runs['ours'][-1]:.2f} samples/s, Trainer {runs['trainer'][-1]:.2f} samples/s",
                  file=sys.stderr)
    ours_sps, hf_sps = statistics.median(runs["ours"]), statistics.median(runs["trainer"])
    print(f"CPU: {cpu_description()}; GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"model={args.model} papers={len(papers)} batch_size={cfg.trainer.batch_size} "
          f"max_length={cfg.model.max_length} precision={precision.replace('no', 'fp32')} rounds={args.rounds}")
    print(f"train.py loop: {ours_sps:.2f} samples/s (median)")
    print(f"HF Trainer:    {hf_sps:.2f} samples/s (median)")
    print(f"ratio (ours / Trainer): {ours_sps / hf_sps:.2f}x")


if __name__ == "__main__":
    main()
