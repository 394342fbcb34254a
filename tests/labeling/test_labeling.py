"""Labelling functions on hand-written papers, the label models on synthetic votes with known
function accuracies, the embedding cache and the result cache key."""

from __future__ import annotations

import re

import numpy as np
import pytest
from omegaconf import OmegaConf

from abstract_tagger.data.corpus import Paper, read_seed_dump
from abstract_tagger.data.taxonomy import Taxonomy
from abstract_tagger.labeling.embedding import EmbeddingCache, SentenceEncoder, text_key
from abstract_tagger.labeling.functions import (
    ABSTAIN,
    NEGATIVE,
    POSITIVE,
    ArxivFunction,
    EmbeddingFunction,
    KeywordFunctions,
    PatternIndex,
    build_functions,
    split_branches,
    spell_out_leading_group,
)
from abstract_tagger.labeling.label_model import LearnedLabelModel, MajorityVote
from abstract_tagger.labeling.weak_labels import cache_key
from abstract_tagger.metrics import score


def paper(title: str, abstract: str = "We report experiments.", categories: tuple[str, ...] = ()) -> Paper:
    return Paper(id=title[:20], title=title, abstract=abstract, categories=categories)


@pytest.fixture(scope="module")
def labeling_cfg(root):
    return OmegaConf.to_container(OmegaConf.load(root / "conf/labeling/default.yaml"))


@pytest.fixture(scope="module")
def keywords(taxonomy, labeling_cfg):
    return KeywordFunctions(taxonomy, labeling_cfg["keywords"]["min_abstract_hits"])


def test_every_tag_has_evidence(taxonomy):
    for tag in taxonomy.tags:
        assert tag.keywords.get("patterns"), tag.id
        assert len(tag.prototypes) >= 3, tag.id


def test_keyword_title_votes_causal_inference(taxonomy, keywords):
    votes = keywords([paper("Causal effect estimation with instrumental variables")])
    c = taxonomy.index("causal-inference")
    assert votes[0, 0, c] == POSITIVE
    # No evidence for an unrelated tag anywhere in the paper: the abstract function says no.
    assert votes[0, 1, taxonomy.index("speech-audio")] == NEGATIVE
    assert votes[0, 0, taxonomy.index("speech-audio")] == ABSTAIN


def test_title_evidence_outweighs_abstract(taxonomy, keywords):
    c = taxonomy.index("speech-audio")
    in_title = paper("Robust speech recognition for children", "We fine-tune a pretrained model.")
    once_in_abstract = paper("Robust recognition for children", "We fine-tune a pretrained model on speech.")
    nowhere = paper("Robust recognition for children", "We fine-tune a pretrained model.")
    votes = keywords([in_title, once_in_abstract, nowhere])
    assert votes[:, :, c].tolist() == [[POSITIVE, ABSTAIN], [ABSTAIN, ABSTAIN], [ABSTAIN, NEGATIVE]]
    probs = MajorityVote().predict_proba(votes)[:, c]
    assert probs.tolist() == [1.0, 0.0, 0.0]
    # Two distinct abstract patterns are enough without the title.
    twice = paper("Robust recognition for children", "We fine-tune a pretrained model on speech and music audio.")
    assert keywords([twice])[0, :, c].tolist() == [ABSTAIN, POSITIVE]


def test_abstract_counts_distinct_patterns_not_inflections(taxonomy, keywords):
    e = taxonomy.index("evaluation-benchmarks")
    votes = keywords([paper("A method", "Our benchmark results beat benchmarks and benchmarking baselines.")])
    assert votes[0, 1, e] == ABSTAIN


def test_title_only_patterns_do_not_fire_in_the_abstract(taxonomy, keywords):
    e = taxonomy.index("evaluation-benchmarks")
    votes = keywords([paper("A dataset of annotated dialogues", "We collect dialogues."),
                      paper("Dialogue policies", "We train on a dataset of dialogues.")])
    assert votes[0, 0, e] == POSITIVE and votes[1, 0, e] == ABSTAIN


