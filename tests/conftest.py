import os
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub; the bundled MiniLM and tiny models built in-test serve.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def taxonomy():
    from omegaconf import OmegaConf

    from abstract_tagger.taxonomy import Taxonomy

    return Taxonomy.from_config(OmegaConf.load(ROOT / "conf/taxonomy/default.yaml"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, taxonomy) -> Path:
    from helpers import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), taxonomy)


@pytest.fixture(scope="session")
def tiny_onnx_checkpoint(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint with its ONNX graphs (fp32 weights: shared with the safetensors as they are)."""
    import shutil

    from abstract_tagger.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("tiny-onnx-checkpoint") / "checkpoint"
    export_onnx(shutil.copytree(tiny_checkpoint, path))
    return path
