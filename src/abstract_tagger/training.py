"""Fine-tuning on weak labels with Accelerate, and the whole training run around it.

    run(cfg)   weak labels -> split (gold-dev papers held out) -> fit -> dev metrics -> thresholds
               -> exported checkpoint -> review.jsonl, charts, tracking
    fit(...)   the training loop alone: papers + soft targets in, fine-tuned model out

The same code runs on CPU, one GPU, `torchrun --nproc_per_node N train.py` and `accelerate launch
train.py`: Accelerate places the model, shards batches, syncs gradients and casts precision.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, set_seed
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding, get_scheduler

from abstract_tagger import thresholds as thr
from abstract_tagger import tracking
from abstract_tagger.checkpoint import export_checkpoint, model_card
from abstract_tagger.config_checks import validate
from abstract_tagger.corpus import Paper, read_gold
from abstract_tagger.model import Backbone, load_backbone
from abstract_tagger.taxonomy import Taxonomy

log = logging.getLogger(__name__)

STATE_DIR = "state"
# The model card row that predict.py reproduces on gold dev with the checkpoint's thresholds.
SHIPPED_ROW = "model, shipped thresholds (tuned on all of dev: in-sample)"
# Head parameters (fresh classifier, and the CLS pooler that sentence-embedding models never trained)
# get trainer.head_lr.
HEAD_PARAMS = ("classifier.", "pooler.")
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")


def resolve_precision(precision: str) -> str:
    """`auto`: bf16 where the hardware runs it fast (CUDA with bf16, CPUs with AMX or AVX512-BF16)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "no"


def make_accelerator(cfg: DictConfig) -> Accelerator:
    return Accelerator(
        # Accelerate only runs multi-process on CPU (gloo) when told it is on CPU.
        cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available(),
        mixed_precision=resolve_precision(cfg.trainer.precision),
        gradient_accumulation_steps=cfg.trainer.grad_accum,
        log_with=cfg.logger.backend,
        # Shuffling seeded by (seed, epoch), so a resumed run sees the batches the killed run would have.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


class _Encoded(torch.utils.data.Dataset):
    def __init__(self, encodings: dict[str, list], labels: np.ndarray | None):
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.encodings["input_ids"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i].tolist()
        return item


def encode(tokenizer, papers: Sequence[Paper], max_length: int, labels: np.ndarray | None = None) -> _Encoded:
    return _Encoded(dict(tokenizer([p.text for p in papers], truncation=True, max_length=max_length)), labels)


def _loader(dataset: _Encoded, tokenizer, batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=DataCollatorWithPadding(tokenizer), generator=torch.Generator() if shuffle else None)


@torch.no_grad()
def predict_probs(accelerator: Accelerator, model, loader: DataLoader) -> np.ndarray:
    """Sigmoid scores for every example of a prepared (unshuffled) loader, gathered from all ranks."""
    model.eval()
    out = []
    for batch in loader:
        batch.pop("labels", None)
        logits = model(**batch).logits
        out.append(accelerator.gather_for_metrics(torch.sigmoid(logits.float())).cpu())
    model.train()
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.num_labels), np.float32)


def _optimizer(model, lr: float, head_lr: float | None, weight_decay: float) -> torch.optim.Optimizer:
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            head = any(h in name for h in HEAD_PARAMS)
            decay = not any(n in name for n in NO_DECAY)
            groups.setdefault((head, decay), []).append(p)
    return torch.optim.AdamW([
        {"params": ps, "lr": (head_lr or lr) if head else lr, "weight_decay": weight_decay if decay else 0.0}
        for (head, decay), ps in groups.items()
    ], fused=True)  # one kernel per step on CPU and CUDA (what Trainer's default adamw_torch_fused does)


def _pos_weight(spec, tag_ids: list[str], probs: np.ndarray, cap: float) -> torch.Tensor | None:
    if spec is None:
        return None
    if spec == "auto":
        # negatives/positives in expectation under the soft targets, capped so rare tags do not explode.
        pos = probs.sum(0)
        return torch.tensor(np.clip((len(probs) - pos) / np.maximum(pos, 1e-6), 1.0, cap), dtype=torch.float32)
    return torch.tensor([float(spec.get(t, 1.0)) for t in tag_ids], dtype=torch.float32)


def _latest_state(state_root: Path) -> Path | None:
    states = sorted(state_root.glob("batch-*"), key=lambda p: int(p.name.split("-")[1]))
    return states[-1] if states else None