def test_causal_language_modelling_is_not_causal_inference(taxonomy, keywords):
    votes = keywords([paper("Causal language model pretraining at scale")])
    assert votes[0, 0, taxonomy.index("causal-inference")] == ABSTAIN


def test_pattern_index_counts_what_a_plain_search_of_each_pattern_finds(root, taxonomy, keywords):
    """The branch-wise, prefix-gated, lazily compiled search finds exactly the patterns a whole-word
    `re.search` of each pattern finds, on every tag's patterns and real abstracts."""
    texts = [p.abstract.lower() for p in read_seed_dump(root / "data/hf_papers_seed.txt")]
    # Loading compiles no gated branch: that is the load time a first tag waits for.
    assert not KeywordFunctions(taxonomy, 2).abstract.compiled
    for index, fields in ((keywords.abstract, ("patterns",)), (keywords.title, ("patterns", "title_patterns"))):
        for text in texts:
            expected = [sum(bool(re.search(rf"\b(?:{p})\b", text)) for f in fields for p in tag.keywords.get(f, ()))
                        for tag in taxonomy.tags]
            assert index.counts(text) == expected
        assert index.compiled


def test_short_literals_and_leading_groups_are_gated_and_still_found_exactly():
    """Literals of 1-3 characters are gated by the words' first characters, and branches opening with a
    group are spelled out into branches opening with literals: the counts stay those of a plain search,
    including at words that only look like a boundary (an underscore or a letter like é before them)."""
    patterns = [[r"kv[- ]cache", r"o1", r"3d"], [r"(?:llm|web) agents?", r"(?:human-)?annotated data"],
                [r"(?:a|b)+c", r"(?:x)?+y", r"(?:(?:deep|wide) )?nets?"], [r"q", r"rl(?:hf)?"]]
    index = PatternIndex(patterns, ["a", "b", "c", "d"])
    # Searched in every text: only the branches that cannot open with a literal (a repeated group).
    assert [(t, i) for t, i, _ in index.always] == [(2, 0), (2, 1)]
    texts = ["kv-cache for o1 and 3d", "_kv cache, éo1 x3d", "web agent and human-annotated data",
             "llm-agents annotated datas", "abac and xy, y", "deep nets", "wide net q", "rlhf", "a q-rl", "",
             "kv", "k", "o", "3"]
    for text in texts:
        expected = [sum(bool(re.search(rf"\b(?:{p})\b", text)) for p in tag) for tag in patterns]
        assert index.counts(text) == expected, text


@pytest.mark.parametrize("pattern, text", [
    ("ab+c", "abbc"), ("ab+?c", "abbc"), ("(?:y|x+)", "xx"), ("(?:x|ab+)c", "abbc"), ("(?:go+al|x)s", "gooals"),
    ("(?:a{|b)2}z", "aaz"), ("(?:a{|b)2}z", "a{2}z"), ("(?:x\\0|y)1", "x\x001"),
    ("(?:[](]a|b)c", "bc"), ("(?:[](]a|b)c", "(ac"), ("(?:[^]x]a|b)c", "yac"), ("(?:a(?#()|b)c", "ac"),
])
def test_quantified_literals_seams_and_odd_groups_count_as_a_plain_search(pattern, text):
    """Found by review: a quantifier after the literal repeated the lookbehind placed there (`ab+c`
    missed "abbc"); an alternative joined to the rest could read as one token (`a{` + `2}`, `\\0` + `1`);
    a class opening with "]" or a comment holding "(" crashed the index build."""
    index = PatternIndex([[pattern]], ["a"])
    assert index.counts(text) == [int(bool(re.search(rf"\b(?:{pattern})\b", text)))]
    assert index.counts("zzz") == [0]


