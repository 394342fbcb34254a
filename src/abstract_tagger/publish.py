"""Publish a training run's exported checkpoint as the repo's shipped model.

    python -m abstract_tagger.publish RUN_DIR [name=abstract-tagger-minilm] [out_dir=checkpoints]
        [push_to_hub=true repo_id=USER/abstract-tagger-minilm private=false dry_run=true]

Copies RUN_DIR/checkpoint with the weights cast to fp16 safetensors (half the size; scores move by
less than `max_score_diff`, which is checked on the taxonomy's tag descriptions), refuses anything
over `max_mb`, then swaps the finished directory into `out_dir/name` by rename, so readers never see
a half-written checkpoint. `push_to_hub=true` uploads it with huggingface_hub; `dry_run=true` does
the re-export and its checks in a temporary directory, leaving `out_dir/name` as it is, and only
lists what would be uploaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from abstract_tagger.config_checks import exit_on_error, validate_publish
from abstract_tagger.prediction import Tagger, check_checkpoint

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "name": "abstract-tagger-minilm",
    "out_dir": "checkpoints",
    "max_mb": 50,
    "max_score_diff": 0.01,
    "push_to_hub": False,
    "repo_id": None,
    "private": False,
    "dry_run": False,
}
_WEIGHTS = "model.safetensors"


def parse_args(argv: Sequence[str]) -> tuple[Path, dict[str, Any]]:
    positional = [a for a in argv if "=" not in a]
    if len(positional) != 1:
        raise SystemExit(
            f"usage: python -m abstract_tagger.publish RUN_DIR [key=value ...]; keys: {', '.join(DEFAULTS)}"
        )
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist([a for a in argv if "=" in a]))
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}; known: {', '.join(DEFAULTS)}")
    return Path(positional[0]), {**DEFAULTS, **overrides}


def write_fp16(src: Path, dst: Path) -> None:
    """fp16 weights with config dtype float32: plain `from_pretrained` upcasts them on load, since fp16
    matmuls on CPU are slow or unsupported."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(_WEIGHTS, "*.bin", "*.pt", "*.pth"))
    state = load_file(src / _WEIGHTS)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, dst / _WEIGHTS,
              metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # Published files are for everyone to read; the run's directory may be a private 0700 temp dir.
    for path in (dst, *dst.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)


def score_drift(original: Path, published: Path) -> tuple[float, int]:
    """(largest score change, number of changed tag decisions) on the tag descriptions, both in fp32."""
    taxonomy = yaml.safe_load((original / "taxonomy.yaml").read_text())
    texts = [f"{t['name']}. {t['description']}" for t in taxonomy["tags"].values()]
    before, after = (Tagger.from_pretrained(p, precision="fp32") for p in (original, published))
    a, b = before.scores(texts), after.scores(texts)
    changed = sum(x != y for x, y in zip(before.decide(a), after.decide(b)))
    return float(abs(a - b).max()), changed


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def publish(run_dir: Path, *, name: str, out_dir: str | Path, max_mb: float, max_score_diff: float) -> Path:
    src = check_checkpoint(run_dir / "checkpoint")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest, tmp, old = out_dir / name, out_dir / f".{name}.tmp-{os.getpid()}", out_dir / f".{name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_fp16(src, tmp)
        size = folder_mb(tmp)
        if size > max_mb:
            raise ValueError(f"{src}: the fp16 checkpoint is {size:.1f} MB, over max_mb={max_mb}")
        drift, changed = score_drift(src, tmp)
        print(f"fp16 check: largest score change {drift:.2e}, changed tag decisions {changed}")
        if drift > max_score_diff:
            raise ValueError(f"fp16 weights move scores by {drift:.3g}, over max_score_diff={max_score_diff}")
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
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


def main(argv: Sequence[str] | None = None) -> None:
    run_dir, opts = parse_args(sys.argv[1:] if argv is None else argv)
    with exit_on_error(log):
        validate_publish(run_dir, opts)
        dry_run = opts["dry_run"]
        with tempfile.TemporaryDirectory() if dry_run else nullcontext(opts["out_dir"]) as out_dir:
            dest = publish(run_dir, name=opts["name"], out_dir=out_dir, max_mb=opts["max_mb"],
                           max_score_diff=opts["max_score_diff"])
            if dry_run:
                print(f"dry run: {Path(opts['out_dir']) / opts['name']} left as it is")
            if opts["push_to_hub"]:
                push(dest, repo_id=opts["repo_id"], private=opts["private"], dry_run=dry_run)


if __name__ == "__main__":
    main()
