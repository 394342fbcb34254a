"""Start-up checks of train.py's settings: every value that cannot work fails before any work, naming
its key. Imports common, labeling (its own checks) and training."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from abstract_tagger.common.config import is_number, positive_at, require
from abstract_tagger.data.corpus import gold_train_files
from abstract_tagger.labeling.checks import validate_label
from abstract_tagger.training.thresholds import POLICIES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


def validate(cfg: DictConfig, tag_ids: list[str]) -> None:
    """Raise ConfigError for the first value that cannot work."""
    _check_gold_train(cfg.data.gold_train)  # first: the clean-phase check reads it
    t = cfg.trainer
    positive_at(cfg, "trainer.lr")
    positive_at(cfg, "trainer.head_lr", allow_none=True)
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size", "trainer.grad_accum",
                "trainer.log_every", "trainer.keep_states", "model.max_length", "trainer.self_training.epochs"):
        positive_at(cfg, key, integer=True)
    positive_at(cfg, "trainer.max_steps", integer=True, allow_none=True)
    positive_at(cfg, "export.review_pool", integer=True)
    positive_at(cfg, "export.calibration_papers", integer=True)
    st = t.self_training
    require(isinstance(st.rounds, int) and st.rounds >= 0, "trainer.self_training.rounds", "must be an integer >= 0",
             st.rounds)
    require(0 <= st.model_weight <= 1, "trainer.self_training.model_weight", "must be in [0, 1]", st.model_weight)
    positive_at(cfg, "trainer.hand_weight")
    cp = t.clean_phase
    require(is_number(cp.epochs, integer=True) and cp.epochs >= 0, "trainer.clean_phase.epochs",
            "must be an integer >= 0", cp.epochs)
    require(not cp.epochs or gold_train_files(cfg.data.gold_train), "trainer.clean_phase.epochs",
             "a clean phase trains on hand labels: set data.gold_train", cp.epochs)
    positive_at(cfg, "trainer.clean_phase.lr")
    positive_at(cfg, "trainer.clean_phase.head_lr", allow_none=True)
    require(isinstance(t.get("loss"), DictConfig) and isinstance(t.loss.get("_target_"), str), "trainer.loss",
             "must name a loss class in _target_ (trainer/loss=bce|asl)", t.get("loss"))
    th = cfg.thresholds
    require(th.policy in ("auto", *POLICIES), "thresholds.policy", f"must be auto or one of {POLICIES}", th.policy)
    require(len(th.candidates) > 0 and set(th.candidates) <= set(POLICIES), "thresholds.candidates",
             f"must be a non-empty list of {POLICIES}", list(th.candidates))
    require(0 < th.default < 1, "thresholds.default", "must be in (0, 1)", th.default)
    require(isinstance(th.folds, int) and th.folds >= 2, "thresholds.folds", "k-fold needs at least 2 folds", th.folds)
    require(0 < th.grid.start < th.grid.stop < 1 and th.grid.step > 0, "thresholds.grid",
             "needs 0 < start < stop < 1 and step > 0", OmegaConf.to_container(th.grid))
    require(len(cfg.rule_blend.weights) > 0 and all(0 <= w <= 1 for w in cfg.rule_blend.weights),
             "rule_blend.weights", "must be a non-empty list of weights in [0, 1]", list(cfg.rule_blend.weights))
    require(t.save_every is None or (isinstance(t.save_every, int) and t.save_every >= 0),
             "trainer.save_every", "must be 0/null (epoch ends only) or a number of optimizer steps", t.save_every)
    require(0 <= t.warmup_ratio < 1, "trainer.warmup_ratio", "must be in [0, 1)", t.warmup_ratio)
    require(t.weight_decay >= 0, "trainer.weight_decay", "must be >= 0", t.weight_decay)
    require(t.precision in PRECISIONS, "trainer.precision", f"must be one of {PRECISIONS}", t.precision)
    pos_weight = t.pos_weight
    if isinstance(pos_weight, DictConfig):
        unknown = sorted(set(pos_weight) - set(tag_ids))
        require(not unknown, "trainer.pos_weight", f"unknown tag(s) {unknown}; known: {', '.join(tag_ids)}",
                 OmegaConf.to_container(pos_weight))
        for tag in pos_weight:
            positive_at(cfg, f"trainer.pos_weight.{tag}")
    else:
        require(pos_weight in (None, "auto"), "trainer.pos_weight", "must be null, 'auto' or {tag: weight}", pos_weight)
    require(t.resume in (None, "auto") or Path(t.resume).is_dir(), "trainer.resume",
             "must be null, 'auto' or an existing state directory", t.resume)
    require(cfg.export.dtype in EXPORT_DTYPES, "export.dtype", f"must be one of {EXPORT_DTYPES}", cfg.export.dtype)
    require(isinstance(cfg.export.review_size, int) and cfg.export.review_size >= 0, "export.review_size",
             "must be an integer >= 0", cfg.export.review_size)
    validate_label(cfg)


def _check_gold_train(gold_train) -> None:
    require(gold_train is None or isinstance(gold_train, (str, DictConfig)), "data.gold_train",
            "must be a file, null, or {name: file or null}", gold_train)
    named = gold_train.items() if isinstance(gold_train, DictConfig) else [("", gold_train)]
    for name, path in named:
        key = f"data.gold_train.{name}" if name else "data.gold_train"
        require(path is None or isinstance(path, str), key, "must be a file or null", path)
        require(path is None or Path(path).is_file(), key, "file not found", path)
