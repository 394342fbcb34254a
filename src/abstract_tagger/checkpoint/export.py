"""Writing a whole checkpoint from a trained model: the weights, the ONNX graphs, the tokenizer and every
file of the format (`checkpoint.format`), in a temporary sibling directory renamed over the old one.
Imports data, labeling, training and the rest of checkpoint; torch."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from abstract_tagger.checkpoint.format import CARD_FILE, save_rules, save_taxonomy, save_thresholds, swap_in
from abstract_tagger.checkpoint.onnx_export import export_onnx
from abstract_tagger.data.taxonomy import Taxonomy
from abstract_tagger.labeling.rule_blend import RuleBlend


def export_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    thresholds: Mapping[str, float],
    taxonomy: Taxonomy,
    calibration: Sequence[str],
    card: str = "",
    blend: RuleBlend | None = None,
) -> Path:
    """Write the checkpoint (with its ONNX graphs, the int8 one calibrated on the `calibration` texts) to
    a temporary sibling directory, then rename it over `out_dir`. The weights are written in the model's
    dtype (the caller casts it: `export.dtype`); the tokenizer with its `model_max_length` set to the
    length training read, where pipeline() and predict truncate (and the calibration does)."""
    out_dir = Path(out_dir)
    if model.config.problem_type != "multi_label_classification" or model.config.num_labels != len(taxonomy):
        raise ValueError("model head is not a multi-label head over the taxonomy tags")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Temporary and backup directories of an export that was killed (no cleanup ran) before this one.
    for stale in out_dir.parent.glob(f".{out_dir.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        # The format's own files first: a bad one fails before the weights and graphs are written.
        save_thresholds(thresholds, taxonomy, tmp)
        save_taxonomy(taxonomy, tmp)
        (tmp / CARD_FILE).write_text(card)
        if blend is not None:
            save_rules(blend, tmp)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        export_onnx(tmp, calibration)
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
