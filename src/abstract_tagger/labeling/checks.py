"""Start-up checks of label.py's settings (the `data` and `labeling` groups), which train.py runs too.
Imports common and labeling."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from abstract_tagger.common.config import existing_file, fraction_at, one_of, positive_at, require
from abstract_tagger.labeling.label_model import LABEL_MODELS


def _validate_data(cfg: DictConfig) -> None:
    """The `data` group, shared by train.py and label.py."""
    for name in cfg.data.sources:
        existing_file(cfg, f"data.sources.{name}.path")
    for split, named in cfg.data.gold.items():
        for name, path in (named or {}).items():
            require(path is None or Path(path).is_file(), f"data.gold.{split}.{name}", "file not found", path)
    one_of(cfg, "data.on_error", ("raise", "skip"))
    positive_at(cfg, "data.max_chars", integer=True)
    positive_at(cfg, "data.max_train_papers", integer=True, allow_none=True)


def validate_label(cfg: DictConfig) -> None:
    """label.py (and the weak-labelling part of train.py)."""
    _validate_data(cfg)
    one_of(cfg, "labeling.model", LABEL_MODELS)
    fraction_at(cfg, "labeling.threshold")
    one_of(cfg, "labeling.embedding.precision", ("auto", "bf16", "fp32"))
    for key in ("labeling.chunk_size", "labeling.fit_max_records"):
        positive_at(cfg, key, integer=True)