def test_a_leading_group_is_spelled_out_only_where_that_keeps_the_matches():
    # `(?:)` at the seam keeps the halves apart (`a{` + `2}` is no repeat).
    assert spell_out_leading_group("(?:a|b)c") == ["a(?:)c", "b(?:)c"]
    assert spell_out_leading_group("(?:(?:human-)?annotated (?:data|corpus))") == [
        "human-(?:)annotated (?:data|corpus)", "annotated (?:data|corpus)"]
    assert spell_out_leading_group("(?:a(?:x|y)|b)??c") == ["a(?:x|y)(?:)c", "b(?:)c", "c"]
    for kept in ("(?:a|b)+c", "(?:a|b)*c", "(?:a|b){2}c", "(?:a)?+c", "(a|b)c", "x(?:a|b)", "(?i:a)b"):
        assert spell_out_leading_group(kept) == [kept]
    assert split_branches(r"a|b(c|d)|[|]x|\|y") == ["a", "b(c|d)", "[|]x", r"\|y"]


def test_a_pattern_whose_branches_refer_to_each_other_is_searched_whole():
    """Split at `|`, the second branch's \\2 would name a group it does not have (its own is group 1
    alone): compiled on first use, that failed in the middle of a file instead of at load."""
    index = PatternIndex([[r"(mono)lingual|(multi)modal and \2lingual"], ["modelling"]], ["a", "b"])
    assert index.counts("multimodal and multilingual modelling") == [1, 1]
    assert index.counts("a monolingual corpus") == [1, 0]
    assert index.counts("multimodal and monolingual") == [1, 0]
    assert index.counts("multimodal and bilingual") == [0, 0]


def test_a_bad_regex_fails_at_load_naming_its_tag(taxonomy):
    """Gated branches compile on first use, but a bad pattern is still refused when the functions are built."""
    data = {"tags": {t.id: {"name": t.name, "description": t.description, "keywords": dict(t.keywords),
                            "arxiv": list(t.arxiv)} for t in taxonomy.tags}}
    data["tags"]["nlp"]["keywords"]["patterns"] = [*data["tags"]["nlp"]["keywords"]["patterns"], "tokeni(sation"]
    with pytest.raises(ValueError, match=r"taxonomy.tags.nlp.keywords: bad regex 'tokeni\(sation'"):
        KeywordFunctions(Taxonomy.from_config(data), 2)


def test_arxiv_function_maps_categories(taxonomy):
    arxiv = ArxivFunction(taxonomy)
    votes = arxiv([paper("A", categories=("cs.CV", "cs.LG")), paper("B", categories=("q-bio.QM",)),
                   paper("C", categories=("cs.LG", "stat.ML")), paper("D")])
    assert votes.shape == (4, 1, len(taxonomy))
    assert np.flatnonzero(votes[0, 0] == POSITIVE).tolist() == [taxonomy.index("computer-vision")]
    assert votes[1, 0, taxonomy.index("health-biology")] == POSITIVE
    assert (votes[2:] == ABSTAIN).all()


class FakeEncoder:
    """Bag of words over a fixed vocabulary: similarity is word overlap, no model needed."""

    vocab = ["speech", "audio", "image", "causal", "effect"]

    def encode(self, texts):
        v = np.array([[t.lower().count(w) for w in self.vocab] for t in texts], dtype=np.float32) + 1e-3
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_embedding_margins_per_tag(taxonomy, labeling_cfg):
    margins = {"positive": 0.5, "negative": 0.2,
               "per_tag": {"speech-audio": {"positive": 0.9},
                           "evaluation-benchmarks": {"positive": None, "negative": None}}}
    f = EmbeddingFunction(taxonomy, FakeEncoder(), margins)
    sims = f.similarities([paper("speech audio speech"), paper("images")])
    votes = f([paper("speech audio speech"), paper("images")])
    s = taxonomy.index("speech-audio")
    assert sims[0, s] > 0.9 and votes[0, 0, s] == POSITIVE
    assert votes[1, 0, s] == NEGATIVE
    assert (votes[:, 0, taxonomy.index("evaluation-benchmarks")] == ABSTAIN).all()
    with pytest.raises(ValueError, match="unknown tag"):
        EmbeddingFunction(taxonomy, FakeEncoder(), {**margins, "per_tag": {"nope": {}}})


