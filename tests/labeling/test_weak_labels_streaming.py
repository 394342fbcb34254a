"""label.py at any scale: chunked labelling equals one chunk, a killed run resumes to the same result,
2 processes equal 1, and the function statistics accumulated chunk by chunk equal snorkel's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import PAPERS, label_cfg, write_corpus

from abstract_tagger.labeling import weak_labels


def outputs(labels, out_dir):
    labels.write(out_dir)
    report = json.loads((out_dir / "lf_report.json").read_text())
    return (out_dir / "weak_labels.jsonl").read_text(), report


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "tiny.jsonl"
    write_corpus(path)
    return path


def test_chunked_labelling_equals_one_chunk(root, tmp_path, corpus):
    one = outputs(weak_labels.build_weak_labels(label_cfg(root, tmp_path, corpus)), tmp_path / "one")
    chunked_labels = weak_labels.build_weak_labels(label_cfg(root, tmp_path, corpus, "labeling.chunk_size=3"))
    assert chunked_labels.n_chunks == -(-len(PAPERS) // 3)
    chunked = outputs(chunked_labels, tmp_path / "chunked")
    assert chunked[0] == one[0] and len(one[0].splitlines()) == len(PAPERS)
    assert chunked[1]["function_stats"] == one[1]["function_stats"] and chunked[1]["gold"] == one[1]["gold"]
    # The label model is fitted on the first fit_max_records papers only; the rest stream through it.
    few = weak_labels.build_weak_labels(label_cfg(root, tmp_path, corpus, "labeling.chunk_size=3",
                                                  "labeling.fit_max_records=7"))
    assert few.report["n_fit"] == 7 and few.report["n_papers"] == len(PAPERS)


def test_killed_run_resumes_after_its_last_finished_chunk(root, tmp_path, corpus, monkeypatch):
    cfg = label_cfg(root, tmp_path, corpus, "labeling.chunk_size=2")
    whole = outputs(weak_labels.build_weak_labels(label_cfg(root, tmp_path, corpus, "labeling.chunk_size=2",
                                                            cache="whole")), tmp_path / "a")
    save_chunk = weak_labels.save_chunk
    saved = []

    def killed_after_three(path, papers, votes):
        if len(saved) == 3:
            raise KeyboardInterrupt  # the kill, between two chunks
        save_chunk(path, papers, votes)
        saved.append(path.name)

    monkeypatch.setattr(weak_labels, "save_chunk", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        weak_labels.build_weak_labels(cfg)
    assert saved == ["chunk-000000.npz", "chunk-000001.npz", "chunk-000002.npz"]

    revoted = []
    monkeypatch.setattr(weak_labels, "save_chunk", lambda path, *a: (revoted.append(path.name), save_chunk(path, *a)))
    resumed = outputs(weak_labels.build_weak_labels(cfg), tmp_path / "b")
    assert revoted and not set(revoted) & set(saved)  # finished chunks are not voted again
    assert resumed == whole


@pytest.mark.slow
def test_two_processes_label_like_one(root, tmp_path, corpus):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def label(run_dir, *launcher):
        cfg = label_cfg(root, tmp_path, corpus)  # the same gold file for both runs
        cmd = [*launcher, str(root / "label.py"), f"hydra.run.dir={tmp_path / run_dir}",
               f"paths.cache_dir={tmp_path / run_dir / 'cache'}", "~data.sources",
               f"+data.sources={{tiny:{{path:'{corpus}',format:jsonl}}}}", f"data.gold.dev.seed={cfg.data.gold.dev.seed}",
               "data.gold.dev.recent=null", "data.gold.test.recent=null", "labeling=rules", "labeling.chunk_size=3"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    single = label("one", sys.executable)
    both = label("two", sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    assert "process 0 of 1: voted 4 chunk(s)" in single
    # Each rank voted its share: chunks 0, 2 on rank 0 and 1, 3 on rank 1.
    assert "process 0 of 2: voted 2 chunk(s)" in both and "process 1 of 2: voted 2 chunk(s)" in both
    for name in ("weak_labels.jsonl", "lf_report.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


# snorkel's LFAnalysis (the reference here, not the project's code) calls scipy's diags, which warns.
@pytest.mark.filterwarnings("ignore:Input has data type:FutureWarning")
def test_function_stats_accumulated_by_chunk_equal_snorkel():
    from snorkel.labeling import LFAnalysis

    from abstract_tagger.labeling.report import FunctionStats

    rng = np.random.default_rng(0)
    votes = rng.choice([-1, 0, 1], size=(500, 4, 3), p=[0.5, 0.25, 0.25]).astype(np.int8)
    stats = FunctionStats(["a", "b", "c", "d"], ["x", "y", "z"])
    for start in range(0, 500, 128):
        stats.add(votes[start:start + 128])
    got = stats.to_dict()
    for t, tag in enumerate(["x", "y", "z"]):
        analysis = LFAnalysis(votes[:, :, t])
        for j, name in enumerate("abcd"):
            assert got[name][tag]["coverage"] == pytest.approx(analysis.lf_coverages()[j])
            assert got[name][tag]["overlap"] == pytest.approx(analysis.lf_overlaps()[j])
            assert got[name][tag]["conflict"] == pytest.approx(analysis.lf_conflicts()[j])
