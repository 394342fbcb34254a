"""Publish a training run's checkpoint as the repo's shipped model (fp16 weights, ONNX graphs, checks):

    python publish.py run_dir=outputs/main                   # -> checkpoints/abstract-tagger-minilm
    python publish.py run_dir=outputs/main push_to_hub=true repo_id=USER/abstract-tagger-minilm [dry_run=true]
"""

import logging
import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))

from abstract_tagger.common.config import exit_on_error  # noqa: E402

log = logging.getLogger("publish")


@hydra.main(version_base="1.3", config_path="conf", config_name="publish")
def main(cfg: DictConfig) -> None:
    from abstract_tagger.publish import publish_from_config

    with exit_on_error(log):
        publish_from_config(cfg)


if __name__ == "__main__":
    main()