def test_build_functions_rejects_unknown_function(taxonomy, labeling_cfg):
    with pytest.raises(ValueError, match="unknown function"):
        build_functions(taxonomy, {**labeling_cfg, "functions": ["keywords", "oracle"]})
    with pytest.raises(ValueError, match="names a function twice"):
        build_functions(taxonomy, {**labeling_cfg, "functions": ["keywords", "keywords"]})
    rules = build_functions(taxonomy, {**labeling_cfg, "functions": ["keywords", "arxiv"]})
    assert rules.names == ["keyword_title", "keyword_abstract", "arxiv"]


def test_a_registered_function_votes_from_config(taxonomy, labeling_cfg, monkeypatch):
    """Adding a labelling function is one class and one registry entry: the config names it."""
    from abstract_tagger.labeling import functions

    class Everything:
        names = ["everything"]

        def __call__(self, papers):
            return np.full((len(papers), 1, len(taxonomy)), POSITIVE, dtype=np.int8)

    monkeypatch.setitem(functions.FUNCTIONS, "everything", lambda taxonomy, cfg, encoder: Everything())
    lfs = build_functions(taxonomy, {**labeling_cfg, "functions": ["arxiv", "everything"]})
    assert lfs.names == ["arxiv", "everything"]
    votes = lfs([Paper(id=str(i), title="A title", abstract="An abstract.") for i in range(3)])
    assert votes.shape == (3, 2, len(taxonomy)) and (votes[:, 1] == POSITIVE).all()


def synthetic_votes(n=4000, accuracies=(0.92, 0.85, 0.75, 0.7, 0.6), coverage=0.7, prior=0.3, seed=0):
    """Votes of conditionally independent functions with known accuracies on one tag."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prior
    votes = np.full((n, len(accuracies), 1), ABSTAIN, dtype=np.int8)
    for j, acc in enumerate(accuracies):
        fires = rng.random(n) < coverage
        right = rng.random(n) < acc
        votes[fires, j, 0] = np.where(right[fires], y[fires], ~y[fires]).astype(np.int8)
    return votes, y


def test_learned_label_model_recovers_accuracies_and_beats_majority(labeling_cfg):
    accuracies = (0.92, 0.85, 0.75, 0.7, 0.6)
    votes, y = synthetic_votes(accuracies=accuracies)
    model = LearnedLabelModel(labeling_cfg["label_model"]).fit(votes)
    estimated = np.array([model.accuracies()[0][j] for j in range(len(accuracies))])
    np.testing.assert_allclose(estimated, accuracies, atol=0.07)
    learned = (model.predict_proba(votes)[:, 0] >= 0.5) == y
    majority = (MajorityVote().predict_proba(votes)[:, 0] >= 0.5) == y
    assert learned.mean() > majority.mean() + 0.02


def test_learned_label_model_falls_back_to_majority_with_two_functions(labeling_cfg):
    votes, _ = synthetic_votes(n=200, accuracies=(0.9, 0.8))
    model = LearnedLabelModel(labeling_cfg["label_model"]).fit(votes)
    np.testing.assert_allclose(model.predict_proba(votes), MajorityVote().predict_proba(votes))


def test_an_unknown_label_model_is_refused_at_start_up(root):
    from hydra import compose, initialize_config_dir

    from abstract_tagger.common.config import ConfigError
    from abstract_tagger.labeling.checks import validate_label

    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        cfg = compose("label", overrides=["labeling.model=oracle"])
    with pytest.raises(ConfigError, match=r"^labeling.model='oracle': must be one of \('majority', 'learned'\)"):
        validate_label(cfg)


def test_score_micro_macro():
    gold = np.array([[1, 0], [1, 1], [0, 0]], dtype=bool)
    pred = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    s = score(pred, gold, ["a", "b"])
    assert s.per_tag["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert s.micro_f1 == pytest.approx(4 / 7) and s.macro_f1 == pytest.approx(7 / 12)


def test_embedding_cache_round_trip(tmp_path):
    cache = EmbeddingCache(tmp_path / "e")
    keys = [text_key("a"), text_key("b")]
    cache.add(keys, np.eye(2, dtype=np.float32))
    again = EmbeddingCache(tmp_path / "e")
    assert again.get([keys[1], text_key("c")])[0].tolist() == [0.0, 1.0]
    assert again.get([text_key("c")]) == [None]


def test_embedding_cache_keys_ending_in_nul_bytes_stay_aligned(tmp_path):
    """numpy S16 keys lost trailing NUL bytes: such a key was never found again, and after a reload
    every vector added later was stored under another text's key."""
    path = tmp_path / "e"
    keys = [b"k" * 15 + b"\0", b"\1" * 16, b"\0" * 16]
    EmbeddingCache(path).add(keys, np.eye(3, dtype=np.float32))
    cache = EmbeddingCache(path)
    assert [v.argmax() for v in cache.get(keys)] == [0, 1, 2]
    cache.add([b"\2" * 16], np.full((1, 3), 7, dtype=np.float32))
    reloaded = EmbeddingCache(path)
    assert reloaded.get([b"\2" * 16])[0].tolist() == [7.0, 7.0, 7.0]
    assert [v.argmax() for v in reloaded.get(keys)] == [0, 1, 2]


