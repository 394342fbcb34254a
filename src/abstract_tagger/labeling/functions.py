"""Labelling functions: each reads a chunk of papers and votes, for every tag, positive (1),
negative (0) or abstain (-1). A vote matrix has shape [papers, functions, tags].

Functions vote negative only where the absence of evidence is itself evidence (no keyword of the
tag anywhere in the paper, or a paper far from the tag in embedding space); everywhere else they
abstain, so that the label model is not taught that "no rule fired" means "certainly not".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from abstract_tagger.data.corpus import Paper
from abstract_tagger.data.taxonomy import Taxonomy

ABSTAIN, NEGATIVE, POSITIVE = -1, 0, 1


class PatternIndex:
    """Every tag's regexes for one field (title or abstract): which occur in a lowercased text.

    Scanning 1,000 characters with an alternation of ~20 patterns for each of 18 tags costs about
    1 ms in Python's `re`, which tries every alternative at every word boundary. Instead each
    top-level branch of a pattern is searched on its own, as a regex that starts with the branch's
    leading literal ("quanti" for `quanti[sz]\\w+`), which `re` finds with a fast substring scan
    (the word boundary before it is a lookbehind placed after the literal so as not to hide it).
    A branch that opens with a group is first spelled out (`(?:llm|web) agents?` as `llm agents?`
    and `web agents?`), so that nearly every branch opens with a literal. A branch is searched only
    if some word of the text starts with its literal's first 4 characters (all of it, if shorter:
    "kv" for `kv[- ]cache`); the few without a literal are searched in every text. Searching the
    ~70 branches an index with short literals or a leading group in every text took the rule votes
    of 5,000 abstracts (title and abstract) to 1.64-1.73 s, against 1.06-1.08 s gated (2-core Intel
    Xeon with AMX, three alternating runs).

    A gated group of branches is compiled when a text first has its prefix: compiling all ~1,100
    branches of the title and abstract indexes took 0.15 s of a checkpoint's load, most of the
    time to a first tag, while a batch of abstracts reaches a fraction of them. Every pattern is
    still compiled whole here, so that a bad one fails at load, naming its owner (and a branch compiles
    whenever its whole pattern does: one that refers to another branch is never split).
    """

    def __init__(self, patterns: Sequence[Sequence[str]], owners: Sequence[str]):
        self.n_tags = len(patterns)
        self.gated: dict[str, list[tuple[int, int, str]]] = {}
        self.compiled: dict[str, list[tuple[int, int, re.Pattern[str]]]] = {}  # gated groups seen so far
        always: list[tuple[int, int, str]] = []
        for t, (tag_patterns, owner) in enumerate(zip(patterns, owners)):
            for i, pattern in enumerate(tag_patterns):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{owner}: bad regex {pattern!r}: {e}") from None
                if _CROSS_BRANCH.search(pattern):
                    # A backreference or conditional may point into another branch: searched whole,
                    # where its groups keep their numbers.
                    always.append((t, i, f"\\b(?:{pattern})\\b"))
                    continue
                for branch in (b for top in split_branches(pattern) for b in spell_out_leading_group(top)):
                    key = leading_literal(branch)
                    source = f"{key}(?<!\\w{key}){branch[len(key):]}\\b" if key else f"\\b(?:{branch})\\b"
                    if key:
                        self.gated.setdefault(key[:PREFIX_CHARS], []).append((t, i, source))
                    else:
                        always.append((t, i, source))
        self.always = [(t, i, _regex(source)) for t, i, source in always]
        self.prefixes = frozenset(self.gated)
        self.short_lengths = sorted({len(p) for p in self.prefixes if len(p) < PREFIX_CHARS})

    def counts(self, text: str) -> list[int]:
        """How many distinct patterns of each tag occur in `text` (lowercased)."""
        found: set[tuple[int, int]] = set()
        heads = set(_WORD_HEAD.findall(text))  # each word's first 4 letters or digits (all, if fewer)
        heads.update([head[:n] for head in heads for n in self.short_lengths])
        for prefix in self.prefixes.intersection(heads):
            group = self.compiled.get(prefix)
            if group is None:
                group = self.compiled[prefix] = [(t, i, _regex(source)) for t, i, source in self.gated[prefix]]
            found.update((t, i) for t, i, rx in group if (t, i) not in found and rx.search(text))
        found.update((t, i) for t, i, rx in self.always if (t, i) not in found and rx.search(text))
        counts = [0] * self.n_tags
        for t, _ in found:
            counts[t] += 1
        return counts


_CROSS_BRANCH = re.compile(r"\\[1-9]|\(\?P=|\(\?\(")  # a backreference (\1, (?P=name)) or a conditional (?(1)...)

# One compiled regex per source for the process: `re`'s own cache holds 512, fewer than a taxonomy's
# patterns and branches, so it would compile them again for every index built.
_regex = functools.cache(re.compile)


PREFIX_CHARS = 4
_WORD_HEAD = re.compile(r"\b[a-z0-9]{1,%d}" % PREFIX_CHARS)
_LITERAL = re.compile(r"[a-z0-9]+")


def _structure(pattern: str) -> Iterator[tuple[int, str, int]]:
    """(index, character, group depth) of each character of a (valid) regex outside escapes, classes
    and comments; a group's parentheses count as inside it."""
    depth, i = 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
        elif c == "[":
            # A "]" first in a class (after an optional "^") is a literal: `[](]` is one class.
            i += 1 + (pattern[i + 1:i + 2] == "^")
            i += pattern[i:i + 1] == "]"
            while pattern[i:i + 1] not in ("]", ""):
                i += 2 if pattern[i] == "\\" else 1
            i += 1
        elif pattern.startswith("(?#", i):
            i = pattern.index(")", i) + 1  # a comment ends at its first ")"
        else:
            depth += c == "("
            yield i, c, depth
            depth -= c == ")"
            i += 1


