"""Hostile input files: a damaged record is rejected at its own line or stops the run with file:line,
never lost or altered silently; the weak-label cache cannot run code. Numbers refer to the cases of the
issue "No silent loss, no garbage out"."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import label_cfg, write_corpus, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from abstract_tagger.data.corpus import CorpusError, CorpusStats, Reject, read_corpus, read_source


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_1_csv_unclosed_quote_stops_at_its_line(tmp_path, on_error):
    rows = [f"Title {i},Abstract number {i} about things,cs.LG\n" for i in range(6)]
    rows[4] = 'Title 4,"Abstract number 4 with an unclosed quote,cs.LG\n'
    path = tmp_path / "p.csv"
    path.write_text("title,abstract,categories\n" + "".join(rows))
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:6: malformed CSV: .*never closed"):
        list(read_corpus({"c": {"path": str(path)}}, on_error=on_error, rejects_path=tmp_path / "r.jsonl"))


def test_10_weak_label_cache_cannot_run_code_and_survives_damage(root, tmp_path, caplog):
    from abstract_tagger.labeling.weak_labels import build_weak_labels, load_chunk

    corpus = tmp_path / "tiny.jsonl"
    write_corpus(corpus)
    cfg = label_cfg(root, tmp_path, corpus)
    first = build_weak_labels(cfg)
    [cache] = (tmp_path / "cache/weak_labels").iterdir()
    chunks = sorted(cache.glob("chunk-*.npz"))
    assert chunks and all(load_chunk(c) for c in chunks)  # loaded with allow_pickle=False: no pickle inside
    again = build_weak_labels(cfg)
    assert list(again.chunks())[0][0] == list(first.chunks())[0][0]
    assert again.report == json.loads(json.dumps(first.report))
    (cache / "result.json").write_bytes(b"garbage, as a crash or an attacker might leave")
    with caplog.at_level(logging.WARNING):
        rebuilt = build_weak_labels(cfg)
    assert f"{cache}: unreadable weak-label cache" in caplog.text
    np.testing.assert_array_equal(np.concatenate([p for _, p, _ in rebuilt.chunks()]),
                                  np.concatenate([p for _, p, _ in first.chunks()]))


def test_11_skip_log_points_at_the_rejects_file_that_stays(root, tmp_path, caplog):
    from abstract_tagger.labeling.weak_labels import build_weak_labels

    corpus = tmp_path / "tiny.jsonl"
    write_corpus(corpus, ['{"id": "x1", "title": "Broken'])
    with caplog.at_level(logging.WARNING):
        build_weak_labels(label_cfg(root, tmp_path, corpus, "data.on_error=skip")).write(tmp_path / "run")
    listed = re.findall(r"listed in (\S+)", caplog.text)
    assert listed == [str(tmp_path / "run/rejects.jsonl")] and Path(listed[0]).is_file()


def test_11_seed_abstract_fault_is_reported_on_its_own_line(root, tmp_path):
    lines = (root / "data/hf_papers_seed.txt").read_bytes().split(b"\n")
    lines[3] = b"caf\xe9 " + lines[3]  # line 4: the first abstract (line 3 is its title)
    path = tmp_path / "seed.txt"
    path.write_bytes(b"\n".join(lines))
    first = next(iter(read_source(path)))
    assert (first.line, first.reason) == (4, "abstract is not valid UTF-8")


def test_seed_title_line_repeated_twice_stops_at_its_line(root, tmp_path):
    # Found by the property test: two extra copies of a title line pair the lines up again, so the
    # title-length check alone let a (title, title) paper through.
    lines = (root / "data/hf_papers_seed.txt").read_bytes().split(b"\n")
    path = tmp_path / "seed.txt"
    path.write_bytes(b"\n".join(lines[:4] + [lines[4], lines[4]] + lines[4:]))
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:6: expected an abstract but found"):
        list(read_source(path))


def test_11_json_error_message_reads_well(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"title": "unterminated')
    [reject] = read_source(path)
    assert reject.reason == "malformed JSON: Unterminated string starting at column 11"


def test_12_record_without_letters_is_a_warning(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", [{"title": "🚀🔥", "abstract": "We study things."},
                                              {"title": "\u200b", "abstract": "Zero-width title."}])
    with caplog.at_level(logging.WARNING):
        assert len(list(read_source(path))) == 2
    assert f"{path}:1: title has no letters" in caplog.text and f"{path}:2: title has no letters" in caplog.text


# Seed abstracts are long, as real ones are: the reader tells a slipped title/abstract pairing by length.
GOOD = [{"id": f"g{i}", "title": f"Good paper {i} on topic {i * 7}",
         "abstract": f"We study problem {i} well. " + "It is a long abstract, as real ones are. " * 12}
        for i in range(8)]


def as_jsonl(recs):
    return [json.dumps(r).encode() for r in recs]


def as_csv(recs):
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([[r["id"], r["title"], r["abstract"]] for r in recs])
    return [b"id,title,abstract", *buf.getvalue().encode().splitlines()]


def as_seed(recs):
    lines = [b"Papers", b"header"]
    for i, r in enumerate(recs):
        lines += [(("Subscribe" if i == 0 else "") + r["title"]).encode(), r["abstract"].encode()]
    return lines


FORMATS = {"p.jsonl": (as_jsonl, 0), "p.csv": (as_csv, 1), "p.txt": (as_seed, 2)}  # writer, header lines


EDITS = st.tuples(st.sampled_from(["insert", "delete", "truncate", "duplicate", "blank"]),
                  st.integers(0, 1000), st.integers(0, 1000),
                  st.sampled_from([b'"', b",", b"{", b"\xe9", b"\xff\xfe", b"\\", b"\x00", b"\t", b"]", b"\r"]))


def mutate(lines, edits):
    """Line-local damage: [(original line index, or None for an added line; bytes; damaged?)]."""
    out = [(i, line, False) for i, line in enumerate(lines)]
    for kind, i, j, junk in edits:
        k = i % len(out)
        orig, line, was_damaged = out[k]
        cut = j % (len(line) + 1)
        if kind == "duplicate":
            out.insert(k, (None, line, False))
        elif kind == "blank":
            out.insert(k, (None, b"", False))
        else:
            damaged = {"insert": line[:cut] + junk + line[cut:], "delete": line[:cut] + line[cut + 1:],
                       "truncate": line[:cut]}[kind]
            out[k] = (orig, damaged, was_damaged or damaged != line)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(FORMATS)), n=st.integers(1, len(GOOD)), edits=st.lists(EDITS, max_size=3))
def test_property_mutated_files_balance_and_keep_good_records(tmp_path, name, n, edits):
    write, header = FORMATS[name]
    good = GOOD[:n]
    mutated = mutate(write(good), edits)
    # A CSV quote opened by one edit and closed by another is one well-formed multi-line field that no
    # reader can tell from a real one: that pair is out of reach, so one quote edit per CSV file.
    if name == "p.csv" and sum(e[0] == "insert" and e[3] == b'"' for e in edits) > 1:
        return
    path = tmp_path / name
    path.write_bytes(b"\n".join(line for _, line, _ in mutated) + b"\n")
    stats, rejects = CorpusStats(), tmp_path / "rejects.jsonl"
    try:
        kept = list(read_corpus({"s": {"path": str(path)}}, on_error="skip", rejects_path=rejects, stats=stats))
    except CorpusError as e:
        # Structural faults (seed pairing, CSV quoting or header) stop the run at a line of the file.
        assert e.source == str(path) and 0 < e.line <= len(mutated) + 1
        return
    assert stats.read == stats.kept + stats.duplicates + stats.rejected
    assert stats.kept == len(kept)
    assert stats.rejected == (len(rejects.read_text().splitlines()) if rejects.exists() else 0)
    if name == "p.jsonl":  # one record a non-blank line: none may vanish unread
        assert stats.read == sum(1 for _, line, _ in mutated if line.strip())
    # Every record whose lines, and the header lines every record depends on, survived undamaged is
    # kept unaltered (seed ids are positional).
    intact = {orig for orig, _, damaged in mutated if orig is not None and not damaged}
    if [orig for orig, _, damaged in mutated[:header] if not damaged] != list(range(header)):
        return
    # Without dropping duplicates, so that a damaged copy listed first cannot stand in for the record.
    every = list(read_corpus({"s": {"path": str(path)}}, on_error="skip", dedupe=False))
    found = {(p.title, p.abstract) for p in every} | {(p.id, p.title, p.abstract) for p in every}
    for i, rec in enumerate(good):
        rows = {header + i} if name != "p.txt" else {header + 2 * i, header + 2 * i + 1}
        if rows <= intact:
            # Seed ids are positions in the page, so only title and abstract are the record's own.
            key = (rec["title"], rec["abstract"].strip()) if name == "p.txt" else \
                (rec["id"], rec["title"], rec["abstract"].strip())
            assert key in found, (rec["title"], mutated)



@pytest.mark.parametrize("name", sorted(FORMATS))
def test_lone_cr_inside_a_line_does_not_shift_line_numbers(tmp_path, name):
    """A stray `\\r` inside a line (hypothesis found it): Python's universal newlines split the line in
    two, so every later line was reported one too far, unlike editors and `wc -l`."""
    write, header = FORMATS[name]
    lines = write(GOOD[:3])
    k = header + (2 if name == "p.txt" else 1)  # inside the second record's first line
    lines[k] = lines[k][:5] + b"\r" + lines[k][5:]
    lines.insert(len(lines) - 1, b'{"broken' if name == "p.jsonl" else b"a,b" if name == "p.csv" else b"x" * 300)
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    # 1-based: the inserted faulty line; in the seed dump, the real abstract after it, now in a title's place
    bad_line = len(lines) if name == "p.txt" else len(lines) - 1
    rejects = tmp_path / "rejects.jsonl"
    try:
        kept = list(read_corpus({"s": {"path": str(path)}}, on_error="skip", rejects_path=rejects))
    except CorpusError as e:  # the seed dump's structural check
        assert name == "p.txt" and e.line == bad_line
        return
    reported = [json.loads(r)["line"] for r in rejects.read_text().splitlines()]
    assert set(reported) - {k + 1} == {bad_line}  # perhaps the damaged line's pieces, and the faulty line
    assert {p.title for p in kept} >= {GOOD[0]["title"], GOOD[2]["title"]}


def test_13_csv_header_repeating_a_used_column_stops_at_line_1(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,title,abstract,abstract,notes,notes\na1,A title,The abstract,Another text,x,y\n")
    with pytest.raises(CorpusError, match=rf"^{re.escape(str(path))}:1: CSV header repeats column\(s\) \['abstract'\]"):
        list(read_source(path))


def test_13_csv_field_longer_than_the_csv_module_default_is_read_when_max_chars_allows(tmp_path):
    abstract = "word " * 40_000  # 200,000 characters, over the csv module's 131,072
    path = tmp_path / "p.csv"
    path.write_text(f'id,title,abstract\na1,A long one,"{abstract}"\na2,Short,Short abstract\n')
    papers = list(read_source(path, max_chars=250_000))
    assert [p.id for p in papers] == ["a1", "a2"] and len(papers[0].abstract) == len(abstract.strip())
    [too_long, short] = read_source(path, max_chars=100_000)  # over max_chars: that record alone is rejected
    assert isinstance(too_long, Reject) and too_long.line == 2 and "over the limit" in too_long.reason
    assert short.id == "a2"


@pytest.mark.parametrize("name", ["p.jsonl", "p.csv"])
def test_13_id_with_a_lone_surrogate_is_rejected_at_its_line_under_skip(tmp_path, name):
    path = tmp_path / name
    if name == "p.jsonl":
        write_jsonl(path, [{"id": "\ud800", "title": "Bad id", "abstract": "Abstract one."},
                           {"id": "ok", "title": "Good id", "abstract": "Abstract two."}])
    else:
        path.write_bytes(b"id,title,abstract\n\xff\xfe,Bad id,Abstract one.\nok,Good id,Abstract two.\n")
    rejects = tmp_path / "rejects.jsonl"
    kept = list(read_corpus({"s": {"path": str(path)}}, on_error="skip", rejects_path=rejects))
    assert [p.id for p in kept] == ["ok"]
    [reject] = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert (reject["file"], reject["line"], reject["reason"]) == (str(path), 1 + name.endswith(".csv"),
                                                                  "id is not valid UTF-8")


def test_13_predict_skip_run_survives_an_id_with_a_lone_surrogate(tiny_checkpoint, tmp_path):
    from abstract_tagger import Tagger
    from abstract_tagger.inference.files import predict_file

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "\ud800", "title": "Bad id", "abstract": "Abstract one."},
                                              {"id": "ok", "title": "Good id", "abstract": "Abstract two."}])
    stats = predict_file(Tagger.from_pretrained(tiny_checkpoint, backend="torch", precision="fp32"), src,
                         tmp_path / "out.jsonl", progress=False)
    assert stats.summary() == "read 2 = tagged 1 + rejected 1"
    assert [json.loads(r)["id"] for r in (tmp_path / "out.jsonl").read_text().splitlines()] == ["ok"]


def test_13_json_record_repeating_a_used_key_is_rejected_at_its_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "title": "T one", "abstract": "Right text.", "abstract": "Wrong text."}\n'
                    '{"id": "b", "title": "T two", "abstract": "Says \\"abstract\\": twice \\"abstract\\"",'
                    ' "extra": {"abstract": 1}, "note": 1, "note": 2}\n')
    bad, good = read_source(path)
    assert (bad.line, bad.reason) == (1, "key(s) ['abstract'] given more than once")
    assert good.id == "b" and good.abstract == 'Says "abstract": twice "abstract"'
