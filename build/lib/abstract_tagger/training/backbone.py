"""Backbone loading: a pretrained encoder with a fresh multi-label head, the bundled MiniLM as the
offline fallback, or a tiny randomly initialised BERT for tests."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from abstract_tagger.common.bundled import describe, resolve_path

log = logging.getLogger(__name__)

class BackboneUnavailable(RuntimeError):
    """The configured backbone cannot be loaded and no fallback is configured."""


@dataclass
class Backbone:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what was actually loaded: a Hub id or a local path
    fell_back: bool = False
    # Model settings (max_length, lr, head_lr) the fallback trains with instead of the primary's.
    settings: Mapping[str, Any] = field(default_factory=dict)


def _head_kwargs(tag_ids: list[str]) -> dict[str, Any]:
    return {
        "num_labels": len(tag_ids),
        "problem_type": "multi_label_classification",
        "id2label": dict(enumerate(tag_ids)),
        "label2id": {t: i for i, t in enumerate(tag_ids)},
    }


def _load_pretrained(path: str, tag_ids: list[str], **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForSequenceClassification.from_pretrained(path, **_head_kwargs(tag_ids), **kwargs)
    return model, tokenizer


def _load_from_hub_or_cache(name: str, tag_ids: list[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Local dir or Hub cache first; the Hub only when it answers. Without the probe, transformers
    retries an unreachable Hub for ~50 s before giving up."""
    if Path(name).is_dir():
        return _load_pretrained(name, tag_ids)
    if Path(name).is_absolute() or name.startswith((".", "~")):
        raise OSError(f"no such directory: {name}")
    try:
        return _load_pretrained(name, tag_ids, local_files_only=True)
    except OSError as cached_error:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise OSError(f"not in the local cache and HF_HUB_OFFLINE is set ({cached_error})") from None
    import huggingface_hub

    try:
        huggingface_hub.model_info(name, timeout=5)
    except Exception as e:  # any failure (no network, unknown repo, auth) means: not loadable from the Hub
        raise OSError(f"Hub unreachable or repo missing: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return _load_pretrained(name, tag_ids)


def _tiny_bert(tokenizer_path: str, tag_ids: list[str], arch: Mapping[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = BertConfig(vocab_size=len(tokenizer), **dict(arch), **_head_kwargs(tag_ids))
    return BertForSequenceClassification(config), tokenizer


def load_backbone(model_cfg: Mapping[str, Any], tag_ids: list[str]) -> Backbone:
    """Load `model_cfg.name_or_path`; where that fails, warn once and load `model_cfg.fallback`.

    With `model_cfg.random_init` set (a BertConfig dict), build a randomly initialised BERT of that
    shape that reuses the tokenizer at `name_or_path`.
    """
    name = resolve_path(model_cfg["name_or_path"])
    if model_cfg.get("random_init"):
        model, tokenizer = _tiny_bert(name, tag_ids, model_cfg["random_init"])
        return Backbone(model, tokenizer, source=f"random init ({name} tokenizer)")
    try:
        model, tokenizer = _load_from_hub_or_cache(name, tag_ids)
        return Backbone(model, tokenizer, source=describe(model_cfg["name_or_path"]))
    except OSError as e:
        fallback = model_cfg.get("fallback")
        if isinstance(fallback, str):
            fallback = {"name_or_path": fallback}
        if not fallback:
            raise BackboneUnavailable(
                f"model.name_or_path={model_cfg['name_or_path']!r} cannot be loaded ({e}) and "
                "model.fallback is null; set model.name_or_path to a local copy or set model.fallback"
            ) from None
        settings = {k: v for k, v in fallback.items() if k != "name_or_path"}
        fallback_path = resolve_path(fallback["name_or_path"])
        log.warning("backbone %r unavailable (%s); falling back to %s with %s",
                    model_cfg["name_or_path"], str(e).splitlines()[0][:200], fallback_path, settings or "the same settings")
        model, tokenizer = _load_pretrained(fallback_path, tag_ids)
        return Backbone(model, tokenizer, source=describe(fallback["name_or_path"]), fell_back=True, settings=settings)
