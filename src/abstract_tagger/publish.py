"""Publish a training run's exported checkpoint as the repo's shipped model (`publish.py`, the entry
point, calls `publish_from_config`):

    python publish.py run_dir=RUN_DIR [name=abstract-tagger-minilm] [out_dir=checkpoints]
        [push_to_hub=true repo_id=USER/abstract-tagger-minilm private=false dry_run=true]

Copies RUN_DIR/checkpoint with the weights cast to fp16 safetensors (half the size; scores move by
less than `max_score_diff`, which is checked on the taxonomy's tag descriptions), adds its ONNX graphs
(fp32 and int8, see `onnx_export`), refuses a graph whose tags differ from torch fp32's on more than
`max_disagreement` of the dev papers and anything over `max_mb`, renders the model card again
from the facts training saved (`card.json` in the run directory) with that agreement, then swaps the finished directory into `out_dir/name` by
rename, so readers never see a half-written checkpoint. Options and defaults: conf/publish.yaml.
`push_to_hub=true` uploads it with huggingface_hub; `dry_run=true` does the re-export and its checks
in a temporary directory, leaving `out_dir/name` as it is, and only
lists what would be uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from itertools import islice
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from abstract_tagger.checkpoint.card import FACTS_FILE, CardFacts, OnnxFacts, model_card
from abstract_tagger.checkpoint.format import (
    CARD_FILE,
    THRESHOLDS_FILE,
    WEIGHTS_FILE,
    check_checkpoint,
    load_taxonomy,
    read_json,
    swap_in,
)
from abstract_tagger.checkpoint.onnx_export import export_onnx
from abstract_tagger.common.config import fraction_at, one_of, positive_at, require
from abstract_tagger.data.corpus import Paper, read_gold, read_source
from abstract_tagger.inference.options import GRAPH_BACKENDS, runnable_precisions
from abstract_tagger.inference.tagger import Tagger

log = logging.getLogger(__name__)


def write_fp16(src: Path, dst: Path) -> None:
    """fp16 weights with config dtype float32: plain `from_pretrained` upcasts them on load, since fp16
    matmuls on CPU are slow or unsupported. ONNX graphs are not copied: they point into the weights file."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(WEIGHTS_FILE, "*.bin", "*.pt", "*.pth", "*.onnx"))
    state = load_file(src / WEIGHTS_FILE)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, dst / WEIGHTS_FILE,
              metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _readable(folder: Path) -> None:
    # Published files are for everyone to read; the run's directory may be a private 0700 temp dir.
    for path in (folder, *folder.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)


def score_drift(original: Path, published: Path) -> tuple[float, int]:
    """(largest score change, number of changed tag decisions) on the tag descriptions, both in fp32."""
    texts = [f"{t.name}. {t.description}" for t in load_taxonomy(original).tags]
    before, after = (Tagger.from_pretrained(p, backend="torch", precision="fp32") for p in (original, published))
    a, b = before.scores(texts), after.scores(texts)
    changed = sum(x != y for x, y in zip(before.decide(a), after.decide(b)))
    return float(abs(a - b).max()), changed


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def dev_texts(dev_sets: Mapping[str, Mapping[str, Any]], tag_ids: Sequence[str]) -> list[str]:
    """The texts of every dev gold set's papers, found by id in its corpus file and checked by title."""
    texts = []
    for spec in dev_sets.values():
        gold = read_gold(spec["gold"], tag_ids)
        papers = [p for p in read_source(spec["papers"], spec.get("format")) if isinstance(p, Paper)]
        texts += [papers[i].text for i in gold.rows(papers)]
    return texts


def calibration_texts(spec: Mapping[str, Any]) -> list[str]:
    """The first `n` papers of the corpus file `spec` names: the int8 graph's calibration."""
    fields = {"fields": spec["fields"]} if spec.get("fields") else {}
    papers = (p for p in read_source(spec["papers"], spec.get("format"), **fields) if isinstance(p, Paper))
    return [p.text for p in islice(papers, spec["n"])]


