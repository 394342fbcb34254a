"""The pieces every entry point's start-up checks are made of (each stage checks its own settings with
them: training.checks, labeling.checks, inference.options, publish), so a bad value fails before any
work with the key named; the one-line `error: ...` exit they all share; and the run-directory resolver
every launched rank agrees on. Imports nothing of the package."""

from __future__ import annotations

import logging
import math
import numbers
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


@contextmanager
def exit_on_error(log: logging.Logger, *errors: type[BaseException]) -> Iterator[None]:
    """Turn what a user can fix into one `error: ...` line and exit status 1, not a traceback. Every
    error the package raises for bad settings, input, checkpoints or states is a ValueError (ConfigError,
    CorpusError, CheckpointError, ...); OSError covers files that cannot be read or written, and
    OmegaConfBaseException a setting left unset (`input=???`) or of the wrong type."""
    try:
        yield
    except (ValueError, OSError, OmegaConfBaseException, *errors) as e:
        log.debug("traceback of the error below", exc_info=True)  # hydra.verbose=true shows it
        message = str(e).splitlines()[0]  # OmegaConf adds full_key / object_type lines
        # Into the run's log file (train.py, label.py); where logs only go to the terminal (predict.py,
        # publish) the exit message is the one copy.
        if any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):
            log.error("%s", message)
        sys.exit(f"error: {message}")


def run_stamp() -> str:
    """Timestamp for the run directory. Ranks started by one launcher (torchrun, accelerate launch)
    share its start time, so they name the same directory even if they start seconds apart."""
    started = time.time()
    if "LOCAL_RANK" in os.environ:
        import psutil

        started = psutil.Process(os.getppid()).create_time()
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp)


def require(ok: bool, key: str, message: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {message}")


def is_number(value: Any, integer: bool = False) -> bool:
    # numbers.*: numpy scalars count too; bool is an int to Python but never a sensible value here.
    return isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)


def positive(key: str, value: Any, *, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # isfinite: trainer.lr=inf trains to NaN weights.
    require(is_number(value, integer) and value > 0 and math.isfinite(value), key,
             f"must be a positive {'integer' if integer else 'number'}", value)


def fraction(key: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # `0 <= value <= 1` is False for NaN, as every comparison with it is.
    require(is_number(value) and 0 <= value <= 1, key, "must be a number in [0, 1]", value)


def positive_at(cfg: DictConfig, key: str, *, integer: bool = False, allow_none: bool = False) -> None:
    positive(key, OmegaConf.select(cfg, key), integer=integer, allow_none=allow_none)


def one_of(cfg: DictConfig, key: str, choices: tuple) -> None:
    value = OmegaConf.select(cfg, key)
    require(value in choices, key, f"must be one of {choices}", value)


def fraction_at(cfg: DictConfig, key: str, *, allow_none: bool = False) -> None:
    fraction(key, OmegaConf.select(cfg, key), allow_none=allow_none)


def existing_file(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    require(isinstance(value, str) and Path(value).is_file(), key, "file not found", value)


def plain(value: Any) -> Any:
    """An OmegaConf node as plain Python (dicts, lists); anything else as it is."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


