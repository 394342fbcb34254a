"""Corpora of any size: label.py and train.py themselves, run as a user runs them, on generated corpora.

    python bench/scale_bench.py [--quick] [--parts label,train,embedding]

Corpora: the default corpus (6,437 papers, its gold papers included so the gold sets join) and then
perturbed copies of it (sentence order rotated, title suffixed, so no two records are equal), as
`.jsonl.gz` under bench/out/scale/. Each command runs in its own process under `/usr/bin/time`
(peak RSS of the process, or of the largest rank under torchrun) with a fresh cache:
  - label:     `label.py labeling=rules` on 100,000 and 1,000,000 records;
               targets: >= 2,500 records/s wall (whole process, 2 cores), peak RSS at 1M <= 1.2x at 100k;
  - train:     `train.py model=tiny labeling=rules trainer.max_steps=20` on 20,000 and 200,000 records
               (labelling, the Arrow dataset, tokenising, 20 steps, scoring, export);
               target: peak RSS at 200k <= 1.3x at 20k;
  - embedding: `label.py` with the embedding function (bundled MiniLM) on 1,000 records: bf16 autocast
               and fp32 in one process, and bf16 in 2 processes (`torchrun --nproc_per_node 2`).
--quick: 10x smaller everything, a smoke test of the script. Results: bench/out/scale_bench.json and a
markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench/out/scale"
LABEL_RATE, LABEL_RSS_RATIO, TRAIN_RSS_RATIO = 2500, 1.2, 1.3


def default_papers() -> list[dict]:
    """The default corpus, gold papers first (so that even a --quick corpus holds every gold set)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from abstract_tagger.data.corpus import read_corpus, read_gold_sets
    from abstract_tagger.data.taxonomy import Taxonomy

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("label")
    gold = {pid for named in read_gold_sets(cfg.data.gold, Taxonomy.from_config(cfg.taxonomy).ids).values()
            for g in named.values() for pid in g.tags}
    papers = [{"id": p.id, "title": p.title, "abstract": p.abstract, "categories": list(p.categories)}
              for p in read_corpus(OmegaConf.to_container(cfg.data.sources, resolve=True))]
    return sorted(papers, key=lambda p: p["id"] not in gold)


def make_corpus(path: Path, n: int, papers: list[dict]) -> Path:
    """`n` JSON lines: the default corpus as it is, then perturbed copies of it."""
    if path.is_file():
        return path
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
        for k in range(n):
            p = papers[k % len(papers)]
            rnd = k // len(papers)
            if rnd:
                sentences = p["abstract"].split(". ")
                shift = rnd % len(sentences)
                p = {**p, "id": f"{p['id']}~{rnd}", "title": f"{p['title']} ({rnd})",
                     "abstract": ". ".join(sentences[shift:] + sentences[:shift])}
            f.write(json.dumps(p) + "\n")
    tmp.replace(path)
    return path


