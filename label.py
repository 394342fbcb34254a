"""Weak-label the corpus, streamed chunk by chunk (any size; a killed run resumes):

    python label.py [data=...] [labeling=rules] [hydra.run.dir=DIR]
    torchrun --nproc_per_node N label.py ...   # N processes share the voting (also: accelerate launch)
"""

import logging
import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))

from abstract_tagger.common.config import exit_on_error, register_resolvers  # noqa: E402
from abstract_tagger.labeling.checks import validate_label

register_resolvers()
log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="conf", config_name="label")
def main(cfg: DictConfig) -> None:
    from abstract_tagger.common.runtime import process_state
    from abstract_tagger.labeling.report import to_markdown
    from abstract_tagger.labeling.weak_labels import build_weak_labels

    with exit_on_error(log):
        validate_label(cfg)
        labels = build_weak_labels(cfg)
        if not process_state().is_main_process:
            return
        labels.write(cfg.paths.output_dir)
    print(to_markdown(labels.report))
    log.info("wrote %d papers' weak labels to %s", labels.n_papers, cfg.paths.output_dir)


if __name__ == "__main__":
    main()
