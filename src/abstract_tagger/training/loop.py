"""The training loop: papers + soft targets in, a fine-tuned model out (`fit`), with the
Accelerate pieces it needs. The run around it (weak labels, splits, thresholds, export) is
`pipeline.run`.

The same code runs on CPU, one GPU, `torchrun --nproc_per_node N train.py` and `accelerate launch
train.py`: Accelerate places the model, shards batches, syncs gradients and casts precision.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from datasets import Dataset
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, get_scheduler

from abstract_tagger.common.progress import progress_bar
from abstract_tagger.common.runtime import cpu_launch, fast_precision
from abstract_tagger.metrics import score

log = logging.getLogger(__name__)

# A state is saved under a hidden name and renamed to `batch-N` once complete, so a kill mid-save
# never leaves a `batch-N` that resume=auto would pick.
_STATE = re.compile(r"batch-(\d+)")
HISTORY_FILE = "history.json"
# The settings a state's weights depend on, saved with it: a resume under other settings would mix two runs.
SETTINGS_FILE = "settings.json"
# Trainer keys that change how a run is watched, saved or resumed, not the weights it reaches.
_NOT_SHAPING = ("resume", "log_every", "save_every", "keep_states", "num_workers", "eval_batch_size")
# Head parameters (fresh classifier, and the CLS pooler that sentence-embedding models never trained)
# get trainer.head_lr.
HEAD_PARAMS = ("classifier.", "pooler.")
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")


def resolve_precision(precision: str) -> str:
    """`trainer.precision` (auto | fp32 | bf16 | fp16) as Accelerate's `mixed_precision` (no | bf16 | fp16)."""
    if precision == "auto":
        precision = fast_precision("cuda" if torch.cuda.is_available() else "cpu")
    return "no" if precision == "fp32" else precision


def make_accelerator(cfg: DictConfig) -> Accelerator:
    return Accelerator(
        # Accelerate only runs multi-process on CPU (gloo) when told it is on CPU.
        cpu=cpu_launch(),
        mixed_precision=resolve_precision(cfg.trainer.precision),
        gradient_accumulation_steps=cfg.trainer.grad_accum,
        log_with=cfg.logger.backend,
        # Shuffling seeded by (seed, epoch), so a resumed run sees the batches the killed run would have.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def _loader(dataset, tokenizer, batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    """Batches of a tokenised dataset (`training_data`'s, or `papers_dataset`): model inputs and `labels`,
    padded per batch."""
    columns = [c for c in (*tokenizer.model_input_names, "labels", "hand") if c in dataset.column_names]
    return DataLoader(dataset.select_columns(columns), batch_size=batch_size, shuffle=shuffle,
                      num_workers=num_workers, collate_fn=DataCollatorWithPadding(tokenizer),
                      generator=torch.Generator() if shuffle else None)


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


def _pos_weight(spec, tag_ids: list[str], train_data: Dataset, cap: float) -> torch.Tensor | None:
    if spec is None:
        return None
    if spec == "auto":
        # negatives/positives in expectation under the soft targets, capped so rare tags do not explode;
        # summed batch by batch, so a corpus of millions is never in memory.
        pos = np.zeros(len(tag_ids), dtype=np.float32)  # float32 as the targets: same weights as one sum
        for batch in train_data.select_columns(["labels"]).with_format("numpy").iter(batch_size=65536):
            pos += batch["labels"].sum(0)
        return torch.tensor(np.clip((len(train_data) - pos) / np.maximum(pos, 1e-6), 1.0, cap), dtype=torch.float32)
    return torch.tensor([float(spec.get(t, 1.0)) for t in tag_ids], dtype=torch.float32)


def _weighted_mean(losses: torch.Tensor, hand: torch.Tensor | None, hand_weight: float) -> torch.Tensor:
    """The mean of a [papers, tags] loss, hand-labelled papers counted `hand_weight` times."""
    if hand is None or hand_weight == 1:
        return losses.mean()
    weights = 1 + (hand_weight - 1) * hand.to(losses.dtype)
    return (losses.mean(1) * weights).sum() / weights.sum()


def _states(state_root: Path) -> list[Path]:
    """The complete states, oldest first."""
    states = [p for p in state_root.glob("batch-*") if _STATE.fullmatch(p.name)]
    return sorted(states, key=lambda p: int(p.name.split("-")[1]))


def _latest_state(state_root: Path) -> Path | None:
    states = _states(state_root)
    return states[-1] if states else None


@dataclass(frozen=True)
class Phase:
    """One call of `fit`: how long and how fast (`max_steps`, where set, replaces `epochs`)."""

    name: str
    epochs: int
    lr: float
    head_lr: float | None
    max_steps: int | None = None

    @classmethod
    def weak(cls, t: DictConfig) -> Phase:
        """The first phase: `trainer.epochs` (or `trainer.max_steps`) on the weak labels."""
        return cls("round-0", t.epochs, t.lr, t.head_lr, t.max_steps)


@dataclass
class FitResult:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    epoch_steps: list[int] = field(default_factory=list)
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # in training batches; dev scoring and state saves at epoch ends excluded
    samples_per_s: float = 0.0
    seen: int = 0

    def history(self) -> dict[str, Any]:
        """What a resumed run needs to report the epochs before the kill (saved with each state)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def shaping_settings(t: DictConfig, phase: Phase, n_train: int, processes: int) -> dict[str, Any]:
    """{key: value} of everything the weights of a state depend on besides the data's contents: the
    trainer's settings, the phase, the seed (the one set_seed gave torch: the model's initialisation
    and the sampler's shuffling follow it), the number of training papers and of processes (they set
    what a batch is). JSON-shaped, as it is saved."""
    trainer = {k: v for k, v in OmegaConf.to_container(t, resolve=True).items() if k not in _NOT_SHAPING}
    settings = {"trainer": trainer, "phase": asdict(phase), "seed": torch.initial_seed(),
                "training_papers": n_train, "processes": processes}
    return json.loads(json.dumps(_flat(settings)))


def check_resumable(state: Path, settings: Mapping[str, Any]) -> None:
    """Refuse to continue from a state made with other settings, naming the keys that differ."""
    if not (state / SETTINGS_FILE).is_file():
        log.warning("%s: saved without its settings (an older version): cannot check that they match", state)
        return
    saved = json.loads((state / SETTINGS_FILE).read_text())
    changed = sorted(k for k in saved.keys() | settings.keys() if saved.get(k) != settings.get(k))
    if changed:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {settings.get(k)!r})" for k in changed)
        raise ValueError(f"cannot resume from {state}: it was made with other settings: {shown}; resume with "
                         "the settings it was made with, or train in a new run directory")