def test_embedding_cache_writers_merge_instead_of_losing_entries(tmp_path):
    path = tmp_path / "e"
    first, second = EmbeddingCache(path), EmbeddingCache(path)  # two processes, both opened the empty store
    first.add([text_key("a")], np.ones((1, 2), dtype=np.float32))
    second.add([text_key("b"), text_key("a")], np.zeros((2, 2), dtype=np.float32))
    both = EmbeddingCache(path)
    assert both.get([text_key("a")])[0].tolist() == [1.0, 1.0] and both.get([text_key("b")])[0].tolist() == [0.0, 0.0]
    assert len(both.index) == 2 and len(list(path.glob("*.keys.npy"))) == 2  # "a" was not stored twice


def test_embedding_cache_never_rewrites_a_segment_and_skips_half_written_ones(tmp_path):
    path = tmp_path / "e"
    cache = EmbeddingCache(path)
    cache.add([text_key("a")], np.ones((1, 2), dtype=np.float32))
    [first] = path.glob("*.keys.npy")
    stamp = first.stat().st_mtime_ns
    cache.add([text_key("b")], np.zeros((1, 2), dtype=np.float32))
    assert first.stat().st_mtime_ns == stamp and len(list(path.glob("*.keys.npy"))) == 2
    (path / ".killed.vectors.npy.partial").write_bytes(b"half a segment")  # a writer killed mid-save
    assert EmbeddingCache(path).get([text_key("a"), text_key("b")])[1].tolist() == [0.0, 0.0]


def test_cache_key_tracks_inputs(root, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"title": "A", "abstract": "B"}\n')
    cfg = OmegaConf.create({
        "data": {"sources": {"c": {"path": str(corpus), "format": "jsonl"}}, "gold": {"dev": {}, "test": {}}},
        "taxonomy": OmegaConf.load(root / "conf/taxonomy/default.yaml"),
        "labeling": OmegaConf.load(root / "conf/labeling/default.yaml"),
    })
    key = cache_key(cfg)
    cfg.labeling.cache = False
    assert cache_key(cfg) == key
    cfg.labeling.keywords.min_abstract_hits = 3
    assert cache_key(cfg) != key
    cfg.labeling.keywords.min_abstract_hits = 2
    corpus.write_text('{"title": "A", "abstract": "C"}\n')
    assert cache_key(cfg) != key


