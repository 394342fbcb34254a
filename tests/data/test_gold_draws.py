"""The committed hand-labelled training sets are the draws their README commands make: the drawing
script reads the corpus files through the project's readers, so every id is the corpus's."""

import json
import subprocess
import sys

import pytest

DRAWS = [  # (arguments, the committed file, papers removed after the draw)
    (["data/arxiv_recent_subset.jsonl.gz", "--splits", "train=2000", "--seed", "2027", "--exclude",
      "data/gold_recent_dev.jsonl", "data/gold_recent_test.jsonl"], "data/gold_train_recent.jsonl", 1),
    (["data/hf_papers_seed.txt", "--id-prefix", "seed", "--splits", "seed=128", "--seed", "2029", "--exclude",
      "data/gold_dev.jsonl"], "data/gold_train_seed.jsonl", 0),
    (["data/arxiv_ml_sample.csv", "--id-prefix", "arxiv_sample", "--fields", "title=titles", "abstract=summaries",
      "categories=terms", "--splits", "older=372", "--seed", "2029"], "data/gold_train_older.jsonl", 0),
]


def ids(path):
    return [json.loads(line)["id"] for line in path.open(encoding="utf-8")]


@pytest.mark.parametrize("args, committed, removed", DRAWS, ids=[d[1] for d in DRAWS])
def test_committed_training_sets_are_the_documented_draws(root, tmp_path, args, committed, removed):
    subprocess.run([sys.executable, str(root / "scripts/sample_gold.py"), *args, "--out-dir", str(tmp_path)],
                   cwd=root, check=True, capture_output=True)
    drawn = ids(next(tmp_path.glob("*.jsonl")))
    kept = ids(root / committed)
    members = set(kept)
    assert len(drawn) == len(kept) + removed and [pid for pid in drawn if pid in members] == kept


def test_a_draw_from_a_file_the_corpus_would_reject_stops(root, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "A title", "abstract": "Text."}\n{"id": "b", "title": 3}\n')
    run = subprocess.run([sys.executable, str(root / "scripts/sample_gold.py"), str(bad), "--splits", "x=1",
                          "--out-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode != 0 and f"{bad}:2:" in run.stderr and not (tmp_path / "out").exists()
