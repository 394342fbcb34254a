"""Weak labelling at scale: records/s and peak memory of the streamed rule pipeline.

    python bench/weak_labels_bench.py [--quick]

Builds a 1,000,000-record `.jsonl.gz` corpus under bench/out/ by repeating the default corpus with
perturbations (sentence order rotated, title suffixed, so no two records are equal), then, each in
its own single-threaded process:
  - reads the first 100,000 and all 1,000,000 records with `read_corpus`, votes with the rule
    functions (keywords + arXiv categories; `labeling=rules`), fits the learned label model on the
    first `--fit-records` papers and applies it chunk by chunk; reports records/s and peak RSS;
  - the embedding function's throughput: MiniLM encodes with bf16 autocast and in fp32 on CPU.
Targets: >= 3,000 records/s per core; peak RSS at 1M <= 1.2x peak RSS at 100k (flat memory).
Per core = records per CPU second of the single-threaded worker, which other load on a shared
machine does not change; wall-clock records/s are printed beside it.
Duplicate-title removal is off here: its set of seen titles grows with the corpus by design.
Results go to bench/out/weak_labels_bench.json and are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench/out"
TARGET_RATE = 3000
TARGET_RSS_RATIO = 1.2


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("label", overrides=list(overrides))


def default_papers():
    from omegaconf import OmegaConf

    from abstract_tagger.corpus import read_corpus

    return list(read_corpus(OmegaConf.to_container(compose().data.sources, resolve=True)))


def make_corpus(path: Path, n: int) -> None:
    """`n` JSON lines, the default corpus over and over, each pass perturbed differently."""
    papers = default_papers()
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for k in range(n):
            p = papers[k % len(papers)]
            rnd = k // len(papers)
            sentences = p.abstract.split(". ")
            shift = rnd % len(sentences)
            f.write(json.dumps({
                "id": f"bench-{k:07d}",
                "title": f"{p.title} ({rnd})" if rnd else p.title,
                "abstract": ". ".join(sentences[shift:] + sentences[:shift]),
                "categories": list(p.categories),
            }) + "\n")
    tmp.replace(path)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rules_worker(corpus: Path, records: int, fit_records: int) -> dict:
    from omegaconf import OmegaConf

    from abstract_tagger.corpus import read_corpus
    from abstract_tagger.labeling.functions import build_functions
    from abstract_tagger.labeling.label_model import make_label_model
    from abstract_tagger.labeling.weak_labels import stream_weak_labels, vote
    from abstract_tagger.taxonomy import Taxonomy

    cfg = compose("labeling=rules", f"labeling.fit_max_records={fit_records}")
    lcfg = OmegaConf.to_container(cfg.labeling, resolve=True)
    functions = build_functions(Taxonomy.from_config(cfg.taxonomy), lcfg)

    def papers():
        return islice(read_corpus({"bench": {"path": str(corpus), "format": "jsonl"}}, dedupe=False), records)

    start, cpu_start = time.perf_counter(), time.process_time()
    fit_votes = vote(islice(papers(), lcfg["fit_max_records"]), functions, lcfg["chunk_size"])
    model = make_label_model(lcfg["model"], lcfg["label_model"]).fit(fit_votes)
    del fit_votes
    fitted = time.perf_counter()
    n, positives = 0, 0
    for chunk, probs in stream_weak_labels(papers(), functions, model, lcfg["chunk_size"]):
        n += len(chunk)
        positives += int((probs >= lcfg["threshold"]).sum())
    end, cpu_end = time.perf_counter(), time.process_time()
    return {"records": n, "fit_records": min(lcfg["fit_max_records"], n),
            "fit_s": fitted - start, "stream_s": end - fitted,
            "records_per_s": n / (end - start), "stream_records_per_s": n / (end - fitted),
            "records_per_cpu_s": n / (cpu_end - cpu_start),
            "tags_per_record": positives / n, "peak_rss_mb": peak_rss_mb()}


def embedding_worker(texts: int) -> dict:
    import torch

    from abstract_tagger.labeling.embedding import SentenceEncoder

    sample = [p.text for p in default_papers()[:texts]]
    out = {"texts": len(sample), "torch_threads": torch.get_num_threads()}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        encoder = SentenceEncoder(bf16=bf16)
        encoder.encode(sample[:32])  # warm-up: first-call allocations and kernel selection
        start = time.perf_counter()
        encoder.encode(sample)
        out[f"{name}_records_per_s"] = len(sample) / (time.perf_counter() - start)
    return out


def run_worker(*args: str) -> dict:
    # One thread: the rule pipeline is pure Python, and the target is per core.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k records and 64 embedded texts: a smoke test")
    parser.add_argument("--fit-records", type=int, default=None, help="papers the label model is fitted on")
    parser.add_argument("--worker", choices=["rules", "embedding"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--records", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--texts", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "rules":
        print(json.dumps(rules_worker(args.corpus, args.records, args.fit_records)))
        return 0
    if args.worker == "embedding":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(embedding_worker(args.texts)))
        return 0

    small, large, texts = (2_000, 20_000, 64) if args.quick else (100_000, 1_000_000, 512)
    fit_records = args.fit_records or small // 5
    OUT.mkdir(parents=True, exist_ok=True)
    corpus = OUT / f"weak-labels-{large}.jsonl.gz"
    if not corpus.is_file():
        start = time.perf_counter()
        make_corpus(corpus, large)
        print(f"wrote {corpus} ({large:,} records) in {time.perf_counter() - start:.0f} s", flush=True)
    results = {"rules": {}, "machine": f"{os.cpu_count()} CPUs"}
    for n in (small, large):
        results["rules"][str(n)] = run_worker("--worker", "rules", "--corpus", str(corpus), "--records", str(n),
                                              "--fit-records", str(fit_records))
        print(f"rules on {n:,} records: {results['rules'][str(n)]}", flush=True)
    results["embedding"] = run_worker("--worker", "embedding", "--texts", str(texts))
    rss_ratio = results["rules"][str(large)]["peak_rss_mb"] / results["rules"][str(small)]["peak_rss_mb"]
    rate = results["rules"][str(large)]["records_per_cpu_s"]
    results["rss_ratio"] = rss_ratio
    (OUT / "weak_labels_bench.json").write_text(json.dumps(results, indent=2) + "\n")

    emb = results["embedding"]
    print("\n| measure | value | target |\n|---|---|---|")
    for n, r in results["rules"].items():
        print(f"| rules, {int(n):,} records (fit on {r['fit_records']:,} + stream): records per CPU second "
              f"| {r['records_per_cpu_s']:,.0f} | >= {TARGET_RATE:,} |")
        print(f"| rules, {int(n):,} records: records per wall second | {r['records_per_s']:,.0f} | |")
        print(f"| rules, {int(n):,} records: peak RSS | {r['peak_rss_mb']:,.0f} MB | |")
    print(f"| peak RSS {large:,} / {small:,} | {rss_ratio:.2f} | <= {TARGET_RSS_RATIO} |")
    print(f"| embedding LF, MiniLM bf16 autocast ({emb['torch_threads']} threads): records/s "
          f"| {emb['bf16_records_per_s']:,.0f} | |")
    print(f"| embedding LF, MiniLM fp32 ({emb['torch_threads']} threads): records/s "
          f"| {emb['fp32_records_per_s']:,.0f} | |")
    met = rate >= TARGET_RATE and rss_ratio <= TARGET_RSS_RATIO
    print(f"\ntargets {'met' if met else 'MISSED'}")
    return 0 if met or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
