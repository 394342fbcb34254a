"""Start-up checks of the training config, so a bad value fails before any work with the key named,
and the run-directory resolver every launched rank agrees on."""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from abstract_tagger.thresholds import POLICIES

PRECISIONS = ("auto", "no", "bf16", "fp16")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def run_stamp() -> str:
    """Timestamp for the run directory. Ranks started by one launcher (torchrun, accelerate launch)
    share its start time, so they name the same directory even if they start seconds apart."""
    started = time.time()
    if "LOCAL_RANK" in os.environ:
        import psutil

        started = psutil.Process(os.getppid()).create_time()
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp)


def _require(ok: bool, key: str, message: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {message}")


def _positive(cfg: DictConfig, key: str, *, integer: bool = False, allow_none: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    _require(isinstance(value, kind) and not isinstance(value, bool) and value > 0, key,
             f"must be a positive {'integer' if integer else 'number'}", value)


def validate(cfg: DictConfig, tag_ids: list[str]) -> None:
    """Raise ConfigError for the first value that cannot work."""
    t = cfg.trainer
    _positive(cfg, "trainer.lr")
    _positive(cfg, "trainer.head_lr", allow_none=True)
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size", "trainer.grad_accum",
                "trainer.log_every", "trainer.keep_states", "model.max_length", "trainer.self_training.epochs"):
        _positive(cfg, key, integer=True)
    st = t.self_training
    _require(isinstance(st.rounds, int) and st.rounds >= 0, "trainer.self_training.rounds", "must be an integer >= 0",
             st.rounds)
    _require(0 <= st.model_weight <= 1, "trainer.self_training.model_weight", "must be in [0, 1]", st.model_weight)
    th = cfg.thresholds
    _require(th.policy in ("auto", *POLICIES), "thresholds.policy", f"must be auto or one of {POLICIES}", th.policy)
    _require(len(th.candidates) > 0 and set(th.candidates) <= set(POLICIES), "thresholds.candidates",
             f"must be a non-empty list of {POLICIES}", list(th.candidates))
    _require(0 < th.default < 1, "thresholds.default", "must be in (0, 1)", th.default)
    _require(isinstance(th.folds, int) and th.folds >= 2, "thresholds.folds", "k-fold needs at least 2 folds", th.folds)
    _require(0 < th.grid.start < th.grid.stop < 1 and th.grid.step > 0, "thresholds.grid",
             "needs 0 < start < stop < 1 and step > 0", OmegaConf.to_container(th.grid))
    _require(len(cfg.rule_blend.weights) > 0 and all(0 <= w <= 1 for w in cfg.rule_blend.weights),
             "rule_blend.weights", "must be a non-empty list of weights in [0, 1]", list(cfg.rule_blend.weights))
    _require(t.save_every is None or (isinstance(t.save_every, int) and t.save_every >= 0),
             "trainer.save_every", "must be 0/null (epoch ends only) or a number of optimizer steps", t.save_every)
    _require(0 <= t.warmup_ratio < 1, "trainer.warmup_ratio", "must be in [0, 1)", t.warmup_ratio)
    _require(t.weight_decay >= 0, "trainer.weight_decay", "must be >= 0", t.weight_decay)
    _require(t.precision in PRECISIONS, "trainer.precision", f"must be one of {PRECISIONS}", t.precision)
    pos_weight = t.pos_weight
    if isinstance(pos_weight, DictConfig):
        unknown = sorted(set(pos_weight) - set(tag_ids))
        _require(not unknown, "trainer.pos_weight", f"unknown tag(s) {unknown}; known: {', '.join(tag_ids)}",
                 OmegaConf.to_container(pos_weight))
        for tag in pos_weight:
            _positive(cfg, f"trainer.pos_weight.{tag}")
    else:
        _require(pos_weight in (None, "auto"), "trainer.pos_weight", "must be null, 'auto' or {tag: weight}", pos_weight)
    _require(t.resume in (None, "auto") or Path(t.resume).is_dir(), "trainer.resume",
             "must be null, 'auto' or an existing state directory", t.resume)
    _require(cfg.export.dtype in EXPORT_DTYPES, "export.dtype", f"must be one of {EXPORT_DTYPES}", cfg.export.dtype)
    _require(isinstance(cfg.export.review_size, int) and cfg.export.review_size >= 0, "export.review_size",
             "must be an integer >= 0", cfg.export.review_size)
    for name, source in cfg.data.sources.items():
        _require(Path(source.path).is_file(), f"data.sources.{name}.path", "file not found", source.path)
    for split, named in cfg.data.gold.items():
        for name, path in (named or {}).items():
            _require(path is None or Path(path).is_file(), f"data.gold.{split}.{name}", "file not found", path)
    _require(not cfg.data.gold_train or Path(cfg.data.gold_train).is_file(), "data.gold_train", "file not found",
             cfg.data.gold_train)
