"""The checkpoint format, one owner: what a checkpoint directory holds, how it is written (whole or not
at all) and what is checked when it is read. A plain transformers model directory (config.json,
model.safetensors, tokenizer) plus:

    thresholds.json   per-tag decision thresholds, in taxonomy order
    taxonomy.yaml     the tags: ids, names, descriptions, keywords, arXiv categories
    rules.json        the rule blend (optional: without it the model alone ships)
    README.md         the model card (`checkpoint.card`)
    model.onnx, model_quantized.onnx   ONNX graphs (`checkpoint.onnx_export`), tied to the weights by hash

A new file in the checkpoint is one change here (and in `checkpoint.export`, which writes a whole
checkpoint with these functions). Imports data and labeling; never torch, so the ONNX path can read a
checkpoint without it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from abstract_tagger.data.taxonomy import Taxonomy
from abstract_tagger.labeling.rule_blend import RuleBlend

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
THRESHOLDS_FILE = "thresholds.json"
TAXONOMY_FILE = "taxonomy.yaml"
RULES_FILE = "rules.json"
CARD_FILE = "README.md"
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model_quantized.onnx"
# An ONNX graph's metadata key for the SHA-256 of the model.safetensors it reads its weights from.
WEIGHTS_DIGEST_KEY = "abstract_tagger.safetensors_sha256"
# What marks a directory as an exported checkpoint (a user's output must not land in one).
MARKER_FILES = (CONFIG_FILE, THRESHOLDS_FILE)
# What tokenizers report as model_max_length when none was saved.
_NO_LENGTH_LIMIT = 1 << 30


def swap_in(tmp: Path, dest: Path) -> None:
    """Move the finished folder `tmp` to `dest` by renames (the old `dest` set aside, then removed), so a
    reader sees the old folder or the new one, never a half-written one."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded safely, naming what is wrong with it."""


_REQUIRED_FILES = {
    CONFIG_FILE: "model config",
    TOKENIZER_FILE: "fast tokenizer",
    THRESHOLDS_FILE: "per-tag thresholds",
}


def check_checkpoint(path: str | Path) -> Path:
    """Fail early, naming every missing piece, instead of deep inside `from_pretrained`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    missing = [f"{name} ({what})" for name, what in _REQUIRED_FILES.items() if not (path / name).is_file()]
    if not any((path / name).is_file() for name in (WEIGHTS_FILE, f"{WEIGHTS_FILE}.index.json")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise CheckpointError(
                f"{path}: has only pickle weights ({', '.join(pickles)}), which can run arbitrary code when "
                "loaded; only model.safetensors is accepted (re-save with save_pretrained where you trust the file)"
            )
        missing.append(f"{WEIGHTS_FILE} (weights)")
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    check_lengths(path)
    return path


def read_json(path: Path, kind: type = dict) -> Any:
    """A checkpoint's JSON file, which must hold a `kind`; CheckpointError naming it otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                              f"got {type(value).__name__}")
    return value


def check_lengths(path: Path) -> None:
    """config.json must have room for every token the tokenizer keeps: a smaller max_position_embeddings
    made the ONNX path cut every input short (torch refuses it only through the weights' shapes)."""
    config = read_json(path / CONFIG_FILE)
    positions = config.get("max_position_embeddings")
    tokenizer_config = read_json(path / TOKENIZER_CONFIG_FILE) if (path / TOKENIZER_CONFIG_FILE).is_file() else {}
    limit = tokenizer_config.get("model_max_length")
    if not isinstance(positions, int) or isinstance(positions, bool) or positions <= 0:
        raise CheckpointError(f"{path / 'config.json'}: max_position_embeddings must be a positive integer, "
                              f"got {positions!r}")
    if isinstance(limit, int) and limit < _NO_LENGTH_LIMIT and limit > positions:
        raise CheckpointError(f"{path / 'config.json'}: max_position_embeddings={positions} is below the "
                              f"tokenizer's model_max_length={limit} (tokenizer_config.json): inputs would be cut "
                              "to fewer tokens than the model was trained on")


def check_thresholds(thresholds: Mapping[str, Any], tag_ids: Sequence[str]) -> None:
    """A number in [0, 1] for every tag; CheckpointError naming thresholds.json otherwise."""
    missing = sorted(set(tag_ids) - set(thresholds))
    if missing:
        raise CheckpointError(f"{THRESHOLDS_FILE} has no threshold for {missing}")
    # `not 0 <= v <= 1` also catches NaN, which every comparison fails.
    bad = {t: thresholds[t] for t in tag_ids if isinstance(thresholds[t], bool)
           or not isinstance(thresholds[t], int | float) or not 0 <= thresholds[t] <= 1}
    if bad:
        raise CheckpointError(f"{THRESHOLDS_FILE}: thresholds must be numbers in [0, 1], got {bad}")


def load_thresholds(path: str | Path, tag_ids: Sequence[str]) -> dict[str, float]:
    thresholds = read_json(Path(path) / THRESHOLDS_FILE)
    check_thresholds(thresholds, tag_ids)
    return {t: float(thresholds[t]) for t in tag_ids}


def load_taxonomy(path: str | Path) -> Taxonomy:
    return Taxonomy.from_config(yaml.safe_load((Path(path) / TAXONOMY_FILE).read_text(encoding="utf-8")))


def save_rules(blend: RuleBlend, directory: str | Path) -> None:
    (Path(directory) / RULES_FILE).write_text(json.dumps(blend.to_dict(), indent=1) + "\n", encoding="utf-8")


def load_rules(directory: str | Path, tag_ids: Sequence[str]) -> RuleBlend | None:
    """The checkpoint's rule blend, or None for a checkpoint without one (the model alone)."""
    path = Path(directory) / RULES_FILE
    if not path.is_file():
        return None
    try:
        return RuleBlend.from_dict(json.loads(path.read_text(encoding="utf-8")), tag_ids)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: bad {RULES_FILE}: {e}") from None


def save_thresholds(thresholds: Mapping[str, float], taxonomy: Taxonomy, directory: Path) -> None:
    if list(thresholds) != taxonomy.ids:
        raise ValueError(f"thresholds must cover the taxonomy tags in order; got {list(thresholds)}")
    (directory / THRESHOLDS_FILE).write_text(json.dumps(dict(thresholds), indent=2) + "\n")


def save_taxonomy(taxonomy: Taxonomy, directory: Path) -> None:
    (directory / TAXONOMY_FILE).write_text(yaml.safe_dump(taxonomy.to_dict(), sort_keys=False, allow_unicode=True))
