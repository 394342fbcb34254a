"""The exported checkpoint: a plain transformers model directory plus thresholds, taxonomy and a
model card, written atomically so a reader never sees half a checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from abstract_tagger.taxonomy import Taxonomy

THRESHOLDS_FILE = "thresholds.json"
TAXONOMY_FILE = "taxonomy.yaml"


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
) -> Path:
    """Write the checkpoint to a temporary sibling directory, then rename it over `out_dir`.
    The model is cast to `dtype` in place."""
    out_dir = Path(out_dir)
    if list(thresholds) != taxonomy.ids:
        raise ValueError(f"thresholds must cover the taxonomy tags in order; got {list(thresholds)}")
    if model.config.problem_type != "multi_label_classification" or model.config.num_labels != len(taxonomy):
        raise ValueError("model head is not a multi-label head over the taxonomy tags")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.to(getattr(torch, dtype)).save_pretrained(tmp)
        # pipeline() and predict truncate where training did.
        tokenizer.model_max_length = max_length
        tokenizer.save_pretrained(tmp)
        (tmp / THRESHOLDS_FILE).write_text(json.dumps(dict(thresholds), indent=2) + "\n")
        (tmp / TAXONOMY_FILE).write_text(yaml.safe_dump(taxonomy.to_dict(), sort_keys=False, allow_unicode=True))
        (tmp / "README.md").write_text(card)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_thresholds(checkpoint_dir: str | Path) -> dict[str, float]:
    return json.loads((Path(checkpoint_dir) / THRESHOLDS_FILE).read_text())


def _metrics_row(name: str, m: Mapping[str, Any]) -> str:
    return f"| {name} | {m['micro_f1']:.3f} | {m['macro_f1']:.3f} |"


def model_card(
    *,
    backbone: str,
    corpus: Mapping[str, Any],
    labeling: Mapping[str, Any],
    dev: Mapping[str, Mapping[str, Any]],
    thresholds: Mapping[str, float],
    taxonomy: Taxonomy,
    training: Mapping[str, Any],
) -> str:
    """The README.md of the checkpoint. `dev` maps a row name ("weak labels, 0.5", ...) to metrics."""
    tags = "\n".join(f"| `{t.id}` | {t.name} | {thresholds[t.id]:.2f} |" for t in taxonomy.tags)
    rows = "\n".join(_metrics_row(name, m) for name, m in dev.items())
    lfs = ", ".join(f"`{n}`" for n in labeling.get("functions", [])) or "see lf_report.md in the run directory"
    sources = ", ".join(f"{name} ({n} papers)" for name, n in corpus.get("sources", {}).items())
    return f"""---
library_name: transformers
pipeline_tag: text-classification
tags: [multi-label-classification, scientific-papers, weak-supervision]
---

# abstract-tagger

Tags a research-paper abstract (input: `"<title>. <abstract>"`) with {len(taxonomy)} research-area tags
(multi-label). Fine-tuned from **{backbone}** on weak labels.

## Training data

- Corpus: {sources}; {corpus.get('train', '?')} papers used for training, the {corpus.get('dev', '?')}
  hand-labelled gold-dev papers held out.
- Targets: soft labels (probabilities) from a label model over labelling functions: {lfs}.
  Gold labels are never training targets; they only tune thresholds and score.
- Training: {training.get('epochs')} epochs, batch size {training.get('batch_size')}, max length
  {training.get('max_length')} tokens, learning rate {training.get('lr')} (head {training.get('head_lr')}),
  precision {training.get('precision')}, seed {training.get('seed')}.

## Evaluation on gold dev ({corpus.get('dev', '?')} papers)

"Tuned" rows use per-tag thresholds chosen by {training.get('threshold_folds')}-fold cross-fitting: each paper is scored with
thresholds tuned on the other folds, so the number is not tuned on the papers it scores. The
"shipped thresholds" row applies `thresholds.json` (tuned on all of dev) to the same papers: it is
what `predict.py` gives on gold dev, and it is optimistic for new papers.

| predictions | micro-F1 | macro-F1 |
|---|---|---|
{rows}

## Tags and thresholds

The shipped thresholds (`thresholds.json`) are tuned on all of gold dev.

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

or `from abstract_tagger import Tagger` (batch tagging with the thresholds applied).

## Intended use and limitations

For triaging and organising machine-learning papers by area. The tags follow a fixed 18-tag
taxonomy (`taxonomy.yaml`); papers outside machine learning get unreliable scores. The targets are
weak labels, so systematic errors of the labelling functions are learned too; the gold dev set is
small (per-tag F1 on a few papers is noisy) and thresholds tuned on it carry that noise.
Inputs longer than {training.get('max_length')} tokens are truncated.
"""