def onnx_agreement(checkpoint: Path, texts: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per engine and precision, against torch fp32 on `texts`: the share of papers with the same tag
    set and the largest score change, alone and as predict runs it (near-threshold papers rescored).
    OpenVINO's bf16 (auto's pick on CPUs with AMX) is checked where this CPU has bf16 instructions."""
    reference = Tagger.from_pretrained(checkpoint, backend="torch", precision="fp32")
    ref = reference.scores(texts)
    expected = [set(t) for t in reference.decide(ref)]
    runs = {"fp32": ("fp32", None), "int8": ("int8", 0.0), "int8 + fp32 recheck": ("int8", None),
            "bf16": ("bf16", 0.0), "bf16 + fp32 recheck": ("bf16", None)}
    report = {}
    for engine in GRAPH_BACKENDS:
        for label, (precision, margin) in runs.items():
            if precision not in runnable_precisions(engine):
                continue
            tagger = Tagger.from_pretrained(checkpoint, backend=engine, precision=precision, recheck_margin=margin)
            scores = tagger.scores(texts)
            same = np.mean([set(t) == e for t, e in zip(tagger.decide(scores), expected)])
            report[f"{engine} {label}"] = {"same_tags": float(same), "max_score_diff": float(np.abs(scores - ref).max())}
    return report


def publish(run_dir: Path, *, name: str, out_dir: str | Path, max_mb: float, max_score_diff: float,
            max_disagreement: float, dev_sets: Mapping[str, Mapping[str, Any]], calibration: Sequence[str]) -> Path:
    src = check_checkpoint(run_dir / "checkpoint")
    facts = CardFacts.load(run_dir / FACTS_FILE)  # the card is rendered again, with its ONNX section
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest, tmp = out_dir / name, out_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_fp16(src, tmp)
        drift, changed = score_drift(src, tmp)
        print(f"fp16 check: largest score change {drift:.2e}, changed tag decisions {changed}")
        if drift > max_score_diff:
            raise ValueError(f"fp16 weights move scores by {drift:.3g}, over max_score_diff={max_score_diff}")
        export_onnx(tmp, calibration)
        size = folder_mb(tmp)
        if size > max_mb:
            raise ValueError(f"{src}: the fp16 checkpoint with its ONNX graphs is {size:.1f} MB, over max_mb={max_mb}")
        tag_ids = list(read_json(tmp / THRESHOLDS_FILE))
        texts = dev_texts(dev_sets, tag_ids)
        agreement = onnx_agreement(tmp, texts)
        for label, a in agreement.items():
            print(f"ONNX {label}: same tag set as torch fp32 on {a['same_tags']:.1%} of {len(texts)} dev papers, "
                  f"largest score change {a['max_score_diff']:.2g}")
        # Reduced precision without its recheck is never how predict runs it.
        used = {k: v for k, v in agreement.items() if not k.endswith((" int8", " bf16"))}
        bad = [k for k, a in used.items() if 1 - a["same_tags"] > max_disagreement]
        if bad:
            raise ValueError(f"ONNX graph(s) {bad} disagree with torch fp32 on more than "
                             f"max_disagreement={max_disagreement} of the dev papers")
        onnx = OnnxFacts(agreement=agreement, n_dev=len(texts), max_disagreement=max_disagreement)
        (tmp / CARD_FILE).write_text(model_card(replace(facts, onnx=onnx)))
        _readable(tmp)
        swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"published {src} -> {dest} ({size:.1f} MB)")
    return dest


def push(folder: Path, *, repo_id: str | None, private: bool, dry_run: bool) -> None:
    if not repo_id:
        raise SystemExit("push_to_hub=true needs repo_id=USER/NAME")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if dry_run:
        print(f"dry run: would upload {len(files)} files to https://huggingface.co/{repo_id} (private={private}):")
        for p in files:
            print(f"  {p.relative_to(folder)}  {p.stat().st_size / 1e6:.2f} MB")
        return
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=f"Publish {folder.name}")
    print(f"uploaded to {info}")


def publish_from_config(cfg: DictConfig) -> None:
    """`cfg`: conf/publish.yaml as composed by `publish.py` (the `paths` and `data` groups only feed
    its interpolations)."""
    opts = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items() if k not in ("paths", "data")}
    run_dir = Path(opts["run_dir"])
    validate_publish(run_dir, opts)
    dry_run = opts["dry_run"]
    with tempfile.TemporaryDirectory() if dry_run else nullcontext(opts["out_dir"]) as out_dir:
        dest = publish(run_dir, out_dir=out_dir, calibration=calibration_texts(opts["calibration"]), **{k: opts[k] for k in (
            "name", "max_mb", "max_score_diff", "max_disagreement", "dev_sets")})
        if dry_run:
            print(f"dry run: {Path(opts['out_dir']) / opts['name']} left as it is")
        if opts["push_to_hub"]:
            push(dest, repo_id=opts["repo_id"], private=opts["private"], dry_run=dry_run)


def validate_publish(run_dir: Path, opts: Mapping[str, Any]) -> None:
    """publish.py: checked before the published checkpoint is touched."""
    cfg = OmegaConf.create(dict(opts))
    require((run_dir / "checkpoint").is_dir(), "run_dir", "has no checkpoint/ directory", str(run_dir))
    require(isinstance(cfg.name, str) and cfg.name.strip() not in ("", ".", "..") and "/" not in cfg.name,
             "name", "must be a plain directory name", cfg.name)
    require(isinstance(cfg.out_dir, str) and bool(cfg.out_dir), "out_dir", "must be a directory path", cfg.out_dir)
    dest, source = (Path(cfg.out_dir) / cfg.name).resolve(), (run_dir / "checkpoint").resolve()
    # Publishing replaces out_dir/name with an fp16 copy of the run's checkpoint: never the checkpoint itself.
    require(dest != source and source not in dest.parents and dest not in source.parents, "out_dir",
            f"out_dir/name ({dest}) is or holds the run's own checkpoint {source}, which publishing would "
            "replace by its fp16 copy; publish somewhere else", cfg.out_dir)
    positive_at(cfg, "max_mb")
    fraction_at(cfg, "max_score_diff")
    fraction_at(cfg, "max_disagreement")
    require(isinstance(cfg.dev_sets, DictConfig) and len(cfg.dev_sets) > 0, "dev_sets",
             "must map a name to {gold: FILE, papers: FILE, format: FORMAT}", cfg.dev_sets)
    for name, spec in cfg.dev_sets.items():
        for key in ("gold", "papers"):
            value = OmegaConf.select(spec, key) if isinstance(spec, DictConfig) else None
            require(isinstance(value, str) and Path(value).is_file(), f"dev_sets.{name}.{key}", "file not found",
                     value)
    require(isinstance(cfg.calibration, DictConfig) and isinstance(cfg.calibration.get("papers"), str)
            and Path(cfg.calibration.papers).is_file(), "calibration.papers", "file not found",
            OmegaConf.select(cfg, "calibration.papers"))
    positive_at(cfg, "calibration.n", integer=True)
    for key in ("push_to_hub", "private", "dry_run"):
        one_of(cfg, key, (True, False))
    if cfg.push_to_hub:
        require(isinstance(cfg.repo_id, str) and cfg.repo_id.count("/") == 1, "repo_id",
                 "push_to_hub=true needs repo_id=USER/NAME", cfg.repo_id)
