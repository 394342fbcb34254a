import gzip
import io
import json
import logging
import re
import sys

import pytest

from abstract_tagger.data.corpus import (
    CorpusError,
    CorpusStats,
    Paper,
    _TitleDigests,
    read_corpus,
    read_gold,
    read_gold_sets,
    read_source,
    title_key,
)

ARXIV_FIELDS = {"title": "titles", "abstract": "summaries", "categories": "terms"}
ABSTRACT = "We study a thing. It works well."


def jsonl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def paper(i: int, **extra) -> dict:
    return {"title": f"Paper number {i}", "abstract": ABSTRACT, **extra}


def read_all(sources, tmp_path, on_error="raise", **kwargs):
    """Papers, stats and the parsed rejects.jsonl of one corpus read; checks the books balance."""
    stats = CorpusStats()
    rejects = tmp_path / "rejects.jsonl"
    papers = list(read_corpus(sources, on_error=on_error, rejects_path=rejects, stats=stats, **kwargs))
    assert stats.read == stats.kept + stats.duplicates + stats.rejected
    assert stats.kept == len(papers)
    lines = [json.loads(ln) for ln in rejects.read_text().splitlines()] if rejects.exists() else []
    assert len(lines) == stats.rejected
    return papers, stats, lines


# --- the seed dump -------------------------------------------------------------------------------

def test_seed_dump_parses_all_papers_in_page_order(root):
    papers = list(read_source(root / "data/hf_papers_seed.txt", "seed"))
    assert len(papers) == 215
    assert all(isinstance(p, Paper) for p in papers)
    assert [p.id for p in papers] == [f"seed-{i:03d}" for i in range(215)]
    assert papers[0].title.startswith("A Wav2vec2-Based Experimental Study")
    assert not any("Subscribe" in p.title for p in papers)
    assert papers[0].line == 3 and papers[1].line == 5
    assert all(len(p.abstract) > 500 for p in papers)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize(
    "damage, line, reason",
    [
        (lambda lines: lines[:-1], 431, "unpaired trailing line"),
        (lambda lines: lines[:10] + lines[11:], 11, "a title or abstract line is missing above"),
        (lambda lines: lines[:2] + [lines[2].removeprefix("Subscribe")] + lines[3:], 3, "Subscribe"),
        (lambda lines: lines[:2], 2, "no papers"),
    ],
    ids=["truncated", "line-missing-in-the-middle", "no-glue", "header-only"],
)
def test_structurally_odd_seed_dump_always_raises(root, tmp_path, damage, line, reason, on_error):
    lines = (root / "data/hf_papers_seed.txt").read_text(encoding="utf-8").splitlines()
    odd = tmp_path / "seed.txt"
    odd.write_text("\n".join(damage(lines)) + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(odd))}:{line}: .*{reason}"):
        read_all({"seed": {"path": odd, "format": "seed"}}, tmp_path, on_error)


# --- JSON lines, arXiv snapshot, CSV ---------------------------------------------------------------

def test_jsonl_reader_normalises_and_fills_ids(tmp_path):
    path = tmp_path / "papers.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf"  # a BOM, as some editors write
        + jsonl({"id": "x1", "title": "  Deep\n  Nets ", "abstract": "A\tb\u00a0 c", "categories": ["cs.LG", "stat.ML"]})
        + b"\n   \n"  # blank lines are not records
        + jsonl(paper(4))
    )
    papers, stats, _ = read_all({"mine": {"path": path}}, tmp_path)
    assert papers == [
        Paper("x1", "Deep Nets", "A b c", ("cs.LG", "stat.ML"), str(path), 1),
        Paper("mine-000004", "Paper number 4", ABSTRACT, (), str(path), 4),
    ]
    assert stats.per_source["mine"] == {"read": 2, "kept": 2, "duplicates": 0, "rejected": 0}


def test_arxiv_snapshot_format_gz(tmp_path):
    path = tmp_path / "arxiv-metadata-oai-snapshot.json.gz"
    record = {"id": "0704.0001", "submitter": "P. Balazs", "authors": "C. Balazs, E. Berger",
              "title": "Calculation of prompt diphoton\n  production", "abstract": "  A fully differential\ncalc.\n",
              "categories": "hep-ph cs.LG", "versions": [{"version": "v1"}]}
    with gzip.open(path, "wb") as f:
        f.write(jsonl(record, {**record, "id": "0704.0002", "title": "Another one"}))
    papers, _, _ = read_all({"snap": {"path": path, "format": "arxiv"}}, tmp_path)
    assert [(p.id, p.title, p.abstract, p.categories) for p in papers] == [
        ("0704.0001", "Calculation of prompt diphoton production", "A fully differential calc.", ("hep-ph", "cs.LG")),
        ("0704.0002", "Another one", "A fully differential calc.", ("hep-ph", "cs.LG")),
    ]