def split_branches(pattern: str) -> list[str]:
    """Split a regex at its top-level `|` (not inside groups, classes or escapes)."""
    cuts = [i for i, c, depth in _structure(pattern) if c == "|" and depth == 0]
    return [pattern[start + 1:end] for start, end in zip([-1, *cuts], [*cuts, len(pattern)])]


def spell_out_leading_group(branch: str) -> list[str]:
    """A branch that opens with a non-capturing group, `(?:a|b)c` or optional `(?:a)?c`, as the branches
    it stands for (`ac`, `bc`; `ac`, `c`), recursively, so that each opens with a literal. A search finds
    one of them exactly where it finds the branch. Any other branch (a group repeated by `*`, `+`, `{}` or
    possessively optional, a capturing one) comes back as it is."""
    if not branch.startswith("(?:"):
        return [branch]
    end = next((i for i, c, depth in _structure(branch) if c == ")" and depth == 1), None)
    if end is None:  # not a group this reader understands: searched as it is, which is always right
        return [branch]
    alternatives, rest = split_branches(branch[3:end]), branch[end + 1:]
    if rest[:1] in ("*", "+", "{") or rest[:2] == "?+":
        return [branch]
    if rest[:1] == "?":
        alternatives.append("")
        rest = rest[2:] if rest[1:2] == "?" else rest[1:]
    # An empty group at the seam, so that the two halves cannot read as one token: `a{` + `2}` would
    # be a repeat, `\0` + `1` the escape `\01`.
    return [b for alternative in alternatives
            for b in spell_out_leading_group(f"{alternative}(?:){rest}" if alternative and rest else alternative + rest)]


def leading_literal(branch: str) -> str:
    """The letters and digits every match of `branch` starts with."""
    m = _LITERAL.match(branch)
    literal = m.group(0) if m else ""
    if branch[len(literal):len(literal) + 1] in ("?", "*", "+", "{"):
        # The last character is optional or repeated: the search regex puts a lookbehind after the
        # literal, where a quantifier would repeat the lookbehind instead (`ab+c` found only "abc").
        literal = literal[:-1]
    return literal


class KeywordFunctions:
    """Two functions from the taxonomy's `keywords`: `patterns` (regexes matched in title and
    abstract, lowercase, as whole words) and `title_patterns` (phrasings that only mean the topic
    in a title, e.g. "dataset").

    `keyword_title`: one pattern in the title votes positive (titles name the topic).
    `keyword_abstract`: `min_abstract_hits` distinct patterns in the abstract vote positive (so
    "benchmark" and "benchmarks" count once); no match in title or abstract votes negative;
    fewer matches abstain.
    """

    names = ("keyword_title", "keyword_abstract")

    def __init__(self, taxonomy: Taxonomy, min_abstract_hits: int):
        owners = [f"taxonomy.tags.{t.id}.keywords" for t in taxonomy.tags]
        patterns = [list(t.keywords.get("patterns", ())) for t in taxonomy.tags]
        self.abstract = PatternIndex(patterns, owners)
        self.title = PatternIndex([p + list(t.keywords.get("title_patterns", ()))
                                   for p, t in zip(patterns, taxonomy.tags)], owners)
        self.min_hits = np.array([t.keywords.get("min_abstract_hits", min_abstract_hits) for t in taxonomy.tags])

    def __call__(self, papers: Sequence[Paper]) -> np.ndarray:
        in_title = np.array([self.title.counts(p.title.lower()) for p in papers], dtype=np.int64) > 0
        hits = np.array([self.abstract.counts(p.abstract.lower()) for p in papers], dtype=np.int64)
        votes = np.full((len(papers), len(self.names), len(self.min_hits)), ABSTAIN, dtype=np.int8)
        votes[:, 0][in_title] = POSITIVE
        votes[:, 1][(hits == 0) & ~in_title] = NEGATIVE
        votes[:, 1][hits >= self.min_hits] = POSITIVE
        return votes


