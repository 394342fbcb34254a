"""label.py end to end on a tiny corpus, in a subprocess as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import GOLD, PAPERS, write_corpus


def run_label(root: Path, tmp: Path, corpus: Path, *overrides: str,
              run_dir: str = "run") -> subprocess.CompletedProcess:
    gold = tmp / "gold.jsonl"
    gold.write_text("".join(json.dumps({"id": k, "tags": v}) + "\n" for k, v in GOLD.items()))
    cmd = [sys.executable, str(root / "label.py"), f"hydra.run.dir={tmp / run_dir}", f"paths.cache_dir={tmp / 'cache'}",
           "~data.sources", f"+data.sources={{tiny:{{path:'{corpus}',format:jsonl}}}}", f"data.gold.dev.seed={gold}",
           "data.gold.dev.recent=null", "data.gold.test.recent=null", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=300)


def check_outputs(run_dir: Path, tag_ids: list[str], n_papers: int) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "weak_labels.jsonl").read_text().splitlines()]
    assert len(rows) == n_papers
    for row in rows:
        assert set(row) == {"id", "title", "tags", "probs"}
        assert list(row["probs"]) == tag_ids
        assert all(0.0 <= p <= 1.0 for p in row["probs"].values())
        assert row["tags"] == [t for t in tag_ids if row["probs"][t] >= 0.5]
    report = json.loads((run_dir / "lf_report.json").read_text())
    assert list(report["gold"]) == ["seed"]  # one section per dev set
    gold = report["gold"]["seed"]
    assert gold["n_papers"] == len(GOLD)
    assert {"micro_f1", "macro_f1", "per_tag"} <= set(gold["label_model"])
    assert set(gold["label_model"]["per_tag"]) == set(tag_ids)
    assert {"majority", "learned", "functions"} <= set(gold)
    md = (run_dir / "lf_report.md").read_text()
    assert "| majority |" in md and "| learned |" in md and "keyword_title" in md
    return rows


@pytest.mark.slow
def test_label_cli_with_minilm_writes_documented_outputs(root, tmp_path, taxonomy):
    corpus = tmp_path / "tiny.jsonl"
    write_corpus(corpus)
    proc = run_label(root, tmp_path, corpus)
    assert proc.returncode == 0, proc.stderr
    assert f"read {len(PAPERS)} = kept {len(PAPERS)} + duplicates 0 + rejected 0" in proc.stdout + proc.stderr
    assert "| learned |" in proc.stdout
    rows = check_outputs(tmp_path / "run", taxonomy.ids, len(PAPERS))
    report = json.loads((tmp_path / "run/lf_report.json").read_text())
    assert "embedding" in report["functions"]
    by_id = {r["id"]: r for r in rows}
    assert "causal-inference" in by_id["t01"]["tags"] and "speech-audio" in by_id["t06"]["tags"]
    assert report["gold"]["seed"]["label_model"]["micro_f1"] >= 0.6
    assert not (tmp_path / "run/rejects.jsonl").exists()


@pytest.mark.slow
def test_second_run_hits_the_cache(root, tmp_path, taxonomy):
    corpus = tmp_path / "tiny.jsonl"
    write_corpus(corpus)
    first = run_label(root, tmp_path, corpus, "labeling=rules", run_dir="a")
    assert first.returncode == 0, first.stderr
    assert "cached" not in first.stdout + first.stderr
    second = run_label(root, tmp_path, corpus, "labeling=rules", run_dir="b")
    assert second.returncode == 0, second.stderr
    assert "(cached:" in second.stdout + second.stderr
    check_outputs(tmp_path / "b", taxonomy.ids, len(PAPERS))
    assert (tmp_path / "a/weak_labels.jsonl").read_text() == (tmp_path / "b/weak_labels.jsonl").read_text()
    # A different label model is a different result: no stale cache.
    third = run_label(root, tmp_path, corpus, "labeling=rules", "labeling.model=majority", run_dir="c")
    assert third.returncode == 0, third.stderr
    assert "cached" not in third.stdout + third.stderr
    assert json.loads((tmp_path / "c/lf_report.json").read_text())["model"] == "majority"


@pytest.mark.slow
def test_on_error_skip_accounts_for_every_record(root, tmp_path, taxonomy):
    corpus = tmp_path / "tiny.jsonl"
    bad = ['{"id": "x1", "title": "Broken', json.dumps({"id": "x2", "title": "No abstract", "abstract": ""}),
           json.dumps({"id": "x3", "title": PAPERS[0][1].upper(), "abstract": "Same title, other case."})]
    write_corpus(corpus, bad)
    proc = run_label(root, tmp_path, corpus, "labeling=rules", "data.on_error=skip")
    assert proc.returncode == 0, proc.stderr
    assert f"read {len(PAPERS) + 3} = kept {len(PAPERS)} + duplicates 1 + rejected 2" in proc.stdout + proc.stderr
    rejects = [json.loads(line) for line in (tmp_path / "run/rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [len(PAPERS) + 1, len(PAPERS) + 2]
    assert "malformed JSON" in rejects[0]["reason"] and "abstract" in rejects[1]["reason"]
    check_outputs(tmp_path / "run", taxonomy.ids, len(PAPERS))


@pytest.mark.slow
def test_on_error_raise_names_file_and_line(root, tmp_path):
    corpus = tmp_path / "tiny.jsonl"
    write_corpus(corpus, ['{"id": "x1", "title": "Broken'])
    proc = run_label(root, tmp_path, corpus, "labeling=rules")
    assert proc.returncode != 0
    assert f"{corpus}:{len(PAPERS) + 1}: malformed JSON" in proc.stderr
    assert not (tmp_path / "run/weak_labels.jsonl").exists()
