"""The labelling-function report: coverage, overlap and conflict of every function on every tag
(accumulated over the corpus in one pass), and, on the gold dev papers, precision / recall / F1 of every function
and of both label models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from abstract_tagger.labeling.functions import ABSTAIN, NEGATIVE, POSITIVE
from abstract_tagger.metrics import score


class FunctionStats:
    """Coverage, overlap, conflict and positive rate of every function on every tag, accumulated chunk
    by chunk over the whole corpus (snorkel's `LFAnalysis` definitions, which need the whole matrix):
    coverage = the function votes; overlap = it votes and another function does too; conflict = it
    votes and another function votes the other way."""

    def __init__(self, names: Sequence[str], tag_ids: Sequence[str]):
        self.names, self.tag_ids = list(names), list(tag_ids)
        self.n = 0
        self.counts = np.zeros((4, len(self.names), len(self.tag_ids)), dtype=np.int64)

    def add(self, votes: np.ndarray) -> None:
        """`votes`: [papers, functions, tags]."""
        voting = votes != ABSTAIN
        others = voting.sum(axis=1, keepdims=True) > 1
        # Binary votes: a paper has a conflict where both polarities occur on a tag.
        both = ((votes == POSITIVE).any(axis=1) & (votes == NEGATIVE).any(axis=1))[:, None, :]
        self.counts += np.stack([voting, voting & others, voting & both, votes == POSITIVE]).sum(axis=1)
        self.n += len(votes)

    def to_dict(self) -> dict[str, Any]:
        """{function: {tag: {coverage, overlap, conflict, positive}}}."""
        rates = self.counts / max(self.n, 1)
        return {name: {tag: dict(zip(("coverage", "overlap", "conflict", "positive"), map(float, rates[:, j, t])))
                       for t, tag in enumerate(self.tag_ids)} for j, name in enumerate(self.names)}


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
    lines += [f"## Coverage / overlap / conflict on the corpus ({report['n_papers']} papers)", "",
              "| tag | " + " | ".join(names) + " |", "|---" + "|---" * len(names) + "|"]
    for tag in tags:
        cells = []
        for n in names:
            s = report["function_stats"][n][tag]
            cells.append(f"{_fmt(s['coverage'])} / {_fmt(s['overlap'])} / {_fmt(s['conflict'])}")
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
