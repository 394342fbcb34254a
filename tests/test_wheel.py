"""The built wheel carries everything the library needs: `Tagger` works from a non-editable install in a
fresh venv, run away from the checkout (its conf/ and src/ out of reach)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints/abstract-tagger-minilm"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: setuptools writes build/ beside the sources it builds.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True)
    return next(out.glob("abstract_tagger-*.whl"))


def test_wheel_holds_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in ("abstract_tagger/inference/predict_defaults.yaml", "abstract_tagger/checkpoint/model_card.md",
                 "abstract_tagger/metrics/multilabel_f1.py"):
        assert data in names


@pytest.mark.slow
def test_tagger_runs_from_the_installed_wheel_away_from_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin/python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies come from this environment's site-packages, added as a plain path: its .pth
    # files (the editable install of this checkout among them) are not run, so only the wheel serves
    # abstract_tagger.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True)
    script = (f"import abstract_tagger, json\n"
              f"from abstract_tagger import Tagger\n"
              f"print(abstract_tagger.__file__)\n"
              f"tagger = Tagger.from_pretrained({str(CHECKPOINT)!r})\n"
              f"print(json.dumps(tagger.predict(['Speech recognition for children with a transformer.'])[0]['tags']))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROJECT_ROOT")}
    run = subprocess.run([python, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    location, tags = run.stdout.strip().splitlines()
    assert Path(location).is_relative_to(site) and not Path(location).is_relative_to(ROOT)
    assert "speech" in tags
