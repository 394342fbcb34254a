"""Start-up checks of every entry point's settings (train, label, predict, publish), so a bad value
fails before any work with the key named; the one-line `error: ...` exit they all share; and the
run-directory resolver every launched rank agrees on."""

from __future__ import annotations

import logging
import math
import numbers
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


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


def _is_number(value: Any, integer: bool = False) -> bool:
    # numbers.*: numpy scalars count too; bool is an int to Python but never a sensible value here.
    return isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)


def positive(key: str, value: Any, *, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # isfinite: trainer.lr=inf trains to NaN weights.
    require(_is_number(value, integer) and value > 0 and math.isfinite(value), key,
             f"must be a positive {'integer' if integer else 'number'}", value)


def fraction(key: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # `0 <= value <= 1` is False for NaN, as every comparison with it is.
    require(_is_number(value) and 0 <= value <= 1, key, "must be a number in [0, 1]", value)


def _positive(cfg: DictConfig, key: str, *, integer: bool = False, allow_none: bool = False) -> None:
    positive(key, OmegaConf.select(cfg, key), integer=integer, allow_none=allow_none)


def _one_of(cfg: DictConfig, key: str, choices: tuple) -> None:
    value = OmegaConf.select(cfg, key)
    require(value in choices, key, f"must be one of {choices}", value)


def _fraction(cfg: DictConfig, key: str, *, allow_none: bool = False) -> None:
    fraction(key, OmegaConf.select(cfg, key), allow_none=allow_none)


def _existing_file(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    require(isinstance(value, str) and Path(value).is_file(), key, "file not found", value)


def _validate_data(cfg: DictConfig) -> None:
    """The `data` group, shared by train.py and label.py."""
    for name in cfg.data.sources:
        _existing_file(cfg, f"data.sources.{name}.path")
    for split, named in cfg.data.gold.items():
        for name, path in (named or {}).items():
            require(path is None or Path(path).is_file(), f"data.gold.{split}.{name}", "file not found", path)
    _one_of(cfg, "data.on_error", ("raise", "skip"))
    _positive(cfg, "data.max_chars", integer=True)
    _positive(cfg, "data.max_train_papers", integer=True, allow_none=True)


def validate(cfg: DictConfig, tag_ids: list[str]) -> None:
    """Raise ConfigError for the first value that cannot work."""
    # Here, not at the top: predict.py imports this module, and thresholds imports sklearn.
    from abstract_tagger.thresholds import POLICIES

    t = cfg.trainer
    _positive(cfg, "trainer.lr")
    _positive(cfg, "trainer.head_lr", allow_none=True)
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size", "trainer.grad_accum",
                "trainer.log_every", "trainer.keep_states", "model.max_length", "trainer.self_training.epochs"):
        _positive(cfg, key, integer=True)
    _positive(cfg, "trainer.max_steps", integer=True, allow_none=True)
    _positive(cfg, "export.review_pool", integer=True)
    st = t.self_training
    require(isinstance(st.rounds, int) and st.rounds >= 0, "trainer.self_training.rounds", "must be an integer >= 0",
             st.rounds)
    require(0 <= st.model_weight <= 1, "trainer.self_training.model_weight", "must be in [0, 1]", st.model_weight)
    _positive(cfg, "trainer.hand_weight")
    cp = t.clean_phase
    require(_is_number(cp.epochs, integer=True) and cp.epochs >= 0, "trainer.clean_phase.epochs",
            "must be an integer >= 0", cp.epochs)
    require(not cp.epochs or cfg.data.gold_train, "trainer.clean_phase.epochs",
             "a clean phase trains on hand labels: set data.gold_train", cp.epochs)
    _positive(cfg, "trainer.clean_phase.lr")
    _positive(cfg, "trainer.clean_phase.head_lr", allow_none=True)
    require(isinstance(t.get("loss"), DictConfig) and isinstance(t.loss.get("_target_"), str), "trainer.loss",
             "must name a loss class in _target_ (trainer/loss=bce|asl)", t.get("loss"))
    th = cfg.thresholds
    require(th.policy in ("auto", *POLICIES), "thresholds.policy", f"must be auto or one of {POLICIES}", th.policy)
    require(len(th.candidates) > 0 and set(th.candidates) <= set(POLICIES), "thresholds.candidates",
             f"must be a non-empty list of {POLICIES}", list(th.candidates))
    require(0 < th.default < 1, "thresholds.default", "must be in (0, 1)", th.default)
    require(isinstance(th.folds, int) and th.folds >= 2, "thresholds.folds", "k-fold needs at least 2 folds", th.folds)
    require(0 < th.grid.start < th.grid.stop < 1 and th.grid.step > 0, "thresholds.grid",
             "needs 0 < start < stop < 1 and step > 0", OmegaConf.to_container(th.grid))
    require(len(cfg.rule_blend.weights) > 0 and all(0 <= w <= 1 for w in cfg.rule_blend.weights),
             "rule_blend.weights", "must be a non-empty list of weights in [0, 1]", list(cfg.rule_blend.weights))
    require(t.save_every is None or (isinstance(t.save_every, int) and t.save_every >= 0),
             "trainer.save_every", "must be 0/null (epoch ends only) or a number of optimizer steps", t.save_every)
    require(0 <= t.warmup_ratio < 1, "trainer.warmup_ratio", "must be in [0, 1)", t.warmup_ratio)
    require(t.weight_decay >= 0, "trainer.weight_decay", "must be >= 0", t.weight_decay)
    require(t.precision in PRECISIONS, "trainer.precision", f"must be one of {PRECISIONS}", t.precision)
    pos_weight = t.pos_weight
    if isinstance(pos_weight, DictConfig):
        unknown = sorted(set(pos_weight) - set(tag_ids))
        require(not unknown, "trainer.pos_weight", f"unknown tag(s) {unknown}; known: {', '.join(tag_ids)}",
                 OmegaConf.to_container(pos_weight))
        for tag in pos_weight:
            _positive(cfg, f"trainer.pos_weight.{tag}")
    else:
        require(pos_weight in (None, "auto"), "trainer.pos_weight", "must be null, 'auto' or {tag: weight}", pos_weight)
    require(t.resume in (None, "auto") or Path(t.resume).is_dir(), "trainer.resume",
             "must be null, 'auto' or an existing state directory", t.resume)
    require(cfg.export.dtype in EXPORT_DTYPES, "export.dtype", f"must be one of {EXPORT_DTYPES}", cfg.export.dtype)
    require(isinstance(cfg.export.review_size, int) and cfg.export.review_size >= 0, "export.review_size",
             "must be an integer >= 0", cfg.export.review_size)
    validate_label(cfg)
    require(not cfg.data.gold_train or Path(cfg.data.gold_train).is_file(), "data.gold_train", "file not found",
             cfg.data.gold_train)


def validate_label(cfg: DictConfig) -> None:
    """label.py (and the weak-labelling part of train.py)."""
    from abstract_tagger.labeling.label_model import LABEL_MODELS

    _validate_data(cfg)
    _one_of(cfg, "labeling.model", LABEL_MODELS)
    _fraction(cfg, "labeling.threshold")
    for key in ("labeling.chunk_size", "labeling.fit_max_records"):
        _positive(cfg, key, integer=True)


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


# The options predict.py and the Python API (Tagger, predict_file) share; both check them here.
PREDICT_OPTIONS = ("backend", "precision", "batch_size", "chunk_size", "max_chars", "top_k", "num_threads",
                   "threshold", "recheck_margin", "on_error")


def check_predict_options(options: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first of `options` (some of PREDICT_OPTIONS, plain values) that
    cannot work: a negative batch size would leave rows of uninitialised scores, top_k=-1 would drop
    the last tag, a threshold over 1 or NaN would tag nothing."""
    from abstract_tagger.tagger import BACKENDS, ONNX_PRECISIONS, PRECISIONS, TORCH_PRECISIONS

    unknown = sorted(set(options) - set(PREDICT_OPTIONS))
    if unknown:
        raise TypeError(f"unknown prediction option(s) {unknown}; expected some of {PREDICT_OPTIONS}")
    for key in ("batch_size", "chunk_size", "max_chars"):
        if key in options:
            positive(key, options[key], integer=True)
    for key in ("top_k", "num_threads"):
        if key in options:
            positive(key, options[key], integer=True, allow_none=True)
    if "threshold" in options:
        fraction("threshold", options["threshold"], allow_none=True)
    checks = {"backend": BACKENDS, "on_error": ("raise", "skip"),
              "precision": {"torch": TORCH_PRECISIONS, "onnx": ONNX_PRECISIONS}.get(options.get("backend"), PRECISIONS)}
    for key, choices in checks.items():
        if key in options:
            require(options[key] in choices, key, f"must be one of {choices}", options[key])
    if options.get("recheck_margin") is not None:
        _check_margin(options["recheck_margin"], PRECISIONS)


def _check_margin(margin: Any, precisions: tuple[str, ...]) -> None:
    """In logit units: a number for every reduced precision, or {precision: margin}."""
    margins = margin if isinstance(margin, Mapping) else {"": margin}
    require(all(k in ("", *precisions) for k in margins) and all(
        _is_number(v) and 0 <= v < math.inf for v in margins.values()),
        "recheck_margin", f"must be a number >= 0 or a mapping {{precision: number >= 0}} of {precisions[1:]}",
        margin)


def plain(value: Any) -> Any:
    """An OmegaConf node as plain Python (dicts, lists); anything else as it is."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def validate_predict(cfg: DictConfig) -> None:
    """predict.py: every setting, before the model loads and before anything is written."""
    from abstract_tagger.corpus import FORMATS
    from abstract_tagger.predict_files import parse_shard

    check_predict_options({key: plain(cfg[key]) for key in PREDICT_OPTIONS})
    _one_of(cfg, "format", (None, *FORMATS))
    for key in ("resume", "progress"):
        _one_of(cfg, key, (True, False))
    try:
        parse_shard(cfg.shard)
    except ValueError as e:
        raise ConfigError(f"shard={cfg.shard!r}: {e}") from None
    require(cfg.fields is None or (isinstance(cfg.fields, DictConfig) and all(isinstance(v, str) for v in
             cfg.fields.values())), "fields", "must be a mapping like {title: COLUMN, abstract: COLUMN}", cfg.fields)
    source = str(cfg.input)
    require(source == "-" or Path(source).is_file(), "input", "file not found (or not a file)", source)
    check_output(source, cfg.output)


# What marks a directory as a checkpoint (an exported one has both).
_CHECKPOINT_FILES = ("config.json", "thresholds.json")


def check_output(source: str | Path, output: str | Path) -> None:
    """predict.py's and predict_file's output: a new file that destroys nothing (the input, a checkpoint)."""
    from abstract_tagger.predict_files import OutputFiles

    output, source = Path(str(output)), str(source)
    require(not output.is_dir(), "output", "is a directory; give a file name", str(output))
    # Rows are appended and truncated by byte offset to resume; a compressed stream cannot be.
    require(output.suffix.lower() != ".gz", "output", "compressed output is not supported; write a .jsonl "
             "or .csv and compress it afterwards", str(output))
    # Its thresholds.json or config.json would be overwritten, or a stray file published with it.
    require(not all((output.parent / name).is_file() for name in _CHECKPOINT_FILES), "output",
            f"is inside the checkpoint directory {output.parent}; write it elsewhere", str(output))
    if source != "-":
        files = OutputFiles(output)
        for path in (files.output, files.partial, files.rejects, files.rejects_partial, files.journal, files.lock):
            require(not _same_file(path, Path(source)), "output", f"would overwrite the input {source}", str(output))


def validate_publish(run_dir: Path, opts: Mapping[str, Any]) -> None:
    """publish.py: checked before the published checkpoint is touched."""
    cfg = OmegaConf.create(dict(opts))
    require((run_dir / "checkpoint").is_dir(), "run_dir", "has no checkpoint/ directory", str(run_dir))
    require(isinstance(cfg.name, str) and cfg.name.strip() not in ("", ".", "..") and "/" not in cfg.name,
             "name", "must be a plain directory name", cfg.name)
    require(isinstance(cfg.out_dir, str) and bool(cfg.out_dir), "out_dir", "must be a directory path", cfg.out_dir)
    dest, source = (Path(cfg.out_dir) / cfg.name).resolve(), (run_dir / "checkpoint").resolve()
    # Publishing replaces out_dir/name with an fp16 copy of the run's checkpoint: never the checkpoint itself.
    require(dest != source and source not in dest.parents and dest not in source.parents, "out_dir",
            f"out_dir/name ({dest}) is or holds the run's own checkpoint {source}, which publishing would "
            "replace by its fp16 copy; publish somewhere else", cfg.out_dir)
    _positive(cfg, "max_mb")
    _fraction(cfg, "max_score_diff")
    _fraction(cfg, "max_disagreement")
    require(isinstance(cfg.dev_sets, DictConfig) and len(cfg.dev_sets) > 0, "dev_sets",
             "must map a name to {gold: FILE, papers: FILE, format: FORMAT}", cfg.dev_sets)
    for name, spec in cfg.dev_sets.items():
        for key in ("gold", "papers"):
            value = OmegaConf.select(spec, key) if isinstance(spec, DictConfig) else None
            require(isinstance(value, str) and Path(value).is_file(), f"dev_sets.{name}.{key}", "file not found",
                     value)
    for key in ("push_to_hub", "private", "dry_run"):
        _one_of(cfg, key, (True, False))
    if cfg.push_to_hub:
        require(isinstance(cfg.repo_id, str) and cfg.repo_id.count("/") == 1, "repo_id",
                 "push_to_hub=true needs repo_id=USER/NAME", cfg.repo_id)
