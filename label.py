"""Weak-label the corpus: python label.py [hydra.run.dir=DIR] [labeling.model=majority|learned]."""

import logging
import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))

from abstract_tagger.config_checks import exit_on_error, validate_label  # noqa: E402

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="label")
def main(cfg: DictConfig) -> None:
    from abstract_tagger.labeling.weak_labels import build_weak_labels
    from abstract_tagger.labeling.report import to_markdown

    with exit_on_error(log):
        validate_label(cfg)
        labels = build_weak_labels(cfg)
        labels.write(cfg.paths.output_dir)
    print(to_markdown(labels.report))
    log.info("wrote %d papers' weak labels to %s", len(labels.papers), cfg.paths.output_dir)


if __name__ == "__main__":
    main()
