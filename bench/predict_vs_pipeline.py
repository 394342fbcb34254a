"""predict (Tagger / predict.py) against `transformers.pipeline` on the same checkpoint and machine.

    python bench/predict_vs_pipeline.py [--checkpoint DIR] [--rss-checkpoint DIR] [--backend auto|openvino|onnx|torch] [--quick]
    python bench/predict_vs_pipeline.py --matrix [--quick]   # one row per backend x precision, auto's marked

Measures, in one run so that ratios are comparable on a shared machine:
  - time to the first tag: import + load + one abstract, with the Tagger API and with predict.py,
    each in a fresh process (best and median of 3);
  - steady-state abstracts/s (model loaded and warmed up) of Tagger.scores vs the pipeline in fp32 at
    batch 32, on the 215 seed abstracts and on 5,000 abstracts (the default corpus repeated);
  - whole-process abstracts/s: `python predict.py` vs a pipeline script, both from a cold start;
  - agreement: papers whose tag set (same thresholds) is identical, and the largest score change;
  - predict's overhead over a bare forward loop on exactly the batches it feeds the model;
  - peak RSS of predict.py on 10,000 and 100,000 abstracts (each in its own process).
Results go to bench/out/predict_vs_pipeline.json and are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from itertools import cycle, islice
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench/out"
PIPELINE_BATCH = 32
CHUNK = 1024  # predict.py's default chunk_size


def corpus_texts() -> tuple[list[dict], list[dict]]:
    """(seed papers, default corpus papers) as {id, title, abstract} records."""
    from abstract_tagger.data.corpus import Paper, read_source

    def records(items):
        return [{"id": p.id, "title": p.title, "abstract": p.abstract} for p in items if isinstance(p, Paper)]

    seed = records(read_source(ROOT / "data/hf_papers_seed.txt", "seed"))
    arxiv = records(read_source(ROOT / "data/arxiv_ml_sample.csv", "csv",
                                fields={"title": "titles", "abstract": "summaries", "categories": "terms"}))
    return seed, seed + arxiv


def repeat(records: list[dict], n: int) -> list[dict]:
    return [{**r, "id": f"{r['id']}#{i}"} for i, r in enumerate(islice(cycle(records), n))]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def make_pipeline(checkpoint: Path):
    import torch
    from transformers import pipeline

    return pipeline("text-classification", model=str(checkpoint), top_k=None, dtype=torch.float32, device="cpu")


def pipeline_scores(pipe, texts: list[str], labels: list[str]) -> np.ndarray:
    results = pipe(texts, batch_size=PIPELINE_BATCH, truncation=True, max_length=pipe.tokenizer.model_max_length)
    index = {t: j for j, t in enumerate(labels)}
    out = np.empty((len(texts), len(labels)), dtype=np.float32)
    for i, result in enumerate(results):
        for item in result:
            out[i, index[item["label"]]] = item["score"]
    return out


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def overhead_vs_bare(tagger, texts: list[str], repeats: int = 3) -> float:
    """Tagger.scores (tokenizing, batching, restoring order) over the model alone on exactly the
    batches it builds; best of `repeats` each, interleaved, since the machine is shared."""
    backend = tagger.backend
    batches = list(backend.batches(texts))
    bare, full = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in backend.run(batches, exact=backend.reduced is None):
            pass
        bare.append(time.perf_counter() - start)
        full.append(timed(tagger.scores, texts)[1])
    return min(full) / min(bare) - 1


def same_tags(a: list[list[str]], b: list[list[str]]) -> float:
    return float(np.mean([set(x) == set(y) for x, y in zip(a, b)]))


def steady_state(checkpoint: Path, sets: dict[str, list[dict]], backend: str) -> dict:
    from abstract_tagger import Tagger
    from abstract_tagger.inference.backends.base import near_cut
    from abstract_tagger.inference.tagger import as_paper, as_text

    tagger = Tagger.from_pretrained(checkpoint, backend=backend)
    no_recheck = Tagger.from_pretrained(checkpoint, backend=backend, recheck_margin=0)
    pipe = make_pipeline(checkpoint)
    model = tagger.backend
    results = {"backend": model.describe(), "batch_size": model.pass_batch_size(), "max_length": model.max_length,
               "recheck_margin": model.recheck_margin}
    warm = [as_text(r) for r in sets["seed"][:PIPELINE_BATCH]]
    tagger.scores(warm), pipeline_scores(pipe, warm, tagger.labels)
    for name, records in sets.items():
        texts = [as_text(r) for r in records]
        # Alternating chunk by chunk (predict.py's chunk size) exposes both to the same load on a shared machine.
        ref, scores, t_pipe, t_pred = [], [], 0.0, 0.0
        for start in range(0, len(texts), CHUNK):
            out, seconds = timed(pipeline_scores, pipe, texts[start:start + CHUNK], tagger.labels)
            ref.append(out)
            t_pipe += seconds
            out, seconds = timed(tagger.scores, records[start:start + CHUNK])  # records, as predict.py passes
            scores.append(out)
            t_pred += seconds
        ref, scores = np.concatenate(ref), np.concatenate(scores)
        # The reference is torch fp32 as the checkpoint ships it: the pipeline's scores, with the
        # checkpoint's rule blend applied the same way when it has one.
        raw_model = no_recheck.backend.probabilities(texts, tagger.thresholds)
        raw, cut = raw_model, tagger.thresholds
        if tagger.blend is not None:
            rules = tagger.blend.rule_probs([as_paper(r) for r in records])
            ref, raw = tagger.blend.mix(ref, rules), tagger.blend.mix(raw_model, rules)
            cut = tagger.blend.model_cut(tagger.thresholds, rules)
        ref_tags = tagger.decide(ref)
        results[name] = {
            "n": len(texts),
            "pipeline_per_s": len(texts) / t_pipe,
            "predict_per_s": len(texts) / t_pred,
            "speedup": t_pipe / t_pred,
            "same_tags": same_tags(tagger.decide(scores), ref_tags),
            "max_score_diff": float(np.abs(scores - ref).max()),
            "rechecked": float(near_cut(raw_model, cut, model.recheck_margin).mean()),
            "same_tags_without_recheck": same_tags(no_recheck.decide(raw), ref_tags),
            "max_score_diff_without_recheck": float(np.abs(raw - ref).max()),
            "overhead_vs_bare": overhead_vs_bare(no_recheck, texts[:1000]),
            "mean_tags": float(np.mean([len(t) for t in ref_tags])),
        }
        print(name, json.dumps(results[name]), flush=True)
    return results


# A forked child's peak RSS counts the parent's memory at the fork (this process holds the pipeline
# and torch: ~1.1 GB), so each command runs under a fresh, small Python that reports its child's peak.
_MEASURE = ("import resource, subprocess, sys, time; start = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); "
            "print('\\nMEASURED', time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(rc)")


def run_child(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    output = proc.stdout.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{output[-3000:]}")
    wall, rss_kb = output.rsplit("MEASURED", 1)[1].split()
    return float(wall), int(rss_kb) / 1024


def predict_cli(checkpoint: Path, input: Path, backend: str) -> list[str]:
    return [sys.executable, str(ROOT / "predict.py"), f"input={input}", f"output={input.with_suffix('.tags.jsonl')}",
            f"checkpoint={checkpoint}", f"backend={backend}", "progress=false"]


def first_tag(checkpoint: Path, record: dict, backend: str, repeats: int = 3) -> dict:
    """Seconds from a fresh process to one abstract's tags: the Tagger API, and predict.py on a 1-line file."""
    api = [sys.executable, "-c", "import sys; from abstract_tagger import Tagger; "
           f"print(Tagger.from_pretrained(sys.argv[1], backend={backend!r}).predict([sys.argv[2]])[0]['tags'])",
           str(checkpoint), f"{record['title']}. {record['abstract']}"]
    cli = predict_cli(checkpoint, write_jsonl(OUT / "one.jsonl", [record]), backend)
    results = {}
    for name, args in (("api", api), ("predict.py", cli)):
        walls = sorted(run_child(args)[0] for _ in range(repeats))
        results[name] = {"best_s": walls[0], "median_s": walls[len(walls) // 2], "peak_rss_mb": run_child(args)[1]}
        print("first tag", name, json.dumps(results[name]), flush=True)
    return results


def whole_process(checkpoint: Path, files: dict[str, Path], backend: str) -> dict:
    results = {}
    for name, path in files.items():
        n = sum(1 for _ in open(path))
        t_pred, _ = run_child(predict_cli(checkpoint, path, backend))
        t_pipe, _ = run_child([sys.executable, __file__, "--pipeline-worker", str(path),
                               "--checkpoint", str(checkpoint)])
        results[name] = {"n": n, "predict_per_s": n / t_pred, "pipeline_per_s": n / t_pipe, "speedup": t_pipe / t_pred}
        print(name, "whole process", json.dumps(results[name]), flush=True)
    return results


def pipeline_worker(path: Path, checkpoint: Path) -> None:
    """The pipeline peer of `predict.py`: read JSON lines, tag, write JSON lines."""
    from abstract_tagger.inference.tagger import as_text

    pipe = make_pipeline(checkpoint)
    thresholds = json.loads((checkpoint / "thresholds.json").read_text())
    labels = list(pipe.model.config.id2label.values())
    records = [json.loads(line) for line in open(path)]
    scores = pipeline_scores(pipe, [as_text(r) for r in records], labels)
    cut = np.array([thresholds[t] for t in labels])
    with open(path.with_suffix(".pipeline.jsonl"), "w") as f:
        for r, row in zip(records, scores):
            f.write(json.dumps({"id": r["id"], "tags": [t for t, s, c in zip(labels, row, cut) if s >= c]}) + "\n")


def peak_rss(checkpoint: Path, files: dict[str, Path], backend: str) -> dict:
    results = {}
    for name, path in files.items():
        wall, rss = run_child(predict_cli(checkpoint, path, backend))
        n = sum(1 for _ in open(path))
        results[name] = {"n": n, "peak_rss_mb": rss, "per_s": n / wall}
        print(name, "peak RSS", json.dumps(results[name]), flush=True)
    return results


# Every backend x precision that predict.py can run on a CPU, each measured whole process.
MATRIX = (("openvino", "bf16"), ("openvino", "int8"), ("openvino", "fp32"), ("onnx", "int8"), ("onnx", "fp32"),
          ("torch", "bf16"), ("torch", "fp32"))


def auto_pick(checkpoint: Path) -> tuple[str, str]:
    """What backend=auto precision=auto run on this machine (as predict.py resolves them)."""
    from abstract_tagger.checkpoint.format import ONNX_INT8
    from abstract_tagger.common.runtime import fast_precision
    from abstract_tagger.inference.options import GRAPH_BACKENDS, choose_backend, graph_precision

    backend = choose_backend("auto", checkpoint)
    if backend in GRAPH_BACKENDS:
        return backend, graph_precision(backend, "auto", (checkpoint / ONNX_INT8).is_file())
    return backend, fast_precision("cpu")


def matrix(checkpoint: Path, path: Path) -> list[dict]:
    """Whole-process predict.py for each of MATRIX and the pipeline peer (fp32) on one input file, with
    the share of papers whose tag set equals torch fp32's (rule blend included)."""
    from abstract_tagger.inference.options import runnable_precisions

    n = sum(1 for _ in open(path))
    t_pipe, rss_pipe = run_child([sys.executable, __file__, "--pipeline-worker", str(path),
                                  "--checkpoint", str(checkpoint)])
    rows, tags = [{"run": "transformers.pipeline fp32, batch 32", "seconds": t_pipe, "peak_rss_mb": rss_pipe}], {}
    for backend, precision in MATRIX:
        if precision not in runnable_precisions(backend):
            continue
        wall, rss = run_child([*predict_cli(checkpoint, path, backend), f"precision={precision}"])
        tags[backend, precision] = [r["tags"] for r in map(json.loads, open(path.with_suffix(".tags.jsonl")))]
        rows.append({"run": f"predict.py backend={backend} precision={precision}", "backend": backend,
                     "precision": precision, "seconds": wall, "peak_rss_mb": rss})
        print(json.dumps(rows[-1]), flush=True)
    ref = tags["torch", "fp32"]
    for row in rows:
        row["n"], row["vs_pipeline"] = n, t_pipe / row["seconds"]
        if "backend" in row:
            row["same_tags"] = same_tags(tags[row["backend"], row["precision"]], ref)
    return rows


def print_matrix(rows: list[dict], pick: tuple[str, str], cpu: str) -> None:
    print(f"\nCPU: {cpu}; {rows[0]['n']:,} abstracts, whole process from a cold start")
    print("| run | seconds | vs pipeline | peak RSS | same tag sets as torch fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        mark = " (auto's pick)" if (r.get("backend"), r.get("precision")) == pick else ""
        same = f"{r['same_tags']:.2%}" if "same_tags" in r else ""
        print(f"| {r['run']}{mark} | {r['seconds']:.1f} | {r['vs_pipeline']:.2f}x | {r['peak_rss_mb']:.0f} MB "
              f"| {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints/abstract-tagger-minilm")
    parser.add_argument("--rss-checkpoint", type=Path, default=None,
                        help="checkpoint for the peak-RSS runs (default: --checkpoint)")
    parser.add_argument("--backend", default="auto", choices=["auto", "openvino", "onnx", "torch"])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--matrix", action="store_true", help="only the backend x precision table")
    parser.add_argument("--pipeline-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline_worker:
        pipeline_worker(args.pipeline_worker, args.checkpoint)
        return
    import torch

    seed, corpus = corpus_texts()
    large, rss_small, rss_large = (500, 1_000, 10_000) if args.quick else (5_000, 10_000, 100_000)
    if args.matrix:
        from abstract_tagger.common.cpu import cpu_description

        rows = {name: matrix(args.checkpoint, write_jsonl(OUT / f"matrix-{name}.jsonl", records))
                for name, records in (("seed", seed), (f"{large}", repeat(corpus, large)))}
        pick, cpu = auto_pick(args.checkpoint), cpu_description()
        (OUT / "predict_matrix.json").write_text(json.dumps({"cpu": cpu, "auto": pick, "rows": rows}, indent=2) + "\n")
        for table in rows.values():
            print_matrix(table, pick, cpu)
        return
    sets = {"seed": seed, f"{large}": repeat(corpus, large)}
    files = {name: write_jsonl(OUT / f"bench-{name}.jsonl", records) for name, records in sets.items()}
    rss_files = {f"{n}": write_jsonl(OUT / f"rss-{n}.jsonl", repeat(corpus, n)) for n in (rss_small, rss_large)}
    report = {
        "checkpoint": str(args.checkpoint),
        "rss_checkpoint": str(args.rss_checkpoint or args.checkpoint),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
        "first_tag": first_tag(args.checkpoint, seed[0], args.backend),
        "steady_state": steady_state(args.checkpoint, sets, args.backend),
        "whole_process": whole_process(args.checkpoint, files, args.backend),
        "peak_rss": peak_rss(args.rss_checkpoint or args.checkpoint, rss_files, args.backend),
        "load_average_end": os.getloadavg(),
    }
    rss = report["peak_rss"]
    report["rss_ratio"] = rss[f"{rss_large}"]["peak_rss_mb"] / rss[f"{rss_small}"]["peak_rss_mb"]
    (OUT / "predict_vs_pipeline.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n| set | pipeline fp32 b{PIPELINE_BATCH} /s | predict /s | speedup | same tags | rechecked in fp32 | "
          "overhead vs bare forward |")
    print("|---|---|---|---|---|---|---|")
    for name in sets:
        s, w = report["steady_state"][name], report["whole_process"][name]
        print(f"| {s['n']} abstracts, steady state | {s['pipeline_per_s']:.1f} | {s['predict_per_s']:.1f} | "
              f"{s['speedup']:.2f}x | {s['same_tags']:.2%} | {s['rechecked']:.1%} | {s['overhead_vs_bare']:+.1%} |")
        print(f"| {w['n']} abstracts, whole process | {w['pipeline_per_s']:.1f} | {w['predict_per_s']:.1f} | "
              f"{w['speedup']:.2f}x | | | |")
    print("\nfirst tag from a fresh process: " + ", ".join(
        f"{k} {v['best_s']:.2f} s (median {v['median_s']:.2f} s, {v['peak_rss_mb']:.0f} MB)"
        for k, v in report["first_tag"].items()))
    print(f"backend: {report['steady_state']['backend']}")
    print("\npeak RSS: " + ", ".join(f"{v['n']:,} abstracts {v['peak_rss_mb']:.0f} MB" for v in rss.values())
          + f" (ratio {report['rss_ratio']:.2f})")


if __name__ == "__main__":
    main()
