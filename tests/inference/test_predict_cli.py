"""The batch job on the tiny checkpoint: input formats, stdin, CSV output, rejects, resume, shards."""

import csv
import gzip
import json
import os
import subprocess
import sys

import pytest
from helpers import BACKENDS, TRAIN, Killed, records, write_jsonl

from abstract_tagger import Tagger
from abstract_tagger.common.config import ConfigError
from abstract_tagger.data.corpus import CorpusError, CorpusReadError
from abstract_tagger.inference.files import OutputFiles, merge_parts, predict_file, validate_predict

EXPECTED = [tag for _, tag in TRAIN]


@pytest.fixture(scope="module", params=BACKENDS)
def tagger(request, tiny_onnx_checkpoint):
    return Tagger.from_pretrained(tiny_onnx_checkpoint, backend=request.param, precision="fp32")


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def run(tagger, input, output, **kw):
    return predict_file(tagger, input, output, progress=False, **kw)


def test_jsonl_keeps_order_ids_and_duplicates(tagger, tmp_path):
    stats = run(tagger, write_jsonl(tmp_path / "in.jsonl", records(7)), tmp_path / "out.jsonl", chunk_size=3)
    rows = read_rows(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"r{i:02d}" for i in range(7)]
    assert [r["tags"] for r in rows] == [[EXPECTED[i % 3]] for i in range(7)]
    assert len(rows[0]["scores"]) == 18
    assert stats.summary() == "read 7 = tagged 7 + rejected 0"
    assert not OutputFiles(tmp_path / "out.jsonl").partial.exists()
    assert not (tmp_path / "out.jsonl.rejects.jsonl").exists()


