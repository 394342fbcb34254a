"""Tagger on a tiny BERT trained a few steps here, plus the published checkpoint with plain transformers."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import BACKENDS, CALIBRATION, SPEECH, TRAIN

from abstract_tagger import Tagger
from abstract_tagger.checkpoint.format import CheckpointError, check_checkpoint, save_rules
from abstract_tagger.common.cpu import cpu_has_native_bf16
from abstract_tagger.data.corpus import Paper
from abstract_tagger.inference.backends.base import logit, sigmoid
from abstract_tagger.inference.options import choose_backend

PUBLISHED = Path(__file__).resolve().parents[2] / "checkpoints/abstract-tagger-minilm"


@pytest.fixture(scope="session", params=BACKENDS)
def tagger(request, tiny_onnx_checkpoint) -> Tagger:
    return Tagger.from_pretrained(tiny_onnx_checkpoint, backend=request.param, precision="fp32", batch_size=2)


def test_predict_accepts_strings_records_and_papers(tagger):
    title, abstract = SPEECH
    results = tagger.predict([
        f"{title}. {abstract}",
        {"title": title, "abstract": abstract},
        Paper(id="p1", title=title, abstract=abstract),
    ])
    assert [r["tags"] for r in results] == [["speech-audio"]] * 3
    assert list(results[0]["scores"]) == tagger.labels
    assert results[0]["scores"] == pytest.approx(results[2]["scores"], abs=1e-6)


def test_each_trained_abstract_gets_its_tag_in_input_order(tagger):
    results = tagger.predict([{"title": t, "abstract": a} for (t, a), _ in TRAIN])
    assert [r["tags"] for r in results] == [[tag] for _, tag in TRAIN]


def test_length_sorted_batches_give_the_scores_of_one_at_a_time(tagger):
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN] + ["Speech.", "A " + "long vision paper " * 20]
    batched = tagger.scores(texts)
    single = np.concatenate([tagger.scores([t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_top_k_and_threshold_overrides(tagger):
    scores = tagger.scores([f"{t}. {a}" for (t, a), _ in TRAIN])
    everything = tagger.decide(scores, threshold=0.0)
    assert all(len(tags) == len(tagger.labels) for tags in everything)
    assert everything[0][0] == "speech-audio"
    assert tagger.decide(scores, threshold=0.0, top_k=2) == [tags[:2] for tags in everything]
    assert tagger.decide(scores, threshold=1.0) == [[], [], []]


def test_record_without_abstract_is_an_error(tagger):
    with pytest.raises(ValueError, match="no abstract"):
        tagger.predict([{"id": "x", "title": "only a title"}])


def test_bf16_and_fp32_agree_on_tags(tiny_checkpoint):
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN]
    fp32 = Tagger.from_pretrained(tiny_checkpoint, precision="fp32")
    bf16 = Tagger.from_pretrained(tiny_checkpoint, precision="bf16", recheck_margin=0)
    assert bf16.backend.dtype == torch.bfloat16 and fp32.backend.dtype is None
    a, b = fp32.scores(texts), bf16.scores(texts)
    assert 0 < np.abs(a - b).max() < 0.05
    assert fp32.decide(a) == bf16.decide(b)


@pytest.mark.parametrize(("backend", "reduced"), [
    ("torch", "bf16"), ("onnx", "int8"),
    pytest.param("openvino", "bf16", marks=pytest.mark.skipif(not cpu_has_native_bf16(), reason="no bf16 CPU")),
])
def test_reduced_precision_rescores_rows_near_a_threshold_exactly(tiny_onnx_checkpoint, backend, reduced):
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN] + ["Speech.", "A " + "long vision paper " * 20]
    fp32 = Tagger.from_pretrained(tiny_onnx_checkpoint, backend=backend, precision="fp32").scores(texts)
    tagger = Tagger.from_pretrained(tiny_onnx_checkpoint, backend=backend, precision=reduced)
    assert tagger.backend.reduced == reduced and tagger.backend.recheck_margin > 0
    raw = sigmoid(tagger.backend.forward(texts, exact=False))
    margin = float(np.quantile(np.abs(logit(raw) - logit(0.5)).min(axis=1), 0.5))  # about half the rows
    tagger.backend.recheck_margin = margin
    near = (np.abs(logit(raw) - logit(0.5)) < margin).any(axis=1)
    assert 0 < near.sum() < len(texts)
    rescored = tagger.scores(texts, threshold=0.5)
    # The rescored rows are batched (so padded) differently: equal up to float rounding.
    np.testing.assert_allclose(rescored[near], fp32[near], atol=1e-6)
    np.testing.assert_array_equal(rescored[~near], raw[~near])
    tagger.backend.recheck_margin = 100.0
    np.testing.assert_allclose(tagger.scores(texts), fp32, atol=1e-6)


def test_rows_reduced_precision_made_nan_are_rescored_even_with_the_recheck_off(tiny_onnx_checkpoint):
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN]
    fp32 = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="onnx", precision="fp32").scores(texts)
    tagger = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="onnx", precision="int8", recheck_margin=0)
    fast = tagger.backend.logits

    def overflowing(input_ids, mask, exact):  # what an overflow in reduced precision gives one paper
        out = fast(input_ids, mask, exact)
        if not exact:
            out[0] = np.nan
        return out

    tagger.backend.logits = overflowing
    nan_rows = [int(rows[0]) for rows, _, _ in tagger.backend.batches(texts)]  # the first row of each batch
    int8 = sigmoid(tagger.backend.forward(texts, exact=False))
    scores = tagger.scores(texts)
    assert np.isfinite(scores).all()
    others = np.setdiff1d(np.arange(len(texts)), nan_rows)
    assert len(others) and not np.allclose(int8[others], fp32[others], atol=1e-6)
    np.testing.assert_allclose(scores[nan_rows], fp32[nan_rows], atol=1e-6)  # rescored exactly
    np.testing.assert_array_equal(scores[others], int8[others])               # the rest left as they were


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="OpenVINO's bf16 needs bf16 instructions")
def test_openvino_compile_cache_keeps_precisions_apart(tiny_onnx_checkpoint, tmp_path, monkeypatch):
    """OpenVINO's cache key leaves out the precision hint: the fp32 graph compiled and cached first, then
    loaded for bf16 from the same folder, gave NaN on every paper."""
    from abstract_tagger.inference.backends import openvino_backend

    texts = [f"{t}. {a}" for (t, a), _ in TRAIN]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "uncached"))
    monkeypatch.setattr(openvino_backend, "cache_dir", lambda hint: None)
    exact = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="openvino", precision="fp32").backend.forward(
        texts, exact=True)
    fast = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="openvino", precision="bf16").backend.forward(
        texts, exact=False)
    assert 0 < np.abs(fast - exact).max() < 0.1
    monkeypatch.undo()
    for order in (("fp32", "bf16"), ("bf16", "fp32")):  # either may reach the cache first
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "-".join(order)))
        for precision in order:
            backend = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="openvino", precision=precision).backend
            np.testing.assert_array_equal(backend.forward(texts, exact=precision == "fp32"),
                                          exact if precision == "fp32" else fast)


def test_blend_recheck_rescores_papers_whose_model_score_is_near_a_flip(tiny_onnx_checkpoint, taxonomy):
    """With a rule blend, a tag flips where the model's score crosses (cut - w * rules) / (1 - w): the
    papers rescored exactly are those near that, not those whose blended score is near the cut (which
    rescored 61% of papers, mostly for their rule scores)."""
    from abstract_tagger.inference.tagger import as_paper
    from abstract_tagger.labeling.label_model import MajorityVote
    from abstract_tagger.labeling.rule_blend import RuleBlend, rule_functions

    texts = [f"{t}. {a}" for (t, a), _ in TRAIN] + ["Speech.", "A " + "long vision paper " * 20]
    tagger = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="onnx", precision="int8")
    votes = rule_functions(taxonomy, 1)([as_paper(t) for t in texts])
    tagger.blend = RuleBlend.fit(taxonomy, 1, votes, MajorityVote(), weight=0.4)
    rules = tagger.blend.rule_probs([as_paper(t) for t in texts])
    assert 0 < rules.mean() < 1
    backend = tagger.backend
    raw = sigmoid(backend.forward(texts, exact=False))
    exact = sigmoid(backend.forward(texts, exact=True))
    model_cut = np.clip((tagger.thresholds - 0.4 * rules) / 0.6, 0, 1)
    distance = np.abs(logit(raw) - logit(model_cut)).min(axis=1)
    backend.recheck_margin = float(np.quantile(distance, 0.5))
    near = distance < backend.recheck_margin
    assert 0 < near.sum() < len(texts)
    out = tagger.scores(texts)
    np.testing.assert_allclose(out[near], tagger.blend.mix(exact, rules)[near], atol=1e-6)
    np.testing.assert_allclose(out[~near], tagger.blend.mix(raw, rules)[~near], atol=1e-6)


def record_batches(backend) -> list[tuple[int, bool]]:
    """(papers, exact) of every batch `backend` runs from now on."""
    shapes, run = [], backend.run
    backend.run = lambda batches, exact: run(
        ((shapes.append((len(batch[0]), exact)), batch)[1] for batch in batches), exact)
    return shapes


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_the_recheck_runs_in_small_batches(tiny_onnx_checkpoint, engine):
    """The recheck's graph keeps its activations small: batches of 1,024 tokens' worth of papers (8 at
    128 tokens, 4 at 256), whatever batch_size is (peak RSS 560 -> 475 MB with OpenVINO on the published
    MiniLM at 128 tokens, 568 -> 537 MB at 256); the fast pass keeps batch_size."""
    tagger = Tagger.from_pretrained(tiny_onnx_checkpoint, backend=engine, precision="int8", batch_size=32,
                                    recheck_margin=100.0)  # every paper rechecked
    shapes = record_batches(tagger.backend)
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN] * 7
    reference = Tagger.from_pretrained(tiny_onnx_checkpoint, backend=engine, precision="fp32").scores(texts)
    for max_length, expected in ((128, [(21, False), (8, True), (8, True), (5, True)]),
                                 (256, [(21, False), (4, True), (4, True), (4, True), (4, True), (4, True), (1, True)])):
        tagger.backend.max_length = max_length  # the batch a checkpoint of that length would get (texts are shorter)
        shapes.clear()
        np.testing.assert_allclose(tagger.scores(texts), reference, atol=1e-6)
        assert shapes == expected


@pytest.mark.parametrize("engine", BACKENDS)
def test_the_default_batch_holds_2048_tokens_of_papers(tiny_onnx_checkpoint, engine):
    """batch_size=None (the default): 16 papers a batch at 128 tokens, 8 at 256, where 8 ran as fast as
    16 and took torch bf16's peak RSS on the published MiniLM from ~737 to ~676 MB; a number is kept."""
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN] * 7
    for batch_size, max_length, expected in ((None, 128, [16, 5]), (None, 256, [8, 8, 5]), (32, 256, [21])):
        tagger = Tagger.from_pretrained(tiny_onnx_checkpoint, backend=engine, precision="fp32", batch_size=batch_size)
        tagger.backend.max_length = max_length  # the batch a checkpoint of that length would get (texts are shorter)
        shapes = record_batches(tagger.backend)
        tagger.scores(texts)
        assert [papers for papers, _ in shapes] == expected


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_the_two_graphs_are_never_held_at_once(tiny_onnx_checkpoint, engine):
    """OpenVINO drops each graph after its pass and loads it again when next needed (published MiniLM at
    256 tokens, 2,048 abstracts: peak RSS int8 494 -> 425 MB, bf16 447 -> 386 MB); ONNX Runtime drops the
    fp32 graph and has its int8 graph free its buffers. Call after call the scores stay fp32's."""
    tagger = Tagger.from_pretrained(tiny_onnx_checkpoint, backend=engine, precision="int8",
                                    recheck_margin=100.0)  # every paper rechecked
    backend = tagger.backend
    held, release_memory = [], backend.release_memory
    # What is held as each pass ends, before it lets go of anything.
    backend.release_memory = lambda exact: held.append((exact, sorted(set(vars(backend)) & {"fast", "exact"}))) \
        or release_memory(exact)
    released, release = [], backend._release
    backend._release = lambda graph: released.append(graph is backend.fast) or release(graph)
    loads, load = [], backend._load
    backend._load = lambda name, bf16, main: loads.append((name, bf16, main)) or load(name, bf16, main)
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN]
    reference = Tagger.from_pretrained(tiny_onnx_checkpoint, backend=engine, precision="fp32").scores(texts)
    for _ in range(2):
        np.testing.assert_allclose(tagger.scores(texts), reference, atol=1e-6)
        assert "exact" not in vars(backend)
    fast, exact = ("model_quantized.onnx", False, True), ("model.onnx", False, False)
    if engine == "openvino":
        assert held == [(False, ["fast"]), (True, ["exact"])] * 2 and released == []
        # The fast graph comes back as it was loaded first: the int8 graph, the main pass's hints.
        assert loads == [exact, fast, exact]
    else:
        assert held == [(False, ["fast"]), (True, ["exact", "fast"])] * 2 and released == [True, True]
        assert loads == [exact, exact]