class ArxivFunction:
    """`arxiv`: a paper listed in a category mapped to a tag votes positive; otherwise abstain
    (most ML papers sit in cs.LG whatever their topic, so a missing category says little).
    A mapping entry matches the category itself or, ending without a dot, its archive
    ("q-bio" matches "q-bio.QM")."""

    names = ("arxiv",)

    def __init__(self, taxonomy: Taxonomy):
        self.exact: dict[str, list[int]] = {}
        self.archive: dict[str, list[int]] = {}
        for t, tag in enumerate(taxonomy.tags):
            for cat in tag.arxiv:
                (self.exact if "." in cat else self.archive).setdefault(cat, []).append(t)
        self.n_tags = len(taxonomy)

    def __call__(self, papers: Sequence[Paper]) -> np.ndarray:
        votes = np.full((len(papers), 1, self.n_tags), ABSTAIN, dtype=np.int8)
        for row, paper in enumerate(papers):
            for cat in paper.categories:
                for t in self.exact.get(cat, ()):
                    votes[row, 0, t] = POSITIVE
                for t in self.archive.get(cat.split(".", 1)[0], ()):
                    votes[row, 0, t] = POSITIVE
        return votes


class EmbeddingFunction:
    """`embedding`: zero-shot similarity between the paper and the tag's description and
    prototype phrases (the best-matching one counts). At or above the tag's `positive` margin it
    votes positive, below its `negative` margin negative, in between it abstains. Margins differ
    per tag because similarity scales do: a focused description ("satellite imagery") scores
    lower on its papers than a broad one ("language models")."""

    names = ("embedding",)

    def __init__(self, taxonomy: Taxonomy, encoder: Any, margins: Mapping[str, Any]):
        self.encoder = encoder
        phrases, owner = [], []
        for t, tag in enumerate(taxonomy.tags):
            for phrase in (f"{tag.name}: {tag.description}", *tag.prototypes):
                phrases.append(phrase)
                owner.append(t)
        self.phrase_vectors = encoder.encode(phrases)
        self.owner = np.asarray(owner)
        self.n_tags = len(taxonomy)
        per_tag = margins.get("per_tag") or {}
        unknown = sorted(set(per_tag) - set(taxonomy.ids))
        if unknown:
            raise ValueError(f"labeling.embedding.margins.per_tag: unknown tag(s) {unknown}")

        def margin(kind: str, never: float) -> np.ndarray:
            # null: this tag's description is no evidence either way, so never vote that polarity.
            values = [per_tag.get(t, {}).get(kind, margins[kind]) for t in taxonomy.ids]
            return np.array([never if v is None else v for v in values], dtype=np.float32)

        self.positive = margin("positive", np.inf)
        self.negative = margin("negative", -np.inf)

    def similarities(self, papers: Sequence[Paper]) -> np.ndarray:
        """[papers, tags] cosine similarity to each tag's closest phrase."""
        sims = self.encoder.encode([p.text for p in papers]) @ self.phrase_vectors.T
        best = np.full((len(papers), self.n_tags), -1.0, dtype=np.float32)
        np.maximum.at(best.T, self.owner, sims.T)
        return best

    def __call__(self, papers: Sequence[Paper]) -> np.ndarray:
        sims = self.similarities(papers)
        votes = np.full(sims.shape, ABSTAIN, dtype=np.int8)
        votes[sims >= self.positive] = POSITIVE
        votes[sims < self.negative] = NEGATIVE
        return votes[:, None, :]


class LabelingFunctions:
    """The configured functions, applied together: `names` lists one name per vote column."""

    def __init__(self, functions: Sequence[Any]):
        self.functions = list(functions)
        self.names = [name for f in self.functions for name in f.names]

    def __call__(self, papers: Sequence[Paper]) -> np.ndarray:
        return np.concatenate([f(papers) for f in self.functions], axis=1)


# The labelling functions by the name `labeling.functions` lists them under: name -> builder(taxonomy,
# labeling config, encoder factory). A new function is one class and one entry here (and its settings,
# if any, in conf/labeling/).
FUNCTIONS: dict[str, Callable[[Taxonomy, Mapping[str, Any], Callable[[], Any]], Any]] = {
    "keywords": lambda taxonomy, cfg, encoder: KeywordFunctions(taxonomy, cfg["keywords"]["min_abstract_hits"]),
    "arxiv": lambda taxonomy, cfg, encoder: ArxivFunction(taxonomy),
    "embedding": lambda taxonomy, cfg, encoder: EmbeddingFunction(taxonomy, encoder(), cfg["embedding"]["margins"]),
}


def build_functions(taxonomy: Taxonomy, cfg: Mapping[str, Any], encoder_factory: Any = None) -> LabelingFunctions:
    """`cfg` is `labeling`: its `functions`, in the order they vote. `encoder_factory()` builds the
    sentence encoder, only when the embedding function is enabled (rule-only runs never load torch
    models)."""
    enabled = list(cfg["functions"])
    unknown = sorted(set(enabled) - set(FUNCTIONS))
    if unknown:
        raise ValueError(f"labeling.functions: unknown function(s) {unknown}; use {', '.join(FUNCTIONS)}")
    if len(set(enabled)) < len(enabled):
        raise ValueError(f"labeling.functions: {enabled} names a function twice")
    return LabelingFunctions([FUNCTIONS[name](taxonomy, cfg, encoder_factory) for name in enabled])
