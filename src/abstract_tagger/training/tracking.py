"""Experiment tracking (wandb through accelerate; offline by default, files in the run directory)
and the PNG charts every run directory gets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from abstract_tagger.common.files import write_atomic  # noqa: E402


def start(accelerator: Accelerator, cfg: DictConfig, run_dir: Path) -> None:
    """Start the configured tracker; the accelerator was built with log_with=cfg.logger.backend."""
    if cfg.logger.backend is None:
        return
    accelerator.init_trackers(
        cfg.logger.project,
        config=OmegaConf.to_container(cfg, resolve=True),
        init_kwargs={"wandb": {"mode": cfg.logger.mode, "dir": str(run_dir), "name": run_dir.name}},
    )


def log_per_tag_table(accelerator: Accelerator, tag_ids: Sequence[str], columns: Mapping[str, Mapping]) -> None:
    """One row per tag, one F1 column per entry of `columns` ({name: per_label metrics})."""
    if not accelerator.trackers:
        return
    rows = [[t, *(columns[c][t]["f1"] for c in columns)] for t in tag_ids]
    accelerator.get_tracker("wandb").log_table("dev/per_tag_f1", columns=["tag", *columns], data=rows)


def plot_per_tag_f1(path: Path, tag_ids: Sequence[str], columns: Mapping[str, Mapping]) -> None:
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(tag_ids) + 1.5))
    height = 0.8 / len(columns)
    for i, (name, per_label) in enumerate(columns.items()):
        ys = [j + i * height for j in range(len(tag_ids))]
        ax.barh(ys, [per_label[t]["f1"] for t in tag_ids], height=height, label=name)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(tag_ids))], tag_ids)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 on gold dev")
    ax.legend(loc="lower right")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def plot_loss(path: Path, steps: Sequence[int], losses: Sequence[float], epoch_steps: Sequence[int]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="train loss (BCE on soft targets)")
    for s in epoch_steps:
        ax.axvline(s, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