def test_jsonl_field_names_are_configurable(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl({"paper_id": 7, "name": "T", "summary": "S", "tags": "a b"}))
    papers, _, _ = read_all(
        {"p": {"path": path, "fields": {"id": "paper_id", "title": "name", "abstract": "summary", "categories": "tags"}}},
        tmp_path,
    )
    assert papers == [Paper("7", "T", "S", ("a", "b"), str(path), 1)]
    with pytest.raises(ValueError, match="titel"):
        list(read_source(path, fields={"titel": "name"}))


def test_csv_reader_multiline_records_keep_their_start_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(
        'titles,summaries,terms\n'
        'First,"line one\nline two\n\nline four","[\'cs.LG\', \'cs.AI\']"\n'
        '\n'
        'Second,plain,cs.CV\n'
        'Third,"two\nlines",\n',
        encoding="utf-8",
    )
    papers, _, _ = read_all({"c": {"path": path, "fields": ARXIV_FIELDS}}, tmp_path)
    assert [(p.id, p.title, p.abstract, p.categories, p.line) for p in papers] == [
        ("c-000002", "First", "line one line two line four", ("cs.LG", "cs.AI"), 2),
        ("c-000007", "Second", "plain", ("cs.CV",), 7),
        ("c-000008", "Third", "two lines", (), 8),
    ]


def test_real_arxiv_sample_csv(root, tmp_path):
    papers, stats, _ = read_all(
        {"arxiv_sample": {"path": root / "data/arxiv_ml_sample.csv", "format": "csv", "fields": ARXIV_FIELDS}},
        tmp_path,
    )
    assert len(papers) == 893 and stats.read == 893
    assert papers[0].categories == ("cs.CV", "eess.IV")
    assert all(p.categories and all(c and "[" not in c and "'" not in c for c in p.categories) for p in papers)
    assert sum("cs.LG" in p.categories for p in papers) > 100
    assert len({p.id for p in papers}) == 893


def test_default_corpus_reads_1108_papers(root, tmp_path):
    papers, stats, _ = read_all(
        {
            "seed": {"path": root / "data/hf_papers_seed.txt", "format": "seed"},
            "arxiv_sample": {"path": root / "data/arxiv_ml_sample.csv", "format": "csv", "fields": ARXIV_FIELDS},
        },
        tmp_path,
    )
    assert len(papers) == 1108 and stats.duplicates == 0
    assert len({p.id for p in papers}) == 1108


