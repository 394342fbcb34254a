import os
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub; the bundled MiniLM and tiny models built in-test serve.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# What the entry points set: relative data paths in the configs resolve against the repo.
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Every run the tests start (in process or as a subprocess) caches under a temporary folder: bf16
    embeddings depend slightly on the batch a text was embedded in, so vectors a test left in the
    checkout's .cache once made the next `make train` differ from a fresh clone's."""
    os.environ["ABSTRACT_TAGGER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    # The user's cache too (OpenVINO's compiled graphs, the verified-weights memos of temporary checkpoints).
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def taxonomy():
    from omegaconf import OmegaConf

    from abstract_tagger.data.taxonomy import Taxonomy

    return Taxonomy.from_config(OmegaConf.load(ROOT / "conf/taxonomy/default.yaml"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, taxonomy) -> Path:
    from helpers import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), taxonomy)


@pytest.fixture(scope="session")
def tiny_onnx_checkpoint(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint with its ONNX graphs (fp32 weights: shared with the safetensors as they are)."""
    import shutil

    from abstract_tagger.checkpoint.onnx_export import export_onnx
    from helpers import CALIBRATION

    path = tmp_path_factory.mktemp("tiny-onnx-checkpoint") / "checkpoint"
    export_onnx(shutil.copytree(tiny_checkpoint, path), CALIBRATION)
    return path
