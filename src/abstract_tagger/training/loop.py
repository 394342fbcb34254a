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
    """One call of `fit`: how long and how fast (`max_steps`, where set, replaces `epochs`).
    `first_step`: the optimizer steps of the phases before it, where its steps continue the run's
    count for the trackers (wandb drops a step lower than one already logged)."""

    name: str
    epochs: int
    lr: float
    head_lr: float | None
    max_steps: int | None = None
    first_step: int = 0

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


@dataclass(frozen=True)
class FitData:
    """What `fit` trains on and scores each epoch: tokenised training papers (soft `labels`, `hand`)
    and dev papers with their gold labels."""

    train: Dataset
    dev: Dataset
    dev_gold: np.ndarray
    tag_ids: list[str]


@dataclass(frozen=True)
class StepPlan:
    """How many batches and optimizer steps a phase runs: its epochs, or `max_steps` optimizer steps
    (as many epochs as it takes, the last possibly cut short)."""

    batches_per_epoch: int
    steps_per_epoch: int
    grad_accum: int
    total_batches: int
    epochs: int

    @classmethod
    def make(cls, n_train: int, global_batch: int, grad_accum: int, phase: Phase) -> StepPlan:
        batches_per_epoch = math.ceil(n_train / global_batch)
        steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)
        epochs, total_batches = phase.epochs, batches_per_epoch * phase.epochs
        if phase.max_steps is not None:
            full, rest = divmod(phase.max_steps, steps_per_epoch)
            total_batches = full * batches_per_epoch + min(rest * grad_accum, batches_per_epoch)
            epochs = math.ceil(total_batches / batches_per_epoch)
        return cls(batches_per_epoch, steps_per_epoch, grad_accum, total_batches, epochs)

    def optimizer_steps(self, batches: int) -> int:
        """Optimizer steps after `batches` batches; every epoch ends with a step (accumulation flushes)."""
        done_epochs, rest = divmod(batches, self.batches_per_epoch)
        return done_epochs * self.steps_per_epoch + math.ceil(rest / self.grad_accum)

    @property
    def total_steps(self) -> int:
        return self.optimizer_steps(self.total_batches)

    def ends_epoch(self, batches: int) -> bool:
        return batches % self.batches_per_epoch == 0 or batches == self.total_batches


@dataclass
class StateStore:
    """The phase's training states under `root` (`batch-<N>/`, the newest `keep` kept), each saved with
    the run's history and the settings it was made with, so a killed run continues where it was."""

    root: Path
    keep: int
    settings: dict[str, Any]

    def resume_point(self, resume: str | None) -> Path | None:
        if resume == "auto":
            return _latest_state(self.root)
        return Path(resume) if resume else None

    def load(self, accelerator: Accelerator, state: Path) -> tuple[int, FitResult]:
        """Load `state` into the prepared objects; (batches done, history up to it)."""
        check_resumable(state, self.settings)
        accelerator.load_state(str(state))
        history = state / HISTORY_FILE
        result = FitResult(**json.loads(history.read_text())) if history.is_file() else FitResult()
        return int(state.name.split("-")[1]), result

    def save(self, accelerator: Accelerator, batches: int, history: Mapping[str, Any]) -> None:
        """Written as `.batch-N.partial`, then renamed: a kill mid-save leaves no state that looks whole."""
        partial = self.root / f".batch-{batches}.partial"
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            (partial / HISTORY_FILE).write_text(json.dumps(history) + "\n")
            (partial / SETTINGS_FILE).write_text(json.dumps(self.settings, indent=1) + "\n")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = self.root / f"batch-{batches}"
            # A run resumed from an older state (trainer.resume=DIR) saves the same batches again.
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            # Older states beyond `keep`, and states a killed save left half-written.
            for old in [*_states(self.root)[:-self.keep], *self.root.glob(".batch-*.partial")]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()