def test_gz_csv_and_stdin(tmp_path, monkeypatch):
    gz = tmp_path / "p.csv.gz"
    with gzip.open(gz, "wt", encoding="utf-8", newline="") as f:
        f.write("title,abstract\nGz title,Gz abstract\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(jsonl(paper(1), paper(2)))))
    papers, _, _ = read_all({"gz": {"path": gz}, "in": {"path": "-", "format": "jsonl"}}, tmp_path)
    assert [(p.id, p.title) for p in papers] == [
        ("gz-000002", "Gz title"), ("in-000001", "Paper number 1"), ("in-000002", "Paper number 2"),
    ]
    with pytest.raises(CorpusError, match="^-:0: cannot tell the format"):
        read_source("-")


def test_truncated_gz_names_file_and_line(tmp_path):
    full = gzip.compress(jsonl(*[paper(i) for i in range(2000)]))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(full[: len(full) // 2])
    for on_error in ("raise", "skip"):
        with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:\d+: cannot read the file"):
            read_all({"cut": {"path": path}}, tmp_path, on_error)


def test_missing_file_and_bad_config(tmp_path):
    with pytest.raises(CorpusError, match="nope.jsonl:0: no such file"):
        read_source(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="fomat"):
        list(read_corpus({"a": {"path": "x.jsonl", "fomat": "csv"}}))
    with pytest.raises(ValueError, match="on_error"):
        list(read_corpus({}, on_error="ignore"))


# --- duplicates ------------------------------------------------------------------------------------

def test_duplicates_by_normalised_title_are_dropped_and_counted(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    a.write_bytes(jsonl(
        paper(1),
        {"title": "paper  NUMBER 1.", "abstract": "other"},  # same title, other spelling
        {"title": "Обучение нейросетей", "abstract": "x"},
        {"title": "Графовые модели", "abstract": "x"},  # non-Latin titles are not all one key
        {"title": "ГРАФОВЫЕ  модели!", "abstract": "x"},  # but are folded like Latin ones
        {"title": "Ｇｒａｐｈ", "abstract": "x"},  # full-width letters fold to ASCII
    ))
    b.write_text("title,abstract\n\"Paper number 1 \",again\ngraph,y\nNew,z\n", encoding="utf-8")
    papers, stats, _ = read_all({"a": {"path": a}, "b": {"path": b}}, tmp_path)
    assert [p.title for p in papers] == ["Paper number 1", "Обучение нейросетей", "Графовые модели", "Ｇｒａｐｈ", "New"]
    assert (stats.read, stats.duplicates) == (9, 4)
    assert stats.per_source["b"] == {"read": 3, "kept": 1, "duplicates": 2, "rejected": 0}
    papers, stats, _ = read_all({"a": {"path": a}}, tmp_path, dedupe=False)
    assert len(papers) == 6 and stats.duplicates == 0


def test_title_digest_table_survives_growth():
    seen = _TitleDigests(log2_slots=4)
    keys = [title_key(f"Title {i}") for i in range(5000)]
    assert all(seen.add(k) for k in keys)
    assert not any(seen.add(k) for k in keys)
    assert len(seen) == 5000 and seen.add("one more")


# --- bad input, in both error modes ----------------------------------------------------------------

LONG = "x" * 301
BAD_INPUTS = {
    # name: (file name, bytes, bad line, reason)
    "malformed-json": ("p.jsonl", jsonl(paper(1), b'{"title": "T", "abstract": ', paper(3)), 2, "malformed JSON"),
    "json-array": ("p.jsonl", jsonl(paper(1), ["T", "A"], paper(3)), 2, "expected a JSON object, got list"),
    "json-string": ("p.jsonl", jsonl(paper(1), b'"just text"', paper(3)), 2, "expected a JSON object, got str"),
    "non-string-title": ("p.jsonl", jsonl(paper(1), {"title": 5, "abstract": "A"}, paper(3)), 2, "title is int"),
    "missing-title": ("p.jsonl", jsonl(paper(1), {"abstract": "A"}, paper(3)), 2, "missing title"),
    "empty-abstract": ("p.jsonl", jsonl(paper(1), {"title": "T", "abstract": " \n"}, paper(3)), 2, "empty abstract"),
    "non-utf8-json": ("p.jsonl", jsonl(paper(1), b'{"title": "caf\xe9", "abstract": "A"}', paper(3)), 2,
                      "not valid UTF-8"),
    "escaped-surrogate": ("p.jsonl", jsonl(paper(1), b'{"title": "\\udc80", "abstract": "A"}', paper(3)), 2,
                          "title is not valid UTF-8"),
    "over-long-json": ("p.jsonl", jsonl(paper(1), {"title": "T", "abstract": LONG}, paper(3)), 2,
                       "abstract has 301 characters, over the limit of 300"),
    "bad-categories": ("p.jsonl", jsonl(paper(1), paper(2, categories=[1, 2]), paper(3)), 2, "categories must be"),
    "bad-id": ("p.jsonl", jsonl(paper(1), paper(2, id={"a": 1}), paper(3)), 2, "id is dict"),
    "csv-too-few-fields": ("p.csv", b"title,abstract,categories\nA,a,x\nB,b\nC,c,\n", 3, "row has 2 fields, header has 3"),
    "csv-too-many-fields": ("p.csv", b'title,abstract\nA,a\n"B\nB",b,extra\nC,c\n', 3, "row has 3 fields, header has 2"),
    "csv-non-utf8": ("p.csv", b"title,abstract\nA,a\nB,caf\xe9\nC,c\n", 3, "abstract is not valid UTF-8"),
    "csv-empty-title": ("p.csv", b'title,abstract\nA,a\n"  ",b\nC,c\n', 3, "empty title"),
    "csv-over-long": ("p.csv", b"title,abstract\nA,a\n" + LONG.encode() + b",b\nC,c\n", 3, "title has 301 characters"),
    "csv-bad-categories": ("p.csv", b'title,abstract,categories\nA,a,\nB,b,"[\'cs.LG\'"\nC,c,\n', 3,
                           "unparseable categories"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_record_raises_with_file_and_line(tmp_path, case):
    name, data, line, reason = BAD_INPUTS[case]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:{line}: .*{reason}") as err:
        read_all({"src": {"path": path}}, tmp_path, max_chars=300)
    assert (err.value.source, err.value.line) == (str(path), line)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_record_is_skipped_into_rejects(tmp_path, case):
    name, data, line, reason = BAD_INPUTS[case]
    path = tmp_path / name
    path.write_bytes(data)
    papers, stats, rejects = read_all({"src": {"path": path}}, tmp_path, "skip", max_chars=300)
    assert (stats.read, stats.kept, stats.duplicates, stats.rejected) == (3, 2, 0, 1)
    assert len(papers) == 2 and line not in {p.line for p in papers}
    [reject] = rejects
    assert reject["file"] == str(path) and reject["line"] == line and reason in reject["reason"]


def test_skip_without_rejects_file_logs_each_reject(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    path.write_bytes(jsonl(paper(1), [1]))
    stats = CorpusStats()
    with caplog.at_level(logging.WARNING, logger="abstract_tagger.data.corpus"):
        assert len(list(read_corpus({"p": {"path": path}}, on_error="skip", stats=stats))) == 1
    assert stats.rejected == 1 and f"{path}:2: expected a JSON object" in caplog.text


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_csv_header_missing_a_configured_column(tmp_path, on_error):
    path = tmp_path / "p.csv"
    path.write_text("titles,abstract\nA,a\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:1: CSV header lacks column\(s\) \['summaries'\]"):
        read_all({"c": {"path": path, "fields": ARXIV_FIELDS}}, tmp_path, on_error)


def test_csv_unbalanced_quote_stops_the_run(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b'title,abstract\nA,a\nB,"' + b"never closed " * 20_000 + b"\n")
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:3: malformed CSV: field larger than field limit"):
        read_all({"c": {"path": path}}, tmp_path, "skip")


# --- gold labels -----------------------------------------------------------------------------------

def test_read_gold(root, taxonomy):
    gold = read_gold(root / "data/gold_dev.jsonl", taxonomy.ids)
    assert len(gold) == 87
    assert gold.tags["seed-001"] == ["efficient-ml", "nlp"]
    seed = list(read_source(root / "data/hf_papers_seed.txt", "seed"))
    rows = gold.rows(seed)  # joined by id, every title checked
    assert [seed[r].id for r in rows] == list(gold.tags)
    assert gold.labels(taxonomy.ids).sum() == sum(map(len, gold.tags.values()))


def test_committed_gold_sets_join_the_default_corpus(root, taxonomy):
    """Every gold paper is in the default corpus under its id and title, and no paper is in two sets."""
    sets = read_gold_sets({"dev": {"seed": root / "data/gold_dev.jsonl", "recent": root / "data/gold_recent_dev.jsonl"},
                           "test": {"recent": root / "data/gold_recent_test.jsonl"}}, taxonomy.ids)
    assert {n: len(g) for n, g in sets["dev"].items()} == {"seed": 87, "recent": 110}
    assert len(sets["test"]["recent"]) == 220
    papers = list(read_corpus({
        "seed": {"path": root / "data/hf_papers_seed.txt", "format": "seed"},
        "recent": {"path": root / "data/arxiv_recent_subset.jsonl.gz", "format": "arxiv"}}))
    for named in sets.values():
        for gold in named.values():
            assert len(gold.rows(papers)) == len(gold)


def test_gold_title_mismatch_or_missing_paper_is_an_error(tmp_path, taxonomy):
    papers = [Paper("p1", "Graph networks for molecules", "An abstract."), Paper("p2", "Other", "An abstract.")]
    path = tmp_path / "gold.jsonl"
    path.write_bytes(jsonl({"id": "p1", "title": "graph  Networks for molecules!", "tags": ["nlp"]},
                           {"id": "p2", "title": "A reordered dump put another paper here", "tags": []}))
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:2: p2: gold title .* does not match"):
        read_gold(path, taxonomy.ids).rows(papers)
    path.write_bytes(jsonl({"id": "p1", "tags": ["nlp"]}, {"id": "p3", "tags": []}))
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:2: p3: not in the corpus"):
        read_gold(path, taxonomy.ids).rows(papers)


def test_a_paper_in_two_gold_sets_is_an_error(tmp_path, taxonomy):
    dev, test = tmp_path / "dev.jsonl", tmp_path / "test.jsonl"
    dev.write_bytes(jsonl({"id": "p1", "tags": ["nlp"]}))
    test.write_bytes(jsonl({"id": "p0", "tags": []}, {"id": "p1", "tags": ["nlp"]}))
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(test))}:2: p1: also in gold set dev/a"):
        read_gold_sets({"dev": {"a": dev}, "test": {"b": test, "none": None}}, taxonomy.ids)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b'{"id": "seed-009", "tags": ["no-such-tag"]}', r"seed-009: unknown tag\(s\) \['no-such-tag'\]"),
        (b'{"id": "seed-009", "tags": "nlp"}', "seed-009: 'tags' must be a list"),
        (b'{"id": "seed-001", "tags": []}', "seed-001: listed twice"),
        (b'{"id": "seed-009", "tags": [', "malformed JSON"),
        (b'["seed-009", ["nlp"]]', "expected an object"),
    ],
)
def test_bad_gold_line(tmp_path, taxonomy, bad, reason):
    path = tmp_path / "gold.jsonl"
    path.write_bytes(jsonl({"id": "seed-001", "tags": ["nlp"]}, bad))
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:2: {reason}"):
        read_gold(path, taxonomy.ids)
