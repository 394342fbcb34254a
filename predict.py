"""Tag a file of abstracts with an exported checkpoint.

    python predict.py input=papers.jsonl output=tags.jsonl
    cat papers.jsonl | python predict.py input=- output=tags.csv top_k=3
    accelerate launch predict.py input=big.jsonl.gz output=tags.jsonl
"""

import logging
import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))

from abstract_tagger.common.config import exit_on_error  # noqa: E402

log = logging.getLogger("predict")


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from abstract_tagger.common.cpu import physical_cores
    from abstract_tagger.common.memory import limit_arenas
    from abstract_tagger.inference.files import predict_from_config

    # Before an engine starts its threads, in the process predict.py owns (README, Memory).
    limit_arenas(physical_cores())
    with exit_on_error(log):
        predict_from_config(cfg)


if __name__ == "__main__":
    main()
