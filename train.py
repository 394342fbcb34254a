"""Fine-tune the tagger on weak labels: `python train.py [group=option ...] [key=value ...]`.

    python train.py model=minilm                 # bundled MiniLM, CPU-friendly
    python train.py -m trainer.lr=1e-5,3e-5      # sweep, one directory per run
    python train.py -m hparams_search=optuna     # Optuna search maximising the k-fold dev score
    torchrun --nproc_per_node 2 train.py ...     # DDP (also: accelerate launch train.py ...)
    python train.py hydra.run.dir=DIR trainer.resume=auto   # continue a killed run in DIR
"""

import logging
import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))

from abstract_tagger.common.config import exit_on_error, register_resolvers  # noqa: E402

register_resolvers()
log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from abstract_tagger.pipeline import optimized_metric, run
    from abstract_tagger.training.backbone import BackboneUnavailable

    with exit_on_error(log, BackboneUnavailable):
        summary = run(cfg)
    # For sweepers (hparams_search=optuna): a k-fold dev score, never a test one (checked at start-up).
    return optimized_metric(summary, cfg.optimized_metric) if summary else None


if __name__ == "__main__":
    main()