def test_openvino_keeps_both_graphs_where_it_has_no_compile_cache(tiny_onnx_checkpoint, monkeypatch):
    """Without the cache every reload would be a compile (~0.7 s a chunk on the published MiniLM)."""
    from abstract_tagger.inference.backends import openvino_backend

    monkeypatch.setattr(openvino_backend, "cache_dir", lambda hint: None)
    tagger = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="openvino", precision="int8", recheck_margin=100.0)
    tagger.scores([f"{t}. {a}" for (t, a), _ in TRAIN])
    assert {"fast", "exact"} <= set(vars(tagger.backend))


def test_openvino_waits_for_its_batches_when_the_input_fails(tiny_onnx_checkpoint):
    """An error or an interrupt while batches are queued leaves no request running, and the graph
    scores as before afterwards."""
    backend = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="openvino", precision="fp32", batch_size=1).backend
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN]
    reference = backend.forward(texts, exact=True)

    def interrupted():
        yield from list(backend.batches(texts))[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backend.run(interrupted(), exact=True)
    np.testing.assert_allclose(backend.forward(texts, exact=True), reference, atol=1e-6)


def _nan_in_place(weights: Path, tensor: str) -> None:
    """NaN over `tensor`'s bytes, written into the file itself: same inode, size and modification time."""
    header_size = int.from_bytes(weights.read_bytes()[:8], "little")
    start, end = json.loads(weights.read_bytes()[8:8 + header_size])[tensor]["data_offsets"]
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(8 + header_size + start)
        f.write(np.full((end - start) // 4, np.nan, dtype=np.float32).tobytes())
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_weights_checked_once_are_checked_again_after_any_write(tiny_onnx_checkpoint, tmp_path, monkeypatch, engine):
    """A start reuses the digest of weights it checked while the file stays as it was (~85 ms a start on
    the published checkpoint), and checks again after a write, even one that keeps the size and sets the
    modification time back."""
    from abstract_tagger.inference.backends import graph

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = shutil.copytree(tiny_onnx_checkpoint, tmp_path / "ckpt")
    checked, check = [], graph.check_weights
    monkeypatch.setattr(graph, "check_weights", lambda weights: checked.append(weights) or check(weights))
    for _ in range(2):
        Tagger.from_pretrained(path, backend=engine, precision="fp32")
    assert len(checked) == 1
    # A memo whose digest is not one, or written under another version of the check, is not trusted.
    (memo,) = (tmp_path / "cache/abstract-tagger/verified-weights").iterdir()
    for damage in ({"sha256": "not a digest"}, {"check": "older"}):
        memo.write_text(json.dumps({**json.loads(memo.read_text()), **damage}))
        Tagger.from_pretrained(path, backend=engine, precision="fp32")
    assert len(checked) == 3
    _nan_in_place(path / "model.safetensors", "classifier.weight")
    with pytest.raises(CheckpointError, match=r"non-finite \(NaN/inf\) weights in classifier.weight"):
        Tagger.from_pretrained(path, backend=engine, precision="fp32")
    assert len(checked) == 4


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_onnx_graphs_give_torch_fp32_scores(tiny_onnx_checkpoint, engine):
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN] + ["Speech.", "A " + "long vision paper " * 20]
    torch_fp32 = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="torch", precision="fp32")
    onnx_fp32 = Tagger.from_pretrained(tiny_onnx_checkpoint, backend=engine, precision="fp32")
    int8 = Tagger.from_pretrained(tiny_onnx_checkpoint, backend=engine, precision="int8", recheck_margin=0)
    ref = torch_fp32.scores(texts)
    np.testing.assert_allclose(onnx_fp32.scores(texts), ref, atol=1e-5)
    # Static int8 moves this 2-layer toy's scores by up to ~0.07; the tags stay.
    assert np.abs(int8.scores(texts) - ref).max() < 0.1
    assert int8.decide(int8.scores(texts)) == torch_fp32.decide(ref)
    # The graphs keep no copy of the weights they share with model.safetensors (the word embeddings).
    assert (tiny_onnx_checkpoint / "model.onnx").stat().st_size < 0.1 * (
        tiny_onnx_checkpoint / "model.safetensors").stat().st_size


def test_every_backend_name_has_a_loader():
    from abstract_tagger.inference.options import BACKENDS
    from abstract_tagger.inference.tagger import BACKEND_LOADERS

    assert BACKENDS == ("auto", *BACKEND_LOADERS)


@pytest.mark.parametrize("flags, gpu, graphs, expected", [
    ({"avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"}, False, True, "openvino"),  # Intel, AMX
    ({"avx512_bf16", "avx512_vnni"}, False, True, "openvino"),  # AMD EPYC; Intel with AMX not exposed
    ({"avx2"}, False, True, "openvino"),                           # no bf16 instructions at all
    ({"avx512_bf16", "avx512_vnni"}, True, True, "torch"),    # a GPU
    ({"avx512_bf16", "avx512_vnni"}, False, False, "torch"),  # no ONNX graphs (an unpublished checkpoint)
])
def test_auto_backend_by_cpu_features(flags, gpu, graphs, expected, tiny_checkpoint, tiny_onnx_checkpoint,
                                      monkeypatch, caplog):
    from abstract_tagger.common import cpu
    from abstract_tagger.inference import options

    monkeypatch.setattr(cpu, "cpuinfo", lambda: ("Some CPU", flags))
    monkeypatch.setattr(options, "_gpu_visible", lambda: gpu)
    with caplog.at_level(logging.INFO, logger="abstract_tagger.inference.options"):
        chosen = choose_backend("auto", tiny_onnx_checkpoint if graphs else tiny_checkpoint)
    assert chosen == expected
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"backend=auto: {expected}"]


