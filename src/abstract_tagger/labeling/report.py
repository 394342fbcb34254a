"""The labelling-function report: coverage, overlap and conflict of every function on every tag
(snorkel's `LFAnalysis`), and, on the gold dev papers, precision / recall / F1 of every function
and of both label models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from abstract_tagger.labeling.functions import POSITIVE
from abstract_tagger.thresholds import score


def function_stats(votes: np.ndarray, names: Sequence[str], tag_ids: Sequence[str]) -> dict[str, Any]:
    """{function: {tag: {coverage, overlap, conflict, positive}}} over the papers in `votes`."""
    from snorkel.labeling import LFAnalysis

    out: dict[str, dict[str, dict[str, float]]] = {n: {} for n in names}
    for t, tag in enumerate(tag_ids):
        analysis = LFAnalysis(votes[:, :, t])
        columns = zip(analysis.lf_coverages(), analysis.lf_overlaps(), analysis.lf_conflicts(),
                      (votes[:, :, t] == POSITIVE).mean(axis=0))
        for name, (cov, ovl, con, pos) in zip(names, columns):
            out[name][tag] = {"coverage": float(cov), "overlap": float(ovl), "conflict": float(con),
                              "positive": float(pos)}
    return out


def gold_report(votes: np.ndarray, probs: Mapping[str, np.ndarray], gold: np.ndarray, names: Sequence[str],
                tag_ids: Sequence[str], threshold: float) -> dict[str, Any]:
    """Scores on the gold papers: `votes`, `gold` and each of `probs` are rows for those papers."""
    return {
        "n_papers": int(len(gold)),
        "functions": {name: score(votes[:, j, :] == POSITIVE, gold, tag_ids).to_dict()
                      for j, name in enumerate(names)},
        **{model: score(p >= threshold, gold, tag_ids).to_dict() for model, p in probs.items()},
    }


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def to_markdown(report: Mapping[str, Any]) -> str:
    names, tags = report["functions"], report["tag_ids"]
    lines = ["# Labelling-function report", "", f"Corpus: {report['corpus']['summary']}.",
             f"Label model in use: `{report['model']}`.", ""]
    for set_name, gold in report.get("gold", {}).items():
        lines += [f"## Gold dev: {set_name} ({gold['n_papers']} papers)", "", "| model | micro-F1 | macro-F1 |",
                  "|---|---|---|"]
        lines += [f"| {m} | {_fmt(gold[m]['micro_f1'])} | {_fmt(gold[m]['macro_f1'])} |"
                  for m in ("majority", "learned")]
        lines += ["", "Per tag: F1 of each function's positive votes, and P / R / F1 of the label models.", "",
                  "| tag | support | " + " | ".join(names) + " | majority F1 | learned P | learned R | learned F1 |",
                  "|---|---" + "|---" * len(names) + "|---|---|---|---|"]
        for tag in tags:
            learned = gold["learned"]["per_tag"][tag]
            cells = [str(learned["support"])] + [_fmt(gold["functions"][n]["per_tag"][tag]["f1"]) for n in names]
            cells += [_fmt(gold["majority"]["per_tag"][tag]["f1"]), _fmt(learned["precision"]),
                      _fmt(learned["recall"]), _fmt(learned["f1"])]
            lines.append(f"| {tag} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"## Coverage / overlap / conflict on the corpus ({report['n_fit']} papers)", "",
              "| tag | " + " | ".join(names) + " |", "|---" + "|---" * len(names) + "|"]
    for tag in tags:
        cells = []
        for n in names:
            s = report["function_stats"][n][tag]
            cells.append(f"{_fmt(s['coverage'])} / {_fmt(s['overlap'])} / {_fmt(s['conflict'])}")
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