def fit(
    t: DictConfig,
    accelerator: Accelerator,
    model,
    tokenizer,
    train_data: Dataset,
    dev_data: Dataset,
    dev_gold: np.ndarray,
    tag_ids: list[str],
    state_root: Path,
    phase: Phase,
) -> FitResult:
    """Fine-tune the prepared `model` on the soft `labels` of `train_data` (tokenised) for the phase's
    epochs, or its `max_steps` optimizer steps where set (`t` is the trainer config: batches, loss,
    schedule); score dev each epoch. States go to `state_root`, so a killed run continues with
    trainer.resume=auto."""
    train_loader = _loader(train_data, tokenizer, t.batch_size, True, t.num_workers)
    dev_loader = _loader(dev_data, tokenizer, t.eval_batch_size, False, t.num_workers)
    optimizer = _optimizer(model, phase.lr, phase.head_lr, t.weight_decay)
    batches_per_epoch = math.ceil(len(train_data) / (t.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum)
    epochs = phase.epochs
    total_batches = batches_per_epoch * epochs
    if phase.max_steps is not None:
        # A budget in optimizer steps: as many epochs as it takes, the last one possibly cut short.
        full, rest = divmod(phase.max_steps, steps_per_epoch)
        total_batches = full * batches_per_epoch + min(rest * t.grad_accum, batches_per_epoch)
        epochs = math.ceil(total_batches / batches_per_epoch)

    def optimizer_steps(batches: int) -> int:
        """Optimizer steps after `batches` batches; every epoch ends with a step (accumulation flushes)."""
        done_epochs, rest = divmod(batches, batches_per_epoch)
        return done_epochs * steps_per_epoch + math.ceil(rest / t.grad_accum)

    total_steps = optimizer_steps(total_batches)

    # Accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = get_scheduler(t.scheduler, optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total_steps) * accelerator.num_processes,
                              num_training_steps=total_steps * accelerator.num_processes)
    optimizer, train_loader, dev_loader, scheduler = accelerator.prepare(optimizer, train_loader, dev_loader,
                                                                         scheduler)
    loss_fn = instantiate(t.loss, pos_weight=_pos_weight(t.pos_weight, tag_ids, train_data, t.pos_weight_cap))
    loss_fn.to(accelerator.device)

    done_batches = 0
    resume_from = _latest_state(state_root) if t.resume == "auto" else (Path(t.resume) if t.resume else None)
    # On resume, the history up to the state (steps, losses, epoch metrics, time) comes back with it, so
    # the result (metrics.json, loss.png) covers the whole run, not only the part after the kill.
    result = FitResult()
    settings = shaping_settings(t, phase, len(train_data), accelerator.num_processes)
    if resume_from is not None:
        check_resumable(resume_from, settings)
        accelerator.load_state(str(resume_from))
        done_batches = int(resume_from.name.split("-")[1])
        if (resume_from / HISTORY_FILE).is_file():
            result = FitResult(**json.loads((resume_from / HISTORY_FILE).read_text()))
        accelerator.print(f"resumed from {resume_from} (batch {done_batches} of {total_batches})")
    elif t.resume == "auto":
        accelerator.print(f"trainer.resume=auto: no state under {state_root}, starting fresh")

    def check_finite(loss_value: float) -> None:
        # A NaN/inf loss poisons every weight: stop before it is saved or exported.
        if not math.isfinite(loss_value):
            raise ValueError(f"training diverged: loss {loss_value} at optimizer step {optimizer_steps(done_batches)}"
                             f" ({phase.name}: lr={phase.lr}, head_lr={phase.head_lr}); lower the learning rates")

    def save_state(mid_epoch: bool = False) -> None:
        check_finite(accelerator.reduce(loss.detach(), "mean").item())
        partial = state_root / f".batch-{done_batches}.partial"
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            history = result.history()
            if mid_epoch:  # result.seconds is added up at epoch ends
                history["seconds"] += time.perf_counter() - epoch_start
            (partial / HISTORY_FILE).write_text(json.dumps(history) + "\n")
            (partial / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = state_root / f"batch-{done_batches}"
            # A run resumed from an older state (trainer.resume=DIR) saves the same batches again.
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            # Older states beyond keep_states, and states a killed save left half-written.
            for old in [*_states(state_root)[:-t.keep_states], *state_root.glob(".batch-*.partial")]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    global_batch = t.batch_size * accelerator.num_processes
    bar = progress_bar(total=total_batches * global_batch, initial=done_batches * global_batch, unit="sample",
                       unit_scale=True, disable=not accelerator.is_local_main_process)
    model.train()
    for epoch in range(done_batches // batches_per_epoch, epochs):
        if done_batches >= total_batches:  # resumed from the state saved at the end of the budget
            break
        epoch_start = time.perf_counter()
        skip = done_batches - epoch * batches_per_epoch
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        # On the loader actually iterated: a skipping loader starts at epoch 0 and would reshuffle.
        loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                targets = batch.pop("labels")
                hand = batch.pop("hand", None)
                logits = model(**batch).logits
                loss = _weighted_mean(loss_fn(logits.float(), targets.float()), hand, t.hand_weight)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            done_batches += 1
            result.seen += len(targets) * accelerator.num_processes
            bar.update(len(targets) * accelerator.num_processes)
            if not accelerator.sync_gradients:
                continue
            step = optimizer_steps(done_batches)
            last = done_batches % batches_per_epoch == 0 or done_batches == total_batches
            if step % t.log_every == 0 or last:
                mean_loss = accelerator.reduce(loss.detach(), "mean").item()
                check_finite(mean_loss)
                result.steps.append(step)
                result.losses.append(mean_loss)
                accelerator.log({"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[0],
                                 "train/epoch": done_batches / batches_per_epoch}, step=step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=epoch, refresh=False)
            if done_batches == total_batches:
                break
            if t.save_every and step % t.save_every == 0 and done_batches % batches_per_epoch:
                save_state(mid_epoch=True)
        result.seconds += time.perf_counter() - epoch_start
        # Scored before the state is saved, so a run resumed from this state draws the same random numbers.
        probs = predict_probs(accelerator, model, dev_loader)
        m = score(probs >= 0.5, dev_gold, tag_ids)
        epoch_metrics = {"dev/micro_f1@0.5": m.micro_f1, "dev/macro_f1@0.5": m.macro_f1, "epoch": epoch + 1}
        result.epoch_metrics.append(epoch_metrics)
        result.epoch_steps.append(optimizer_steps(done_batches))
        accelerator.log(epoch_metrics, step=result.epoch_steps[-1])
        accelerator.print(f"epoch {epoch + 1}/{epochs}: dev micro-F1@0.5 {m.micro_f1:.3f} "
                          f"macro-F1@0.5 {m.macro_f1:.3f}")
        save_state()
    bar.close()
    result.samples_per_s = result.seen / result.seconds if result.seconds else 0.0
    return result