@pytest.mark.parametrize("precision, runs", [("auto", "bf16 at precision=auto"), ("int8", "int8"), ("fp32", "fp32")])
def test_auto_logs_the_precision_that_runs(precision, runs, tiny_onnx_checkpoint, monkeypatch, caplog):
    """The log line named auto's bf16 on an AMX CPU even where precision=int8 was set."""
    from abstract_tagger.common import cpu
    from abstract_tagger.inference import options

    monkeypatch.setattr(cpu, "cpuinfo", lambda: ("Some CPU", {"avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}))
    monkeypatch.setattr(options, "_gpu_visible", lambda: False)
    with caplog.at_level(logging.INFO, logger="abstract_tagger.inference.options"):
        choose_backend("auto", tiny_onnx_checkpoint, precision=precision)
    assert caplog.records[0].getMessage() == \
        f"backend=auto: openvino (AMX on this CPU: OpenVINO measured fastest; {runs})"


@pytest.mark.parametrize("flags, engine, expected", [
    ({"avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}, "openvino", "bf16"),  # AMX: bf16 matmuls
    ({"avx512_bf16", "avx512_vnni"}, "openvino", "int8"),                       # no AMX: VNNI int8
    ({"avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}, "onnx", "int8"),      # ONNX Runtime has no bf16 here
    ({"avx2"}, "onnx", "int8"),
])
def test_graph_precision_auto_by_cpu_features(flags, engine, expected, tiny_onnx_checkpoint, tmp_path, monkeypatch):
    from abstract_tagger.common import cpu

    monkeypatch.setattr(cpu, "cpuinfo", lambda: ("Some CPU", flags))
    backend = Tagger.from_pretrained(tiny_onnx_checkpoint, backend=engine).backend
    assert backend.reduced == expected
    assert backend.describe().startswith(f"{engine} on cpu, {expected},")
    no_int8 = shutil.copytree(tiny_onnx_checkpoint, tmp_path / "checkpoint")
    (no_int8 / "model_quantized.onnx").unlink()  # a checkpoint without the int8 graph: fp32 unless bf16
    backend = Tagger.from_pretrained(no_int8, backend=engine).backend
    assert backend.reduced == (expected if expected == "bf16" else None)


def test_a_margin_mapping_is_merged_over_the_defaults(tiny_onnx_checkpoint):
    """As predict.py's Hydra merges `recheck_margin={int8: 0.6}`: the other precisions keep theirs."""
    tagger = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="torch", precision="bf16",
                                    recheck_margin={"int8": 0.6})
    assert tagger.backend.recheck_margin == 0.1
    tagger = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="onnx", precision="int8",
                                    recheck_margin={"int8": 0.6})
    assert tagger.backend.recheck_margin == 0.6


def test_auto_runs_a_precision_only_torch_has_on_torch(tiny_onnx_checkpoint, monkeypatch):
    from abstract_tagger.common import cpu
    from abstract_tagger.inference import options

    monkeypatch.setattr(cpu, "cpuinfo", lambda: ("Some CPU", {"avx512_bf16", "amx_bf16", "amx_tile"}))
    monkeypatch.setattr(options, "_gpu_visible", lambda: False)
    assert choose_backend("auto", tiny_onnx_checkpoint, precision="fp16") == "torch"
    assert choose_backend("auto", tiny_onnx_checkpoint, precision="bf16") == "openvino"
    assert Tagger.from_pretrained(tiny_onnx_checkpoint, precision="fp16").backend.engine == "torch"


def test_graph_bf16_needs_bf16_instructions(tiny_onnx_checkpoint, monkeypatch):
    from abstract_tagger.common import cpu

    monkeypatch.setattr(cpu, "cpuinfo", lambda: ("Some CPU", {"avx2", "avx512_vnni"}))
    with pytest.raises(ValueError, match=r"^precision=bf16 for backend=openvino needs a CPU with bf16"):
        Tagger.from_pretrained(tiny_onnx_checkpoint, backend="openvino", precision="bf16")


def test_backend_choice(tiny_checkpoint, tiny_onnx_checkpoint, monkeypatch):
    from abstract_tagger.common import cpu
    from abstract_tagger.inference import options

    monkeypatch.setattr(cpu, "cpuinfo", lambda: ("Some CPU", {"avx512_bf16"}))
    monkeypatch.setattr(options, "_gpu_visible", lambda: False)
    assert choose_backend("auto", tiny_onnx_checkpoint) == "openvino"
    assert choose_backend("auto", tiny_checkpoint) == "torch"  # no ONNX graphs: torch, as before publishing
    assert choose_backend("auto", tiny_onnx_checkpoint, device="cuda") == "torch"
    assert choose_backend("torch", tiny_onnx_checkpoint) == "torch"
    monkeypatch.setattr(options, "_gpu_visible", lambda: True)
    assert choose_backend("auto", tiny_onnx_checkpoint) == "torch"
    assert choose_backend("onnx", tiny_onnx_checkpoint) == "onnx"
    assert choose_backend("openvino", tiny_onnx_checkpoint) == "openvino"
    for engine in ("onnx", "openvino"):
        with pytest.raises(CheckpointError, match="no model.onnx"):
            choose_backend(engine, tiny_checkpoint)
        with pytest.raises(ValueError, match=f"backend={engine} runs on the CPU, not on cuda"):
            choose_backend(engine, tiny_onnx_checkpoint, device="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("tensorrt", tiny_onnx_checkpoint)
    with pytest.raises(ValueError, match=r"^precision='bf16': must be one of \('auto', 'fp32', 'int8'\)"):
        Tagger.from_pretrained(tiny_onnx_checkpoint, backend="onnx", precision="bf16")


def test_graph_threads_default_to_physical_cores(tiny_onnx_checkpoint):
    from abstract_tagger.common.cpu import physical_cores

    for engine in ("onnx", "openvino"):
        assert Tagger.from_pretrained(tiny_onnx_checkpoint, backend=engine).backend.num_threads == physical_cores() >= 1
    one = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="onnx", num_threads=1).backend
    assert one.num_threads == 1 and one.fast.get_session_options().intra_op_num_threads == 1
    one = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="openvino", num_threads=1).backend
    assert one.fast.get_property("INFERENCE_NUM_THREADS") == 1


def test_openvino_runs_the_main_pass_a_batch_per_stream_and_the_recheck_one_at_a_time(tiny_onnx_checkpoint):
    """Streams ran the main pass 7% faster whole process on 2 cores (AMX Xeon, 256 tokens); the recheck's
    graph keeps one stream, whose buffers are half of two's. Scores stay fp32's either way."""
    int8 = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="openvino", precision="int8").backend
    fp32 = Tagger.from_pretrained(tiny_onnx_checkpoint, backend="openvino", precision="fp32").backend
    hint = "PERFORMANCE_HINT"
    assert (str(int8.fast.get_property(hint)), str(int8.exact.get_property(hint))) == ("THROUGHPUT", "LATENCY")
    assert str(fp32.fast.get_property(hint)) == "THROUGHPUT" and fp32.fast is fp32.exact
    texts = [f"{t}. {a}" for (t, a), _ in TRAIN] * 5
    np.testing.assert_allclose(int8.forward(texts, exact=True, batch_size=2), fp32.forward(texts, exact=True),
                               atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_graph_backend_process_never_imports_torch(tiny_onnx_checkpoint, taxonomy, tmp_path, root, engine):
    """predict.py and the Tagger API on a graph backend, rule blend included: no torch, transformers or
    sklearn loaded."""
    from abstract_tagger.labeling.label_model import MajorityVote
    from abstract_tagger.labeling.rule_blend import RuleBlend, rule_functions

    tiny_onnx_checkpoint = shutil.copytree(tiny_onnx_checkpoint, tmp_path / "blended")
    votes = rule_functions(taxonomy, 2)([Paper("x", "x", "x")])
    save_rules(RuleBlend.fit(taxonomy, 2, votes, MajorityVote(), weight=0.4), tiny_onnx_checkpoint)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "title": SPEECH[0], "abstract": SPEECH[1]}) + "\n")
    script = f"""
import runpy, sys
sys.argv = ["predict.py", "input={tmp_path / 'in.jsonl'}", "output={tmp_path / 'out.jsonl'}",
            "checkpoint={tiny_onnx_checkpoint}", "progress=false", "backend={engine}"]
runpy.run_path({str(root / 'predict.py')!r}, run_name="__main__")
from abstract_tagger import Tagger
tags = Tagger.from_pretrained({str(tiny_onnx_checkpoint)!r}, backend={engine!r}).predict([{" ".join(SPEECH)!r}])[0]["tags"]
print("TAGS", tags, "LOADED", sorted(m for m in ("torch", "transformers", "sklearn", "accelerate") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TAGS ['speech-audio'] LOADED []" in proc.stdout
    assert json.loads((tmp_path / "out.jsonl").read_text())["tags"] == ["speech-audio"]


def _nan_classifier(path):
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    state["classifier.weight"] = torch.full_like(state["classifier.weight"], float("nan"))
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("damage, message", [
    (_nan_classifier, r"non-finite \(NaN/inf\) weights in classifier.weight"),
    (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:1000]),
     "cannot load: SafetensorError"),
    # The engine's reason, not only where it failed (OpenVINO gives it after its C++ frames).
    (lambda p: (p / "model.onnx").write_bytes(b"not a graph"), r"cannot load model\.onnx: \w+: .*([Pp]ars|read the model)"),
], ids=["nan-weights", "half-safetensors", "bad-graph"])
@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_graph_backends_refuse_a_broken_checkpoint_naming_it(tiny_onnx_checkpoint, tmp_path, damage, message, engine):
    """What torch's loading refuses, the graph backends refuse too (their graphs read model.safetensors)."""
    path = shutil.copytree(tiny_onnx_checkpoint, tmp_path / "ckpt")
    damage(path)
    with pytest.raises(CheckpointError, match=message) as err:
        Tagger.from_pretrained(path, backend=engine, precision="fp32")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("remove", ["config.json", "tokenizer.json", "thresholds.json", "model.safetensors"])
def test_incomplete_checkpoint_names_the_missing_file(tiny_checkpoint, tmp_path, remove):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (broken / remove).unlink()
    with pytest.raises(CheckpointError, match=rf"missing {remove.replace('.', '[.]')}"):
        Tagger.from_pretrained(broken)


def test_pickle_only_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights .*pytorch_model.bin"):
        check_checkpoint(broken)


@pytest.mark.slow
def test_published_checkpoint_tags_with_plain_pipeline():
    from transformers import pipeline

    thresholds = json.loads((PUBLISHED / "thresholds.json").read_text())
    classify = pipeline("text-classification", model=str(PUBLISHED), top_k=None, truncation=True)
    text = f"{SPEECH[0]}. {SPEECH[1]}"
    scores = {s["label"]: s["score"] for s in classify([text])[0]}
    assert set(scores) == set(thresholds)
    assert max(scores, key=scores.get) == "speech-audio"
    assert scores["speech-audio"] >= thresholds["speech-audio"]
    assert Tagger.from_pretrained(PUBLISHED).predict([text])[0]["tags"][0] == "speech-audio"


@pytest.mark.slow
def test_published_checkpoint_reproduces_its_test_score(root, taxonomy, tmp_path):
    """predict.py on the recent test papers gives the model card's model-index score for test/recent."""
    import gzip

    from abstract_tagger.data.corpus import read_gold
    from abstract_tagger.metrics import score

    gold = read_gold(root / "data/gold_recent_test.jsonl", taxonomy.ids)
    src = tmp_path / "test.jsonl"
    with gzip.open(root / "data/arxiv_recent_subset.jsonl.gz", "rt", encoding="utf-8") as f:
        src.write_text("".join(line for line in f if json.loads(line)["id"] in gold.tags), encoding="utf-8")
    out = tmp_path / "tags.jsonl"
    subprocess.run([sys.executable, str(root / "predict.py"), f"input={src}", "format=arxiv", f"output={out}",
                    f"checkpoint={PUBLISHED}", "progress=false"], check=True, cwd=tmp_path)
    rows = {r["id"]: r["tags"] for r in map(json.loads, out.read_text().splitlines())}
    pred = np.array([[t in rows[pid] for t in taxonomy.ids] for pid in gold.tags])
    got = score(pred, gold.labels(taxonomy.ids), taxonomy.ids)
    header = (PUBLISHED / "README.md").read_text().split("---\n")[1]
    results = yaml.safe_load(header)["model-index"][0]["results"]
    card = next(r for r in results if r["dataset"]["name"] == "gold test/recent")
    metrics = {m["name"]: m["value"] for m in card["metrics"]}
    assert got.micro_f1 == pytest.approx(metrics["micro-F1"], abs=0.01)
    assert got.macro_f1 == pytest.approx(metrics["macro-F1"], abs=0.01)


def test_onnx_export_keeps_onnxruntime_info_out_of_the_logs(tiny_checkpoint, tmp_path, caplog):
    """The optimizer and quantizer logged every fusion and tensor at INFO: most of a train.log."""
    import logging
    import shutil

    from abstract_tagger.checkpoint.onnx_export import export_onnx

    with caplog.at_level(logging.INFO):
        export_onnx(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"), CALIBRATION)
        assert [r.getMessage() for r in caplog.records if r.levelno < logging.WARNING] == []
        logging.getLogger("after").info("shown again")  # logging is back as it was
    assert "shown again" in caplog.text
