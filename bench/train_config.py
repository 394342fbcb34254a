"""The train config as train.py would compose it, for the bench scripts that call the pipeline's stages
themselves (run as `python bench/<script>.py`, which puts bench/ on the import path)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from abstract_tagger.common.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]


def compose_train(overrides: Sequence[str]) -> DictConfig:
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def parse_with_config(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, DictConfig]:
    """The script's arguments, then any Hydra overrides of the train config after them, composed."""
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config (corpus, gold sets)")
    args = parser.parse_args()
    return args, compose_train(args.overrides)