def test_auto_embedding_precision_is_resolved_before_the_cache_key(root, monkeypatch):
    """Votes made with bf16 vectors are never served to a run that embeds in fp32, nor the reverse."""
    from abstract_tagger.labeling import weak_labels
    from abstract_tagger.labeling.weak_labels import resolve_embedding_precision

    state = weak_labels.process_state()
    labeling = OmegaConf.to_container(OmegaConf.load(root / "conf/labeling/default.yaml"))
    assert labeling["embedding"]["precision"] == "auto"
    resolved = {}
    for measured in ("bf16", "fp32"):
        monkeypatch.setattr(weak_labels, "fast_precision", lambda device_type: measured)
        resolved[measured] = resolve_embedding_precision(labeling, state)
        assert resolved[measured]["embedding"]["precision"] == measured
    rules_only = {**labeling, "functions": ["keywords", "arxiv"]}
    assert resolve_embedding_precision(rules_only, state) is rules_only  # no encoder: nothing to resolve
    cfg = OmegaConf.create({"data": {"sources": {}, "gold": {}}, "taxonomy": {}, "labeling": labeling})
    assert cache_key(cfg, resolved["bf16"]) != cache_key(cfg, resolved["fp32"])


@pytest.mark.slow
def test_minilm_embedding_function_and_cache(taxonomy, labeling_cfg, tmp_path, monkeypatch):
    encoder = SentenceEncoder(cache=EmbeddingCache(tmp_path / "e"))
    f = EmbeddingFunction(taxonomy, encoder, labeling_cfg["embedding"]["margins"])
    papers = [paper("End-to-end automatic speech recognition for low-resource languages",
                    "We train an acoustic model on spoken audio and report word error rates."),
              paper("Membership inference attacks against machine learning models",
                    "An adversary queries a trained model to infer whether a record was in its training data.")]
    sims = f.similarities(papers)
    assert taxonomy.ids[int(sims[0].argmax())] == "speech-audio"
    assert taxonomy.ids[int(sims[1].argmax())] == "security-privacy"
    assert f(papers)[0, 0, taxonomy.index("speech-audio")] == POSITIVE
    # Every text is cached now: a second pass embeds nothing.
    monkeypatch.setattr(encoder, "_embed", lambda texts: pytest.fail(f"re-embedded {len(texts)} texts"))
    np.testing.assert_allclose(f.similarities(papers), sims)


def test_embedding_store_changes_with_the_encoder_code(tmp_path, monkeypatch):
    """Vectors cached by an earlier version of the encoder (or at another precision or token limit) are
    never served: a stale store once made a developer checkout's weak labels differ from a fresh
    clone's."""
    from pathlib import Path

    from abstract_tagger.labeling import embedding
    from abstract_tagger.labeling.weak_labels import make_encoder

    cfg = {"model_path": "bundled-minilm", "batch_size": 8, "precision": "bf16"}
    before = make_encoder(cfg, tmp_path).cache.folder
    assert make_encoder(cfg, tmp_path).cache.folder == before
    # bf16 and fp32 vectors differ slightly: each precision has its own store.
    assert make_encoder({**cfg, "precision": "fp32"}, tmp_path).cache.folder != before
    # So do vectors of a shorter read of the same text: each token limit has its own store too.
    short = make_encoder({**cfg, "max_length": 128}, tmp_path)
    assert short.model.max_seq_length == 128 and short.cache.folder != before
    assert make_encoder({**cfg, "max_length": None}, tmp_path).cache.folder == before
    edited = tmp_path / "embedding.py"
    edited.write_bytes(Path(embedding.__file__).read_bytes() + b"\n# changed\n")
    monkeypatch.setattr(embedding, "__file__", str(edited))
    assert make_encoder(cfg, tmp_path).cache.folder != before


def test_fitting_the_label_model_leaves_the_callers_random_state_alone(labeling_cfg):
    """snorkel seeds the global generators: a training run's dropout and shuffling depended on whether
    its weak labels came from the cache."""
    import random

    import torch

    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    votes = np.random.default_rng(0).choice([-1, 0, 1], size=(200, 3, 2)).astype(np.int8)
    LearnedLabelModel(labeling_cfg["label_model"]).fit(votes)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
