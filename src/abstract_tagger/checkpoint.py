"""The exported checkpoint: a plain transformers model directory plus thresholds, taxonomy and a
model card, written atomically so a reader never sees half a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from abstract_tagger.onnx_export import export_onnx
from abstract_tagger.rule_blend import RuleBlend
from abstract_tagger.taxonomy import Taxonomy

if TYPE_CHECKING:
    from abstract_tagger.pipeline import Evaluation

THRESHOLDS_FILE = "thresholds.json"
TAXONOMY_FILE = "taxonomy.yaml"


def swap_in(tmp: Path, dest: Path) -> None:
    """Move the finished folder `tmp` to `dest` by renames (the old `dest` set aside, then removed), so a
    reader sees the old folder or the new one, never a half-written one."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    thresholds: Mapping[str, float],
    taxonomy: Taxonomy,
    max_length: int,
    dtype: str = "float32",
    card: str = "",
    blend: RuleBlend | None = None,
) -> Path:
    """Write the checkpoint (with its ONNX graphs) to a temporary sibling directory, then rename it over
    `out_dir`. The model is cast to `dtype` in place."""
    out_dir = Path(out_dir)
    if list(thresholds) != taxonomy.ids:
        raise ValueError(f"thresholds must cover the taxonomy tags in order; got {list(thresholds)}")
    if model.config.problem_type != "multi_label_classification" or model.config.num_labels != len(taxonomy):
        raise ValueError("model head is not a multi-label head over the taxonomy tags")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Temporary and backup directories of an export that was killed (no cleanup ran) before this one.
    for stale in out_dir.parent.glob(f".{out_dir.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.to(getattr(torch, dtype)).save_pretrained(tmp)
        export_onnx(tmp)
        # pipeline() and predict truncate where training did.
        tokenizer.model_max_length = max_length
        tokenizer.save_pretrained(tmp)
        (tmp / THRESHOLDS_FILE).write_text(json.dumps(dict(thresholds), indent=2) + "\n")
        (tmp / TAXONOMY_FILE).write_text(yaml.safe_dump(taxonomy.to_dict(), sort_keys=False, allow_unicode=True))
        (tmp / "README.md").write_text(card)
        if blend is not None:
            blend.save(tmp)
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_thresholds(checkpoint_dir: str | Path) -> dict[str, float]:
    return json.loads((Path(checkpoint_dir) / THRESHOLDS_FILE).read_text())


# Model-card rows: (SetScores field, what it is).
_ROWS = (("weak", "weak labels (all labelling functions, 0.5)"),
         ("model_flat", "model alone, 0.5"),
         ("model", "model alone, policy thresholds"),
         ("shipped", "what predict.py ships"))


def _scores_table(evaluation: Evaluation) -> str:
    names = list(evaluation.sets)
    head = "| predictions | " + " | ".join(f"{n} micro | {n} macro" for n in names) + " |"
    rule = "|---|" + "---|---|" * len(names)
    rows = [f"| {label} | " + " | ".join(f"{getattr(evaluation.sets[n], field).micro_f1:.3f} | "
                                         f"{getattr(evaluation.sets[n], field).macro_f1:.3f}" for n in names) + " |"
            for field, label in _ROWS]
    return "\n".join([head, rule, *rows])


def _model_index(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Hub `model-index` results: what predict.py ships, on every gold set."""
    return [{"name": "abstract-tagger", "results": [
        {"task": {"type": "text-classification", "name": "Multi-label research-area tagging"},
         "dataset": {"type": "abstract-tagger-gold", "name": f"gold {name}", "split": name.split("/")[0]},
         "metrics": [{"type": "f1", "name": f"{avg}-F1", "value": round(getattr(s.shipped, f"{avg}_f1"), 4),
                      "args": {"average": avg}} for avg in ("micro", "macro")]}
        for name, s in evaluation.sets.items()]}]


def _hub_id(backbone: str) -> str:
    """The Hub id for `base_model`: the card's backbone name without its note ("... (bundled with ...)")."""
    return backbone.split(" (", 1)[0]


def _self_training(training: Mapping[str, Any]) -> str:
    rounds = training.get("self_training_rounds") or 0
    if not rounds:
        return " (no self-training rounds)"
    w = training["self_training_model_weight"]
    return (f", then {rounds} self-training round(s) of {training['self_training_epochs']} epoch(s) on "
            f"{1 - w:g} x weak labels + {w:g} x the model's own probabilities")


def _hand_labels(training: Mapping[str, Any]) -> str:
    n = training.get("hand_papers") or 0
    if not n:
        return ""
    weight = training.get("hand_weight", 1)
    return (f"\n- Hand labels: {n} training papers labelled by reading (the annotation rules of the gold sets;"
            f" none in a dev or test set) replace their weak labels as hard targets"
            + (f", counted {weight:g}x in the loss" if weight != 1 else "") + ".")


def _clean_phase(training: Mapping[str, Any]) -> str:
    epochs = training.get("clean_phase_epochs") or 0
    return f", then {epochs} epoch(s) on the hand-labelled papers alone" if epochs else ""


def model_card(
    *,
    backbone: str,
    corpus: Mapping[str, Any],
    labeling: Mapping[str, Any],
    evaluation: Evaluation,
    taxonomy: Taxonomy,
    training: Mapping[str, Any],
) -> str:
    """The README.md of the checkpoint, with Hub metadata (base model, license, model-index) in its header."""
    thresholds = evaluation.thresholds
    tags = "\n".join(f"| `{t.id}` | {t.name} | {thresholds[t.id]:.2f} |" for t in taxonomy.tags)
    lfs = ", ".join(f"`{n}`" for n in labeling.get("functions", [])) or "see lf_report.md in the run directory"
    sources = ", ".join(f"{name} ({n} papers)" for name, n in corpus.get("sources", {}).items())
    held_out = ", ".join(f"{name} ({n})" for name, n in corpus.get("held_out", {}).items())
    header = yaml.safe_dump({
        "library_name": "transformers", "pipeline_tag": "text-classification", "license": "apache-2.0",
        "base_model": _hub_id(backbone), "language": ["en"],
        "tags": ["multi-label-classification", "scientific-papers", "weak-supervision"],
        "model-index": _model_index(evaluation)}, sort_keys=False, allow_unicode=True)
    blend = (f"mixed with the rule functions' probabilities at weight {evaluation.blend_weight:g} "
             f"(`rules.json`; `predict.py` and `Tagger` apply it)" if evaluation.blend_weight else "alone (no rule blend)")
    candidates = ", ".join(f"{w:g}: {v:.3f}" for w, v in evaluation.blend_candidates.items())
    policies = ", ".join(f"{p}: {v:.3f}" for p, v in evaluation.policy_candidates.items())
    return f"""---
{header}---

# abstract-tagger

Tags a research-paper abstract (input: `"<title>. <abstract>"`) with {len(taxonomy)} research-area tags
(multi-label). Fine-tuned from **{backbone}** on weak labels.

## Training data

- Corpus: {sources}; {corpus.get('train', '?')} papers used for training. Held out (hand-labelled,
  never trained on): {held_out}.
- Targets: soft labels (probabilities) from a label model over labelling functions: {lfs}.
  Gold labels of the dev and test sets are never training targets.{_hand_labels(training)}
- Training: {training.get('epochs')} epoch(s) on the weak labels{_self_training(training)}{_clean_phase(training)};
  loss {training.get('loss', 'BCE')} (pos_weight {training.get('pos_weight')}); batch size
  {training.get('batch_size')}, max length {training.get('max_length')} tokens, learning rate {training.get('lr')}
  (head {training.get('head_lr')}), precision {training.get('precision')}, seed {training.get('seed')}.

## Evaluation

Every choice (rule-blend weight, threshold policy, thresholds) was made on the **dev** sets; the
**test** set was labelled before anything was tuned and never used to choose anything. Dev numbers
are {training.get('threshold_folds')}-fold cross-fitted (each paper scored with choices made on the other folds); test
numbers apply what was chosen on dev as is.

{_scores_table(evaluation)}

- Prediction: the model's sigmoid scores, {blend}, then per-tag thresholds.
  Blend weights tried (k-fold dev mean of micro and macro F1): {candidates}.
- Threshold policy: `{evaluation.threshold_policy}` (k-fold dev: {policies}).
- `thresholds.json` on the dev papers it was chosen on (in-sample, optimistic):
  micro-F1 {evaluation.dev_in_sample.micro_f1:.3f}, macro-F1 {evaluation.dev_in_sample.macro_f1:.3f}.

## Tags and thresholds

| tag | name | threshold |
|---|---|---|
{tags}

## How to use

```python
import json
from transformers import pipeline

clf = pipeline("text-classification", model="PATH", top_k=None)  # sigmoid scores for every tag
thresholds = json.load(open("PATH/thresholds.json"))
scores = clf("Title. Abstract ...")[0]
tags = [s["label"] for s in scores if s["score"] >= thresholds[s["label"]]]
```

This is the model alone. `from abstract_tagger import Tagger` (or `predict.py`) also applies the
rule blend of `rules.json`, which is what the "ships" row measures.

## Intended use and limitations

For triaging and organising machine-learning papers by area. The tags follow a fixed 18-tag
taxonomy (`taxonomy.yaml`); papers outside machine learning get unreliable scores. The targets are
weak labels, so systematic errors of the labelling functions are learned too; per-tag F1 on a few
gold papers is noisy. Inputs longer than {training.get('max_length')} tokens are truncated.
"""