def test_csv_arxiv_and_gz_inputs(tagger, tmp_path):
    with open(tmp_path / "in.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["titles", "summaries", "terms"])
        w.writerows([t, a, "['cs.LG']"] for (t, a), _ in TRAIN)
    run(tagger, tmp_path / "in.csv", tmp_path / "csv.jsonl", fields={"title": "titles", "abstract": "summaries"})
    rows = read_rows(tmp_path / "csv.jsonl")
    assert [r["tags"] for r in rows] == [[t] for t in EXPECTED]
    assert [r["id"] for r in rows] == ["csv-000002", "csv-000003", "csv-000004"]  # generated from line numbers

    snapshot = [{"id": f"2101.0000{i}", "title": t, "abstract": a, "categories": "cs.LG stat.ML"}
                for i, ((t, a), _) in enumerate(TRAIN)]
    with gzip.open(tmp_path / "snap.json.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in snapshot))
    run(tagger, tmp_path / "snap.json.gz", tmp_path / "snap.jsonl", format="arxiv")
    rows = read_rows(tmp_path / "snap.jsonl")
    assert [(r["id"], r["tags"]) for r in rows] == [(s["id"], [t]) for s, t in zip(snapshot, EXPECTED)]


def test_seed_dump(tagger, tmp_path, root):
    stats = run(tagger, root / "data/hf_papers_seed.txt", tmp_path / "seed.jsonl", chunk_size=64)
    rows = read_rows(tmp_path / "seed.jsonl")
    assert [r["id"] for r in rows] == [f"seed-{i:03d}" for i in range(215)]
    assert stats.summary() == "read 215 = tagged 215 + rejected 0"


def bad_input(tmp_path):
    good = records(3)
    lines = [
        json.dumps(good[0]).encode(),
        b'{"id": "broken", "title": ',
        json.dumps({"id": "noabs", "title": "A title"}).encode(),
        json.dumps({"id": "latin1", "title": "x", "abstract": "caf"}).encode()[:-2] + b'\xe9"}',
        json.dumps(good[1]).encode(),
        json.dumps({"id": "empty", "title": "t", "abstract": "  "}).encode(),
        json.dumps(good[2]).encode(),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_records_go_to_rejects_with_file_and_line(tagger, tmp_path):
    path = bad_input(tmp_path)
    stats = run(tagger, path, tmp_path / "out.jsonl", chunk_size=2)
    assert stats.summary() == "read 7 = tagged 3 + rejected 4"
    assert [r["id"] for r in read_rows(tmp_path / "out.jsonl")] == ["r00", "r01", "r02"]
    rejects = read_rows(tmp_path / "out.jsonl.rejects.jsonl")
    assert [(r["file"], r["line"]) for r in rejects] == [(str(path), n) for n in (2, 3, 4, 6)]
    assert "malformed JSON" in rejects[0]["reason"] and "not valid UTF-8" in rejects[2]["reason"]
    assert rejects[1]["reason"].startswith("missing") and "abstract" in rejects[1]["reason"]

    with pytest.raises(CorpusError, match=rf"{path}:2: malformed JSON"):
        run(tagger, path, tmp_path / "raise.jsonl", on_error="raise")
    assert not (tmp_path / "raise.jsonl").exists()


def test_resume_after_kill_gives_the_output_of_one_run(tagger, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", records(10) + [{"id": "bad"}] + records(9))
    run(tagger, src, tmp_path / "once.jsonl", chunk_size=4)

    calls, real_scores, die_at = [], tagger.scores, [3]

    def dies_on_third_chunk(texts, **kwargs):
        calls.append(len(texts))
        if len(calls) == die_at[0]:
            raise Killed
        return real_scores(texts, **kwargs)

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(tagger, "scores", dies_on_third_chunk)
    with pytest.raises(Killed):
        run(tagger, src, out, chunk_size=4)
    files = OutputFiles(out)
    assert not out.exists() and len(read_rows(files.partial)) == 8
    with open(files.partial, "ab") as f:  # a kill in the middle of writing a chunk
        f.write(b'{"id": "r08", "tags": [')

    calls.clear()
    die_at[0] = None
    stats = run(tagger, src, out, chunk_size=4, resume=True)
    assert calls == [3, 4, 4]  # chunks 2..4 only; chunk 2 holds the bad record
    assert out.read_bytes() == (tmp_path / "once.jsonl").read_bytes()
    assert out.with_name("out.jsonl.rejects.jsonl").read_bytes() == \
        (tmp_path / "once.jsonl.rejects.jsonl").read_bytes()
    assert stats.summary() == "read 20 = tagged 19 + rejected 1"
    assert not files.partial.exists() and not files.journal.exists()


def test_a_failure_keeps_the_whole_chunks_for_resume_and_bad_input_does_not(tagger, tmp_path, monkeypatch):
    """A full disk or a lost graph file half way through a long run (not the input's fault) keeps the
    chunks written so far, as a kill does; a bad record under on_error=raise leaves nothing."""
    src = write_jsonl(tmp_path / "in.jsonl", records(10))
    run(tagger, src, tmp_path / "once.jsonl", chunk_size=4)
    real_scores, calls = tagger.scores, []

    def disk_full_on_third_chunk(texts, **kwargs):
        calls.append(len(texts))
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_scores(texts, **kwargs)

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(tagger, "scores", disk_full_on_third_chunk)
    with pytest.raises(OSError, match="No space"):
        run(tagger, src, out, chunk_size=4)
    files = OutputFiles(out)
    assert not out.exists() and len(read_rows(files.partial)) == 8 and files.journal.exists()
    calls.clear()
    assert run(tagger, src, out, chunk_size=4, resume=True).summary() == "read 10 = tagged 10 + rejected 0"
    assert calls == [2] and out.read_bytes() == (tmp_path / "once.jsonl").read_bytes()

    def left(name):
        files = OutputFiles(tmp_path / name)
        return [p.name for p in (files.output, files.partial, files.rejects_partial, files.journal) if p.exists()]

    bad = write_jsonl(tmp_path / "bad.jsonl", records(5) + [{"id": "x"}])
    with pytest.raises(CorpusError, match=r"bad.jsonl:6:"):
        run(tagger, bad, tmp_path / "bad_out.jsonl", chunk_size=4, on_error="raise")
    assert left("bad_out.jsonl") == []

    def disk_full(texts, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tagger, "scores", disk_full)  # nothing whole to resume from: nothing left behind
    with pytest.raises(OSError, match="No space"):
        run(tagger, src, tmp_path / "first.jsonl", chunk_size=4)
    assert left("first.jsonl") == []

    from abstract_tagger.inference import files as files_module
    real_read = files_module.read_source

    def unreadable_after_six(*args, **kwargs):  # an I/O error on the input is no bad record
        for i, item in enumerate(real_read(*args, **kwargs)):
            if i == 6:
                raise CorpusReadError(str(src), 7, "cannot read the file: [Errno 5] Input/output error")
            yield item

    monkeypatch.setattr(tagger, "scores", real_scores)
    monkeypatch.setattr(files_module, "read_source", unreadable_after_six)
    with pytest.raises(CorpusReadError):
        run(tagger, src, tmp_path / "io.jsonl", chunk_size=4)
    assert len(read_rows(OutputFiles(tmp_path / "io.jsonl").partial)) == 4


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_the_error_reported(tagger, tmp_path):
    """The write that found the disk full is the error raised, not a second one from closing the files."""
    out = tmp_path / "out.jsonl"
    OutputFiles(out).partial.symlink_to("/dev/full")
    with pytest.raises(OSError, match="No space") as failed:
        run(tagger, write_jsonl(tmp_path / "in.jsonl", records(3)), out, chunk_size=1)
    assert failed.value.__context__ is None and failed.traceback[-1].name == "commit"


def test_resume_with_different_settings_is_refused(tagger, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", records(6))
    monkeypatch.setattr(tagger, "scores", lambda texts, **kwargs: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        run(tagger, src, tmp_path / "out.jsonl", chunk_size=2)
    with pytest.raises(ValueError, match="different chunk_size"):
        run(tagger, src, tmp_path / "out.jsonl", chunk_size=3, resume=True)
    with pytest.raises(ValueError, match="different max_chars"):
        run(tagger, src, tmp_path / "out.jsonl", chunk_size=2, max_chars=500, resume=True)


def test_resume_with_another_precision_is_refused(tiny_onnx_checkpoint, tmp_path):
    """int8 and bf16 write scores that differ in the 4th decimal: a resumed output must not mix them
    (say, a run moved from a CPU without AMX, where auto runs int8, to one with it)."""
    src = write_jsonl(tmp_path / "in.jsonl", records(6))
    int8 = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="onnx", precision="int8")
    int8.scores = lambda texts, **kwargs: (_ for _ in ()).throw(Killed())
    with pytest.raises(Killed):
        run(int8, src, tmp_path / "out.jsonl", chunk_size=2)
    fp32 = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="onnx", precision="fp32")
    with pytest.raises(ValueError, match="different scoring"):
        run(fp32, src, tmp_path / "out.jsonl", chunk_size=2, resume=True)


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv"])
def test_shards_cover_the_input_and_merge_back_in_order(tagger, tmp_path, name):
    src = write_jsonl(tmp_path / "in.jsonl", records(5) + [{"id": "bad"}] + records(5))
    whole = tmp_path / name
    run(tagger, src, whole, chunk_size=3)
    whole_lines = whole.read_text().splitlines(keepends=True)
    header, body = (whole_lines[:1], whole_lines[1:]) if name.endswith(".csv") else ([], whole_lines)

    shard_lines = []
    for i in range(2):
        run(tagger, src, tmp_path / f"shard{i}-{name}", chunk_size=3, shard=(i, 2))
        shard_lines.append((tmp_path / f"shard{i}-{name}").read_text().splitlines(keepends=True)[len(header):])
    # Chunks 0 and 2 go to shard 0; chunks 1 (with the bad record) and 3 (the last 2 records) to shard 1.
    assert [len(lines) for lines in shard_lines] == [3 + 3, 2 + 2]
    s0, s1 = shard_lines
    assert s0[:3] + s1[:2] + s0[3:] + s1[2:] == body

    # What `accelerate launch` does: unfinalized parts, merged by the main process.
    parts = OutputFiles(tmp_path / f"merged-{name}")
    for i in range(2):
        run(tagger, src, parts.part(i, 2).output, chunk_size=3, shard=(i, 2), finalize=False)
    stats = merge_parts(parts.output, 2)
    assert parts.output.read_text() == whole.read_text()
    assert parts.rejects.read_text() == OutputFiles(whole).rejects.read_text()
    assert stats.summary() == "read 11 = tagged 10 + rejected 1"
    assert sorted(p.name for p in tmp_path.glob("merged-*")) == [f"merged-{name}", f"merged-{name}.rejects.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_reads_stdin_and_writes_csv_without_run_dirs(tiny_onnx_checkpoint, tmp_path, root, backend):
    bad = bad_input(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(root / "predict.py"), "input=-", "output=tags.csv", f"checkpoint={tiny_onnx_checkpoint}",
         f"backend={backend}",
         "progress=false", "top_k=1", "precision=fp32"],
        input=bad.read_bytes(), cwd=tmp_path, env=env, capture_output=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "read 7 = tagged 3 + rejected 4" in proc.stdout.decode() + proc.stderr.decode()
    with open(tmp_path / "tags.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["tags"]) for r in rows] == list(zip(["r00", "r01", "r02"], EXPECTED))
    assert float(rows[0]["speech-audio"]) > 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "tags.csv", "tags.csv.rejects.jsonl"]
    assert read_rows(tmp_path / "tags.csv.rejects.jsonl")[0]["file"] == "-"

    proc = subprocess.run(
        [sys.executable, str(root / "predict.py"), f"input={bad}", "output=strict.jsonl", "on_error=raise",
         f"checkpoint={tiny_onnx_checkpoint}", f"backend={backend}", "progress=false"],
        cwd=tmp_path, env=env, capture_output=True, timeout=120,
    )
    assert proc.returncode != 0
    assert f"{bad}:2: malformed JSON" in proc.stderr.decode()


@pytest.mark.parametrize("overrides, key", [
    (["backend=tensorrt"], "backend"), (["backend=onnx", "precision=bf16"], "precision"),
    (["backend=torch", "precision=int8"], "precision"), (["precision=fp8"], "precision"),
    (["recheck_margin=-0.1"], "recheck_margin"), (["+recheck_margin.int9=0.5"], "recheck_margin"),
    (["recheck_margin={int8: -1}"], "recheck_margin"), (["num_threads=0"], "num_threads"),
    ([], None), (["backend=onnx", "precision=int8", "recheck_margin={int8: 0.3}"], None),
    (["backend=torch", "precision=bf16", "recheck_margin=0.05", "num_threads=2"], None),
])
def test_backend_settings_are_checked_at_start(root, tmp_path, overrides, key):
    from hydra import compose, initialize_config_dir

    src = write_jsonl(tmp_path / "in.jsonl", records(2))
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        cfg = compose("predict", overrides=[f"input={src}", f"output={tmp_path / 'out.jsonl'}", *overrides])
    if key is None:
        validate_predict(cfg)
    else:
        with pytest.raises(ConfigError, match=rf"^{key}="):
            validate_predict(cfg)


@pytest.mark.parametrize("engine", ["openvino", "onnx"])
def test_graph_backends_refuse_several_launched_processes(root, tmp_path, tiny_onnx_checkpoint, monkeypatch, engine):
    """Under accelerate launch / torchrun the processes meet through torch.distributed, which a graph
    backend's process never loads: asked for by name it refuses, before writing anything."""
    from hydra import compose, initialize_config_dir

    from abstract_tagger.inference.files import predict_from_config

    src = write_jsonl(tmp_path / "in.jsonl", records(2))
    with initialize_config_dir(str(root / "conf"), version_base="1.3"):
        cfg = compose("predict", overrides=[f"input={src}", f"output={tmp_path / 'out.jsonl'}", f"backend={engine}",
                                            f"checkpoint={tiny_onnx_checkpoint}"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=f"^backend={engine} runs in one process"):
        predict_from_config(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