@dataclass
class FitResult:
    backbone: Backbone
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    epoch_steps: list[int] = field(default_factory=list)
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # in training batches; dev scoring and state saves at epoch ends excluded
    samples_per_s: float = 0.0


def fit(
    cfg: DictConfig,
    accelerator: Accelerator,
    train_papers: Sequence[Paper],
    train_probs: np.ndarray,
    dev_papers: Sequence[Paper],
    dev_gold: np.ndarray,
    tag_ids: list[str],
    run_dir: Path,
) -> FitResult:
    """Fine-tune on soft targets; score dev each epoch. States go to `run_dir/state` so a killed run
    continues with trainer.resume=auto. Returns the trained (still prepared) model's backbone."""
    t = cfg.trainer
    set_seed(cfg.seed)
    backbone = load_backbone(cfg.model, tag_ids)
    # trainer.lr / head_lr interpolate model.*, so the fallback's own settings take effect here,
    # while explicit trainer overrides still win.
    for key, value in backbone.settings.items():
        cfg.model[key] = value
    model, tokenizer = backbone.model, backbone.tokenizer
    max_length = cfg.model.max_length

    train_loader = _loader(encode(tokenizer, train_papers, max_length, train_probs.astype(np.float32)),
                           tokenizer, t.batch_size, True, t.num_workers)
    dev_loader = _loader(encode(tokenizer, dev_papers, max_length), tokenizer, t.eval_batch_size, False,
                         t.num_workers)
    optimizer = _optimizer(model, t.lr, t.head_lr, t.weight_decay)
    batches_per_epoch = math.ceil(len(train_papers) / (t.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum)
    total_steps = steps_per_epoch * t.epochs

    def optimizer_steps(batches: int) -> int:
        """Optimizer steps after `batches` batches; every epoch ends with a step (accumulation flushes)."""
        epochs, rest = divmod(batches, batches_per_epoch)
        return epochs * steps_per_epoch + math.ceil(rest / t.grad_accum)

    # Accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler("linear", optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total_steps) * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    model, optimizer, train_loader, dev_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, dev_loader, scheduler)
    pos_weight = _pos_weight(t.pos_weight, tag_ids, train_probs, t.pos_weight_cap)
    loss_fn = torch.nn.BCEWithLogitsLoss(
        pos_weight=pos_weight.to(accelerator.device) if pos_weight is not None else None)

    state_root = run_dir / STATE_DIR
    done_batches = 0
    resume_from = _latest_state(state_root) if t.resume == "auto" else (Path(t.resume) if t.resume else None)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        done_batches = int(resume_from.name.split("-")[1])
        accelerator.print(f"resumed from {resume_from} (batch {done_batches} of {batches_per_epoch * t.epochs})")
    elif t.resume == "auto":
        accelerator.print(f"trainer.resume=auto: no state under {state_root}, starting fresh")

    def save_state() -> None:
        accelerator.save_state(str(state_root / f"batch-{done_batches}"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for old in sorted(state_root.glob("batch-*"), key=lambda p: int(p.name.split("-")[1]))[:-t.keep_states]:
                shutil.rmtree(old)

    result = FitResult(backbone)
    global_batch = t.batch_size * accelerator.num_processes
    bar = tqdm(total=batches_per_epoch * t.epochs * global_batch, initial=done_batches * global_batch,
               unit="sample", unit_scale=True, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    seen = 0
    model.train()
    for epoch in range(done_batches // batches_per_epoch, t.epochs):
        epoch_start = time.perf_counter()
        skip = done_batches - epoch * batches_per_epoch
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        # On the loader actually iterated: a skipping loader starts at epoch 0 and would reshuffle.
        loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                targets = batch.pop("labels")
                logits = model(**batch).logits
                loss = loss_fn(logits.float(), targets.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            done_batches += 1
            seen += len(targets) * accelerator.num_processes
            bar.update(len(targets) * accelerator.num_processes)
            if not accelerator.sync_gradients:
                continue
            step = optimizer_steps(done_batches)
            if step % t.log_every == 0 or done_batches % batches_per_epoch == 0:
                mean_loss = accelerator.reduce(loss.detach(), "mean").item()
                result.steps.append(step)
                result.losses.append(mean_loss)
                accelerator.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0],
                                 "train/epoch": done_batches / batches_per_epoch}, step=step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=epoch)
            if t.save_every and step % t.save_every == 0 and done_batches % batches_per_epoch:
                save_state()
        result.seconds += time.perf_counter() - epoch_start
        # Scored before the state is saved, so a run resumed from this state draws the same random numbers.
        probs = predict_probs(accelerator, model, dev_loader)
        m = thr.score(probs >= thr.DEFAULT, dev_gold, tag_ids)
        epoch_metrics = {"dev/micro_f1@0.5": m["micro_f1"], "dev/macro_f1@0.5": m["macro_f1"], "epoch": epoch + 1}
        result.epoch_metrics.append(epoch_metrics)
        result.epoch_steps.append(optimizer_steps(done_batches))
        accelerator.log(epoch_metrics, step=result.epoch_steps[-1])
        accelerator.print(f"epoch {epoch + 1}/{t.epochs}: dev micro-F1@0.5 {m['micro_f1']:.3f} "
                          f"macro-F1@0.5 {m['macro_f1']:.3f}")
        save_state()
    bar.close()
    result.samples_per_s = seen / result.seconds if result.seconds else 0.0
    backbone.model = model
    return result


def split_gold_dev(papers: Sequence[Paper], gold: dict[str, list[str]], tag_ids: list[str],
                   gold_path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of training papers (every paper not in gold dev) and dev papers, and dev's 0/1 labels."""
    is_dev = np.array([p.id in gold for p in papers], dtype=bool)
    missing = sorted(set(gold) - {p.id for p in papers})
    if missing:
        raise ValueError(f"{gold_path}: {len(missing)} gold dev paper(s) not in the corpus, e.g. {missing[:3]}")
    dev_rows = np.flatnonzero(is_dev)
    y = np.array([[tag in gold[papers[i].id] for tag in tag_ids] for i in dev_rows], dtype=np.int8)
    return np.flatnonzero(~is_dev), dev_rows, y


def write_review(path: Path, papers: Sequence[Paper], model_probs: np.ndarray, weak_probs: np.ndarray,
                 thresholds: np.ndarray, weak_threshold: float, tag_ids: list[str],
                 gold: dict[str, list[str]], size: int) -> None:
    """Papers where the model and the weak labels disagree most, most first: the ones worth relabelling.
    Disagreement is the summed |model - weak| probability over the tags whose decisions differ."""
    model_tags = model_probs >= thresholds
    weak_tags = weak_probs >= weak_threshold
    differ = model_tags != weak_tags
    gap = np.abs(model_probs - weak_probs) * differ
    order = np.argsort(-gap.sum(1), kind="stable")
    with open(path, "w", encoding="utf-8") as f:
        for i in order[:size]:
            if not differ[i].any():
                break
            f.write(json.dumps({
                "id": papers[i].id, "title": papers[i].title, "disagreement": round(float(gap[i].sum()), 4),
                "model_tags": [t for t, on in zip(tag_ids, model_tags[i]) if on],
                "weak_tags": [t for t, on in zip(tag_ids, weak_tags[i]) if on],
                "gold_tags": gold.get(papers[i].id),
                "differences": {t: {"model": round(float(model_probs[i, j]), 3), "weak": round(float(weak_probs[i, j]), 3)}
                                for j, t in enumerate(tag_ids) if differ[i, j]},
                "abstract": papers[i].abstract,
            }, ensure_ascii=False) + "\n")


def run(cfg: DictConfig) -> dict[str, Any]:
    """The full training run; returns the summary also written to `<run_dir>/metrics.json`."""
    from abstract_tagger.labeling import build_weak_labels

    taxonomy = Taxonomy.from_config(cfg.taxonomy)
    tag_ids = taxonomy.ids
    validate(cfg, tag_ids)
    accelerator = make_accelerator(cfg)
    # Ranks may have resolved different timestamps; the main process's directory wins.
    run_dir = [str(Path(cfg.paths.output_dir).resolve())]
    broadcast_object_list(run_dir)
    run_dir = Path(run_dir[0])
    tracking.start(accelerator, cfg, run_dir)

    with accelerator.main_process_first():
        weak = build_weak_labels(cfg)
    if weak.tag_ids != tag_ids:
        raise ValueError(f"weak labels are over {weak.tag_ids}, the taxonomy over {tag_ids}")
    gold = read_gold(cfg.data.gold_dev, tag_ids)
    train_rows, dev_rows, dev_y = split_gold_dev(weak.papers, gold, tag_ids, cfg.data.gold_dev)
    accelerator.print(f"{len(weak.papers)} papers: {len(train_rows)} train (weak soft targets), "
                      f"{len(dev_rows)} gold dev (held out)")
    if accelerator.is_main_process:
        weak.write(run_dir)

    result = fit(cfg, accelerator, [weak.papers[i] for i in train_rows], weak.probs[train_rows],
                 [weak.papers[i] for i in dev_rows], dev_y, tag_ids, run_dir)
    model, tokenizer = result.backbone.model, result.backbone.tokenizer
    all_loader = accelerator.prepare(_loader(encode(tokenizer, weak.papers, cfg.model.max_length), tokenizer,
                                             cfg.trainer.eval_batch_size, False, cfg.trainer.num_workers))
    probs = predict_probs(accelerator, model, all_loader)
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        summary = _finish(cfg, accelerator, weak, probs, train_rows, dev_rows, dev_y, gold, taxonomy, result, run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _finish(cfg, accelerator, weak, probs, train_rows, dev_rows, dev_y, gold, taxonomy, result, run_dir) -> dict:
    """Main process: dev metrics and thresholds, export, review, charts, summary."""
    tag_ids = taxonomy.ids
    k, seed = cfg.trainer.threshold_folds, cfg.seed
    model_eval = thr.evaluate_probs(probs[dev_rows], dev_y, tag_ids, k, seed)
    weak_eval = thr.evaluate_probs(weak.probs[dev_rows], dev_y, tag_ids, k, seed)
    dev = {
        "weak labels, threshold 0.5": weak_eval["flat"],
        "weak labels, tuned thresholds (k-fold)": weak_eval["tuned_kfold"],
        "model, threshold 0.5": model_eval["flat"],
        "model, tuned thresholds (k-fold)": model_eval["tuned_kfold"],
        SHIPPED_ROW: model_eval["shipped"],
    }
    thresholds = model_eval["thresholds"]
    t = cfg.trainer
    card = model_card(
        backbone=result.backbone.source, taxonomy=taxonomy, thresholds=thresholds, dev=dev,
        corpus={"sources": {n: s["kept"] for n, s in weak.report["corpus"]["per_source"].items()},
                "train": len(train_rows), "dev": len(dev_rows)},
        labeling={"functions": weak.report["functions"]},
        training={"epochs": t.epochs, "batch_size": t.batch_size * accelerator.num_processes * t.grad_accum,
                  "max_length": cfg.model.max_length, "lr": t.lr, "head_lr": t.head_lr or t.lr,
                  "precision": accelerator.mixed_precision, "seed": cfg.seed, "threshold_folds": k},
    )
    model = accelerator.unwrap_model(result.backbone.model)
    checkpoint = export_checkpoint(model, result.backbone.tokenizer, run_dir / "checkpoint", thresholds=thresholds,
                                   taxonomy=taxonomy, max_length=cfg.model.max_length, dtype=cfg.export.dtype,
                                   card=card)
    write_review(run_dir / "review.jsonl", weak.papers, probs, weak.probs,
                 np.array([thresholds[tg] for tg in tag_ids]), weak.threshold, tag_ids, gold, cfg.export.review_size)

    per_tag = {"weak labels (k-fold tuned)": weak_eval["tuned_kfold"]["per_label"],
               "model (k-fold tuned)": model_eval["tuned_kfold"]["per_label"]}
    tracking.plot_per_tag_f1(run_dir / "per_tag_f1.png", tag_ids, per_tag)
    tracking.plot_loss(run_dir / "loss.png", result.steps, result.losses, result.epoch_steps)
    tracking.log_per_tag_table(accelerator, tag_ids, per_tag)
    headline = {f"final/{name}/{m}": v[m] for name, v in dev.items() for m in ("micro_f1", "macro_f1")}
    accelerator.log(headline)

    summary = {
        "checkpoint": str(checkpoint),
        "backbone": result.backbone.source,
        "fell_back": result.backbone.fell_back,
        "train_papers": len(train_rows),
        "dev_papers": len(dev_rows),
        "train_seconds": round(result.seconds, 1),
        "train_samples_per_s": round(result.samples_per_s, 2),
        "precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "dev": {name: {"micro_f1": v["micro_f1"], "macro_f1": v["macro_f1"]} for name, v in dev.items()},
        "dev_per_tag": {name: v["per_label"] for name, v in dev.items()},
        "epochs": result.epoch_metrics,
        "thresholds": thresholds,
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("dev micro/macro F1: %s", "; ".join(
        f"{name}: {v['micro_f1']:.3f}/{v['macro_f1']:.3f}" for name, v in dev.items()))
    log.info("checkpoint: %s", checkpoint)
    return summary