def _check_finite(loss_value: float, step: int, phase: Phase) -> None:
    # A NaN/inf loss poisons every weight: stop before it is saved or exported.
    if not math.isfinite(loss_value):
        raise ValueError(f"training diverged: loss {loss_value} at optimizer step {step}"
                         f" ({phase.name}: lr={phase.lr}, head_lr={phase.head_lr}); lower the learning rates")


def _evaluate_epoch(accelerator: Accelerator, model, dev_loader: DataLoader, data: FitData,
                    epoch: int, epochs: int) -> dict[str, float]:
    """The evaluation hook at each epoch end: dev micro/macro F1 at 0.5, logged and printed."""
    m = score(predict_probs(accelerator, model, dev_loader) >= 0.5, data.dev_gold, data.tag_ids)
    accelerator.print(f"epoch {epoch + 1}/{epochs}: dev micro-F1@0.5 {m.micro_f1:.3f} macro-F1@0.5 {m.macro_f1:.3f}")
    return {"dev/micro_f1@0.5": m.micro_f1, "dev/macro_f1@0.5": m.macro_f1, "epoch": epoch + 1}


class Trainer:
    """One phase of fine-tuning: the prepared model, optimizer, schedule and loss; `fit` runs the step
    plan, saving states to the store (resume continues from the newest) and scoring dev at each epoch
    end (the evaluation hook)."""

    def __init__(self, t: DictConfig, accelerator: Accelerator, model, tokenizer, data: FitData, state_root: Path,
                 phase: Phase):
        self.t, self.accelerator, self.model, self.data, self.phase = t, accelerator, model, data, phase
        self.global_batch = t.batch_size * accelerator.num_processes
        self.plan = StepPlan.make(len(data.train), self.global_batch, t.grad_accum, phase)
        train_loader = _loader(data.train, tokenizer, t.batch_size, True, t.num_workers)
        dev_loader = _loader(data.dev, tokenizer, t.eval_batch_size, False, t.num_workers)
        optimizer = _optimizer(model, phase.lr, phase.head_lr, t.weight_decay)
        # Accelerate steps a prepared scheduler once per process per optimizer step.
        steps = self.plan.total_steps * accelerator.num_processes
        scheduler = get_scheduler(t.scheduler, optimizer, num_training_steps=steps,
                                  num_warmup_steps=int(t.warmup_ratio * self.plan.total_steps) * accelerator.num_processes)
        self.optimizer, self.train_loader, self.dev_loader, self.scheduler = accelerator.prepare(
            optimizer, train_loader, dev_loader, scheduler)
        self.loss_fn = instantiate(t.loss, pos_weight=_pos_weight(t.pos_weight, data.tag_ids, data.train,
                                                                  t.pos_weight_cap)).to(accelerator.device)
        settings = shaping_settings(t, phase, len(data.train), accelerator.num_processes)
        self.store = StateStore(state_root, t.keep_states, settings)
        self.done_batches, self.result = 0, FitResult()

    def resume(self) -> None:
        """Continue from the store's state where `trainer.resume` asks for one. The history up to the
        state (steps, losses, epoch metrics, time) comes back with it, so the result (metrics.json,
        loss.png) covers the whole run, not only the part after the kill."""
        state = self.store.resume_point(self.t.resume)
        if state is not None:
            self.done_batches, self.result = self.store.load(self.accelerator, state)
            self.accelerator.print(f"resumed from {state} (batch {self.done_batches} of {self.plan.total_batches})")
        elif self.t.resume == "auto":
            self.accelerator.print(f"trainer.resume=auto: no state under {self.store.root}, starting fresh")

    def train_step(self, batch) -> torch.Tensor:
        accelerator, t = self.accelerator, self.t
        with accelerator.accumulate(self.model):
            targets, hand = batch.pop("labels"), batch.pop("hand", None)
            logits = self.model(**batch).logits
            loss = _weighted_mean(self.loss_fn(logits.float(), targets.float()), hand, t.hand_weight)
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.max_grad_norm:
                accelerator.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return loss

    def save(self, loss: torch.Tensor, epoch_start: float | None = None) -> None:
        _check_finite(self.accelerator.reduce(loss.detach(), "mean").item(),
                      self.plan.optimizer_steps(self.done_batches), self.phase)
        history = self.result.history()
        if epoch_start is not None:  # mid-epoch: result.seconds is added up at epoch ends
            history["seconds"] += time.perf_counter() - epoch_start
        self.store.save(self.accelerator, self.done_batches, history)

    def log_loss(self, loss: torch.Tensor, step: int, epoch: int, bar) -> None:
        mean_loss = self.accelerator.reduce(loss.detach(), "mean").item()
        _check_finite(mean_loss, step, self.phase)
        self.result.steps.append(step)
        self.result.losses.append(mean_loss)
        self.accelerator.log({"train/loss": mean_loss, "train/lr": self.scheduler.get_last_lr()[0],
                              "train/epoch": self.done_batches / self.plan.batches_per_epoch},
                             step=self.phase.first_step + step)
        bar.set_postfix(loss=f"{mean_loss:.4f}", epoch=epoch, refresh=False)

    def run_epoch(self, epoch: int, bar) -> torch.Tensor:
        """The epoch's batches from where the run stands; returns the last batch's loss."""
        plan, t, accelerator = self.plan, self.t, self.accelerator
        epoch_start = time.perf_counter()
        skip = self.done_batches - epoch * plan.batches_per_epoch
        loader = accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
        # On the loader actually iterated: a skipping loader starts at epoch 0 and would reshuffle.
        loader.set_epoch(epoch)
        for batch in loader:
            n = len(batch["labels"]) * accelerator.num_processes
            loss = self.train_step(batch)
            self.done_batches += 1
            self.result.seen += n
            bar.update(n)
            if not accelerator.sync_gradients:
                continue
            step = plan.optimizer_steps(self.done_batches)
            if step % t.log_every == 0 or plan.ends_epoch(self.done_batches):
                self.log_loss(loss, step, epoch, bar)
            if self.done_batches == plan.total_batches:
                break
            if t.save_every and step % t.save_every == 0 and self.done_batches % plan.batches_per_epoch:
                self.save(loss, epoch_start)
        self.result.seconds += time.perf_counter() - epoch_start
        return loss

    def fit(self) -> FitResult:
        self.resume()
        plan = self.plan
        bar = progress_bar(total=plan.total_batches * self.global_batch, initial=self.done_batches * self.global_batch,
                           unit="sample", unit_scale=True, disable=not self.accelerator.is_local_main_process)
        self.model.train()
        for epoch in range(self.done_batches // plan.batches_per_epoch, plan.epochs):
            if self.done_batches >= plan.total_batches:  # resumed from the state saved at the end of the budget
                break
            loss = self.run_epoch(epoch, bar)
            result = self.result
            # Scored before the state is saved, so a run resumed from it draws the same random numbers.
            result.epoch_metrics.append(_evaluate_epoch(self.accelerator, self.model, self.dev_loader, self.data,
                                                        epoch, plan.epochs))
            result.epoch_steps.append(plan.optimizer_steps(self.done_batches))
            self.accelerator.log(result.epoch_metrics[-1], step=self.phase.first_step + result.epoch_steps[-1])
            self.save(loss)
        bar.close()
        self.result.samples_per_s = self.result.seen / self.result.seconds if self.result.seconds else 0.0
        return self.result


def fit(t: DictConfig, accelerator: Accelerator, model, tokenizer, data: FitData, state_root: Path,
        phase: Phase) -> FitResult:
    """Fine-tune the prepared `model` on the soft `labels` of `data.train` (tokenised) for the phase's
    epochs, or its `max_steps` optimizer steps where set (`t` is the trainer config: batches, loss,
    schedule); score dev each epoch. States go to `state_root`, so a killed run continues with
    trainer.resume=auto."""
    return Trainer(t, accelerator, model, tokenizer, data, state_root, phase).fit()