def timed(cmd: list[str], run_dir: Path, threads: int | None = None) -> dict:
    """Run `cmd` under /usr/bin/time in a fresh cache: wall seconds, CPU seconds (user + system, all
    processes) and peak RSS (MB, the largest process)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    stats = run_dir / "time.txt"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-o", str(stats), "-f", "%M %U %S", *cmd, f"hydra.run.dir={run_dir / 'run'}",
                           f"paths.cache_dir={run_dir / 'cache'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    rss_kb, user, system = stats.read_text().split()[-3:]
    return {"wall_s": round(wall, 1), "cpu_s": round(float(user) + float(system), 1),
            "peak_rss_mb": round(int(rss_kb) / 1024)}


def source(corpus: Path) -> list[str]:
    return ["~data.sources", f"+data.sources={{bench:{{path:'{corpus}',format:jsonl}}}}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10x smaller corpora: a smoke test of the script")
    parser.add_argument("--parts", default="label,train,embedding")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    scale = 10 if args.quick else 1
    OUT.mkdir(parents=True, exist_ok=True)
    papers = default_papers()
    python = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    results: dict = {"machine": f"{os.cpu_count()} CPUs", "label": {}, "train": {}, "embedding": {}}
    rows: list[tuple[str, str, str]] = []
    met = True

    if "label" in parts:
        for n in (100_000 // scale, 1_000_000 // scale):
            corpus = make_corpus(OUT / f"corpus-{n}.jsonl.gz", n, papers)
            r = timed([*python, "label.py", "labeling=rules", *source(corpus)], OUT / f"label-{n}")
            r["records_per_s"], r["records_per_cpu_s"] = round(n / r["wall_s"]), round(n / r["cpu_s"])
            results["label"][n] = r
            print(f"label.py rules, {n:,} records: {r}", flush=True)
            rows += [(f"label.py (rules), {n:,} records: records/s, whole process", f"{r['records_per_s']:,}",
                      f">= {LABEL_RATE:,}"),
                     (f"label.py (rules), {n:,} records: records per CPU second", f"{r['records_per_cpu_s']:,}", ""),
                     (f"label.py (rules), {n:,} records: peak RSS", f"{r['peak_rss_mb']} MB", "")]
        small, large = results["label"].values()
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        rows.append(("label.py peak RSS, 1M / 100k", f"{ratio:.2f}", f"<= {LABEL_RSS_RATIO}"))
        met &= ratio <= LABEL_RSS_RATIO and large["records_per_s"] >= LABEL_RATE

    if "train" in parts:
        for n in (20_000 // scale, 200_000 // scale):
            corpus = make_corpus(OUT / f"corpus-{n}.jsonl.gz", n, papers)
            r = timed([*python, "train.py", "model=tiny", "labeling=rules", "logger=none", "trainer.max_steps=20",
                       *source(corpus)], OUT / f"train-{n}")
            results["train"][n] = r
            print(f"train.py tiny max_steps=20, {n:,} records: {r}", flush=True)
            rows.append((f"train.py model=tiny max_steps=20, {n:,} records: peak RSS / wall",
                         f"{r['peak_rss_mb']} MB / {r['wall_s']} s", ""))
        small, large = results["train"].values()
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        rows.append(("train.py peak RSS, 200k / 20k", f"{ratio:.2f}", f"<= {TRAIN_RSS_RATIO}"))
        met &= ratio <= TRAIN_RSS_RATIO

    if "embedding" in parts:
        n = 1_000 // scale
        corpus = make_corpus(OUT / f"embed-{n}.jsonl.gz", n, papers[len(papers) - n:])  # no gold paper
        nogold = ["data.gold.dev.seed=null", "data.gold.dev.recent=null", "data.gold.test.recent=null"]
        chunk = [f"labeling.chunk_size={max(n // 8, 1)}"]  # 8 chunks: both ranks get a share
        for name, launcher, extra in (("1 process, bf16", python, ["labeling.embedding.precision=bf16"]),
                                      ("1 process, fp32", python, ["labeling.embedding.precision=fp32"]),
                                      ("2 processes, bf16", torchrun, ["labeling.embedding.precision=bf16"])):
            r = timed([*launcher, "label.py", *source(corpus), *nogold, *chunk, *extra],
                      OUT / f"embed-{name.replace(' ', '').replace(',', '-')}",
                      threads=1 if launcher is torchrun else None)
            r["records_per_s"], r["records_per_cpu_s"] = round(n / r["wall_s"], 1), round(n / r["cpu_s"], 1)
            results["embedding"][name] = r
            print(f"label.py with embeddings, {n:,} records, {name}: {r}", flush=True)
            rows.append((f"label.py with the embedding function, {n:,} records, {name}: records/s, whole process "
                         "(per CPU second)", f"{r['records_per_s']} ({r['records_per_cpu_s']})", ""))

    (ROOT / "bench/out/scale_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n| measure | value | target |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ntargets {'met' if met else 'MISSED'}")
    return 0 if met or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
