"""The training run, top to bottom:

    weak labels (streamed, cached) -> training data (gold papers held out in memory, the training
    papers in an Arrow dataset on disk) -> fit, then self-training rounds -> the model's scores on the
    held-out papers and a review pool -> rule blend -> thresholds -> evaluation (dev, test) -> export
    -> review, charts, tracking

Dev sets choose everything (blend weight, threshold policy and thresholds); test sets are only
scored, with what was chosen on dev, so their numbers say what to expect on papers nobody tuned on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from omegaconf import DictConfig

from abstract_tagger.checkpoint.card import FACTS_FILE, CardFacts, model_card
from abstract_tagger.checkpoint.export import export_checkpoint
from abstract_tagger.common.config import require
from abstract_tagger.common.files import write_atomic, write_json
from abstract_tagger.data.corpus import Paper, read_gold_sets, read_gold_train
from abstract_tagger.data.taxonomy import Taxonomy
from abstract_tagger.labeling.rule_blend import RuleBlend
from abstract_tagger.labeling.weak_labels import WeakLabels, build_weak_labels
from abstract_tagger.training import tracking
from abstract_tagger.training.backbone import Backbone, load_backbone
from abstract_tagger.training.checks import validate
from abstract_tagger.training.data import TrainingData, papers_dataset, training_data
from abstract_tagger.training.evaluation import Evaluation, SetScores, evaluate_run, fit_blend
from abstract_tagger.training.loop import FitData, FitResult, Phase, _loader, fit, make_accelerator, predict_probs

log = logging.getLogger(__name__)

STATE_DIR = "state"


# --- training ---------------------------------------------------------------------------------------


@dataclass
class Trained:
    backbone: Backbone
    rounds: list[FitResult] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rounds)

    @property
    def first_steps(self) -> list[int]:
        """Where each round's optimizer steps start in the run's count, and (last) where the next one's do."""
        return list(accumulate((r.epoch_steps[-1] if r.epoch_steps else 0 for r in self.rounds), initial=0))

    @property
    def steps(self) -> int:
        """Optimizer steps of every round so far: where the next one's count starts."""
        return self.first_steps[-1]

    @property
    def samples_per_s(self) -> float:
        seen = sum(r.samples_per_s * r.seconds for r in self.rounds)
        return seen / self.seconds if self.seconds else 0.0


def train(cfg: DictConfig, accelerator: Accelerator, backbone: Backbone, data: TrainingData, tag_ids: list[str],
          run_dir: Path) -> Trained:
    """Fit on the weak targets (hand labels in place of those papers' weak ones), then
    `trainer.self_training.rounds` rounds: relabel the training papers with a mix of the model's and the
    labelling functions' probabilities and continue training on them (hand labels stay): the model learns
    what the two agree on and smooths what each gets wrong alone. Last, `trainer.clean_phase`: the
    hand-labelled papers alone, so their clean labels have the last word."""
    t, st, cp = cfg.trainer, cfg.trainer.self_training, cfg.trainer.clean_phase
    model = accelerator.prepare(backbone.model)
    tokenizer, max_length = backbone.tokenizer, cfg.model.max_length
    train_data = data.train
    dev_rows = data.split.rows("dev")
    dev_data = papers_dataset([data.held_out[i] for i in dev_rows], tokenizer, max_length)
    dev_gold = data.split.gold("dev")

    def on(papers) -> FitData:
        return FitData(papers, dev_data, dev_gold, tag_ids)

    trained = Trained(backbone)
    round_data = train_data
    for r in range(st.rounds + 1):
        if r:
            probs = model_probs(cfg, accelerator, model, tokenizer, train_data)
            columns = train_data.select_columns(["labels", "hand"]).with_format("numpy")
            weak, hand = np.stack(columns["labels"]), np.asarray(columns["hand"])
            mixed = np.where(hand[:, None], weak, (1 - st.model_weight) * weak + st.model_weight * probs)
            round_data = train_data.remove_columns("labels").add_column(
                "labels", mixed.astype(np.float32).tolist(), feature=train_data.features["labels"])
            accelerator.print(f"self-training round {r}: targets = {1 - st.model_weight:g} x weak labels + "
                              f"{st.model_weight:g} x model")
        phase = Phase.weak(t) if r == 0 else Phase(f"round-{r}", st.epochs, t.lr, t.head_lr, t.max_steps,
                                                   first_step=trained.steps)
        trained.rounds.append(fit(t, accelerator, model, tokenizer, on(round_data), run_dir / STATE_DIR / phase.name,
                                  phase))
    if cp.epochs:
        clean = train_data.select(np.flatnonzero(train_data.with_format("numpy")["hand"]))
        accelerator.print(f"clean phase: {len(clean)} hand-labelled papers, {cp.epochs} epoch(s)")
        phase = Phase("clean", cp.epochs, cp.lr, cp.head_lr, first_step=trained.steps)
        trained.rounds.append(fit(t, accelerator, model, tokenizer, on(clean), run_dir / STATE_DIR / phase.name, phase))
    backbone.model = model
    return trained


def model_probs(cfg: DictConfig, accelerator: Accelerator, model, tokenizer, data) -> np.ndarray:
    """The model's probabilities for every row of a tokenised dataset."""
    loader = accelerator.prepare(_loader(data, tokenizer, cfg.trainer.eval_batch_size, False,
                                         cfg.trainer.num_workers))
    return predict_probs(accelerator, model, loader)


# --- the run ----------------------------------------------------------------------------------------


def load_model(cfg: DictConfig, tag_ids: list[str]) -> Backbone:
    """The configured backbone with a fresh multi-label head. Where the fallback serves, its own
    max_length and learning rates replace the primary's in `cfg.model` (trainer.lr and head_lr
    interpolate them, so explicit trainer overrides still win)."""
    backbone = load_backbone(cfg.model, tag_ids)
    for key, value in backbone.settings.items():
        cfg.model[key] = value
    return backbone


def load_training_data(cfg: DictConfig, weak: WeakLabels, tag_ids: list[str], tokenizer) -> TrainingData:
    """The configured training data: every gold set of `data.gold` held out, the hand-labelled sets of
    `data.gold_train` as hard targets (train.py's, and the baselines' of bench/baselines.py)."""
    return training_data(cfg, weak, read_gold_sets(cfg.data.gold, tag_ids),
                         read_gold_train(cfg.data.gold_train, tag_ids), tag_ids, tokenizer, cfg.model.max_length)


@dataclass(frozen=True)
class Pool:
    """The papers scored after training: every held-out paper, then the first `export.review_pool`
    training papers (for review.jsonl), with their weak labels and what predict.py gives them
    (`shipped`: the model's probabilities, blended with the rules where a blend ships)."""

    papers: list[Paper]
    weak: np.ndarray
    shipped: np.ndarray


@dataclass(frozen=True)
class Outcome:
    """Everything the run made, for the checkpoint, the review and the report."""

    taxonomy: Taxonomy
    weak: WeakLabels
    data: TrainingData
    trained: Trained
    pool: Pool
    evaluation: Evaluation
    blend: RuleBlend | None


def run(cfg: DictConfig) -> dict[str, Any]:
    """The full training run; returns the summary also written to `<run_dir>/metrics.json`."""
    taxonomy = Taxonomy.from_config(cfg.taxonomy)
    tag_ids = taxonomy.ids
    validate(cfg, tag_ids)
    check_optimized_metric(cfg)
    set_seed(cfg.seed)  # before the classifier head is initialised
    # Loaded before tracking starts, so the config it logs has the settings the run trains with.
    backbone = load_model(cfg, tag_ids)
    accelerator = make_accelerator(cfg)
    # Ranks may have resolved different timestamps; the main process's directory wins.
    run_dir = [str(Path(cfg.paths.output_dir).resolve())]
    broadcast_object_list(run_dir)
    run_dir = Path(run_dir[0])
    tracking.start(accelerator, cfg, run_dir)

    weak = build_weak_labels(cfg)  # every rank: they share the voting
    if weak.tag_ids != tag_ids:
        raise ValueError(f"weak labels are over {weak.tag_ids}, the taxonomy over {tag_ids}")
    with accelerator.main_process_first():  # built once into the cache; the other ranks read it
        data = load_training_data(cfg, weak, tag_ids, backbone.tokenizer)
    accelerator.print(f"{data.n_corpus} papers: {len(data.train)} train ({data.n_hand} hand-labelled), "
                      + ", ".join(f"{len(rows)} {name}" for name, rows in data.split.sets.items()) + " (held out)")
    if accelerator.is_main_process:
        weak.write(run_dir)

    trained = train(cfg, accelerator, backbone, data, tag_ids, run_dir)
    papers, pool_weak, probs = score_pool(cfg, accelerator, data, trained.backbone)
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        blend, weights, shipped = fit_blend(cfg, taxonomy, data, papers, probs)
        evaluation = evaluate_run(cfg, data.split, probs, shipped, pool_weak, blend.weight if blend else 0.0,
                                  weights, tag_ids)
        outcome = Outcome(taxonomy, weak, data, trained, Pool(papers, pool_weak, shipped), evaluation, blend)
        facts = card_facts(cfg, accelerator, outcome)
        checkpoint = export(cfg, accelerator, outcome, model_card(facts), run_dir / "checkpoint")
        facts.save(run_dir / FACTS_FILE)
        review(cfg, outcome, run_dir / "review.jsonl")
        summary = report(cfg, accelerator, outcome, checkpoint, run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def score_pool(cfg: DictConfig, accelerator: Accelerator, data: TrainingData,
               backbone: Backbone) -> tuple[list[Paper], np.ndarray, np.ndarray]:
    """The pool's papers (every held-out paper, then the first `export.review_pool` training papers),
    their weak labels and the trained model's probabilities."""
    review = list(data.train_papers(cfg.export.review_pool))
    papers = data.held_out + [p for batch, _, _ in review for p in batch]
    weak = np.concatenate([data.held_out_weak, *(targets for _, targets, _ in review)])
    probs = model_probs(cfg, accelerator, backbone.model, backbone.tokenizer,
                        papers_dataset(papers, backbone.tokenizer, cfg.model.max_length))
    return papers, weak, probs


METRICS = ("micro_f1", "macro_f1", "mean_f1")
PREDICTIONS = tuple(f.name for f in fields(SetScores))


def check_optimized_metric(cfg: DictConfig) -> None:
    """`optimized_metric` is `<gold set>/<predictions>/<metric>` on a dev set: a sweep that maximised a
    test score would have chosen on the test set."""
    key = cfg.optimized_metric
    parts = key.rsplit("/", 2) if isinstance(key, str) else []
    dev_sets = ["dev", *(f"dev/{name}" for name, path in (cfg.data.gold.get("dev") or {}).items() if path)]
    require(len(parts) == 3 and parts[0] in dev_sets and parts[1] in PREDICTIONS and parts[2] in METRICS,
            "optimized_metric", f"must be <{'|'.join(dev_sets)}>/<{'|'.join(PREDICTIONS)}>/<{'|'.join(METRICS)}>"
            " (a dev score: sweeps never choose on test)", key)


def optimized_metric(summary: Mapping[str, Any], key: str) -> float:
    """The value of `optimized_metric` (checked at start-up) in a run's summary."""
    name, kind, metric = key.rsplit("/", 2)
    scores = summary["scores"][name][kind]
    if metric == "mean_f1":
        return (scores["micro_f1"] + scores["macro_f1"]) / 2
    return scores[metric]


# --- export and report ------------------------------------------------------------------------------


def _precision(accelerator: Accelerator) -> str:
    return "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision


def corpus_counts(outcome: Outcome) -> dict[str, Any]:
    data = outcome.data
    return {"sources": {n: s["kept"] for n, s in outcome.weak.report["corpus"]["per_source"].items()},
            "train": len(data.train), "held_out": {n: len(r) for n, r in data.split.sets.items()}}


def card_facts(cfg: DictConfig, accelerator: Accelerator, outcome: Outcome) -> CardFacts:
    t, data = cfg.trainer, outcome.data
    training = {"epochs": t.epochs, "loss": t.loss._target_.rsplit(".", 1)[-1], "pos_weight": t.pos_weight,
                "hand_papers": data.n_hand, "hand_weight": t.hand_weight, "clean_phase_epochs": t.clean_phase.epochs,
                "self_training_rounds": t.self_training.rounds,
                "self_training_epochs": t.self_training.epochs, "self_training_model_weight": t.self_training.model_weight,
                "batch_size": t.batch_size * accelerator.num_processes * t.grad_accum,
                "max_length": cfg.model.max_length, "lr": t.lr, "head_lr": t.head_lr or t.lr,
                "precision": _precision(accelerator), "seed": cfg.seed, "threshold_folds": cfg.thresholds.folds}
    return CardFacts(backbone=outcome.trained.backbone.source, corpus=corpus_counts(outcome),
                     functions=outcome.weak.report["functions"],
                     training=training, evaluation=outcome.evaluation, taxonomy=outcome.taxonomy)


def export(cfg: DictConfig, accelerator: Accelerator, outcome: Outcome, card: str, out_dir: Path) -> Path:
    """The checkpoint, its weights in `export.dtype`, its int8 graph calibrated on training papers."""
    model = accelerator.unwrap_model(outcome.trained.backbone.model).to(getattr(torch, cfg.export.dtype))
    calibration = [p.text for papers, _, _ in outcome.data.train_papers(cfg.export.calibration_papers) for p in papers]
    tokenizer = outcome.trained.backbone.tokenizer
    tokenizer.model_max_length = cfg.model.max_length  # pipeline() and predict truncate where training did
    return export_checkpoint(model, tokenizer, out_dir, thresholds=outcome.evaluation.thresholds,
                             taxonomy=outcome.taxonomy, calibration=calibration, card=card, blend=outcome.blend)


def _charts(accelerator: Accelerator, outcome: Outcome, run_dir: Path) -> None:
    tag_ids, dev = outcome.taxonomy.ids, outcome.evaluation.sets["dev"]
    per_tag = {"weak labels (0.5)": dev.weak.per_tag, "model (k-fold)": dev.model.per_tag,
               "shipped (k-fold)": dev.shipped.per_tag}
    tracking.plot_per_tag_f1(run_dir / "per_tag_f1.png", tag_ids, per_tag)
    steps, losses, epoch_steps = [], [], []
    for first, r in zip(outcome.trained.first_steps, outcome.trained.rounds):  # rounds continue the step count
        steps += [first + s for s in r.steps]
        losses += r.losses
        epoch_steps += [first + s for s in r.epoch_steps]
    tracking.plot_loss(run_dir / "loss.png", steps, losses, epoch_steps)
    tracking.log_per_tag_table(accelerator, tag_ids, per_tag)
    accelerator.log({f"final/{name}/{kind}/{m}": getattr(getattr(s, kind), m)
                     for name, s in outcome.evaluation.sets.items() for kind in ("weak", "model", "shipped")
                     for m in ("micro_f1", "macro_f1")})


def review(cfg: DictConfig, outcome: Outcome, path: Path) -> None:
    tag_ids, papers, split = outcome.taxonomy.ids, outcome.pool.papers, outcome.data.split
    gold = {papers[r].id: [tg for tg, on in zip(tag_ids, y) if on]
            for name in split.sets for r, y in zip(split.sets[name], split.labels[name])}
    cut = np.array([outcome.evaluation.thresholds[t] for t in tag_ids])
    write_review(path, outcome.pool, cut, outcome.weak.threshold, tag_ids, gold, cfg.export.review_size)


def report(cfg: DictConfig, accelerator: Accelerator, outcome: Outcome, checkpoint: Path,
           run_dir: Path) -> dict[str, Any]:
    """Charts, tracking and metrics.json; returns the run's summary."""
    _charts(accelerator, outcome, run_dir)
    evaluation, trained = outcome.evaluation, outcome.trained
    summary = {
        "checkpoint": str(checkpoint),
        "backbone": trained.backbone.source,
        "fell_back": trained.backbone.fell_back,
        "corpus": corpus_counts(outcome),
        "train_seconds": round(trained.seconds, 1),
        "train_samples_per_s": round(trained.samples_per_s, 2),
        "precision": _precision(accelerator),
        "num_processes": accelerator.num_processes,
        "threshold_policy": evaluation.threshold_policy,
        "threshold_policy_candidates": evaluation.policy_candidates,
        "blend_weight": evaluation.blend_weight,
        "blend_candidates": {str(w): v for w, v in evaluation.blend_candidates.items()},
        "scores": {name: s.to_dict() for name, s in evaluation.sets.items()},
        "dev_in_sample": evaluation.dev_in_sample.to_dict(),
        "epochs": [m for r in trained.rounds for m in r.epoch_metrics],
        "thresholds": evaluation.thresholds,
    }
    write_json(run_dir / "metrics.json", summary, indent=2)
    log.info("micro/macro F1 (weak | model | shipped): %s", "; ".join(
        f"{name}: {s.weak.micro_f1:.3f}/{s.weak.macro_f1:.3f} | {s.model.micro_f1:.3f}/{s.model.macro_f1:.3f} | "
        f"{s.shipped.micro_f1:.3f}/{s.shipped.macro_f1:.3f}" for name, s in evaluation.sets.items()))
    log.info("checkpoint: %s", checkpoint)
    return summary


def write_review(path: Path, pool: Pool, thresholds: np.ndarray, weak_threshold: float, tag_ids: list[str],
                 gold: Mapping[str, list[str]], size: int) -> None:
    """Papers where what ships and the weak labels disagree most, most first: the ones worth relabelling
    (corrected rows can go back in as `data.gold_train`). Disagreement is the summed |shipped - weak|
    probability over the tags whose decisions differ."""
    shipped_tags = pool.shipped >= thresholds
    weak_tags = pool.weak >= weak_threshold
    differ = shipped_tags != weak_tags
    gap = np.abs(pool.shipped - pool.weak) * differ
    order = np.argsort(-gap.sum(1), kind="stable")
    rows = []
    for i in order[:size]:
        if not differ[i].any():
            break
        paper = pool.papers[i]
        rows.append(json.dumps({
            "id": paper.id, "title": paper.title, "disagreement": round(float(gap[i].sum()), 4),
            "model_tags": [t for t, on in zip(tag_ids, shipped_tags[i]) if on],
            "weak_tags": [t for t, on in zip(tag_ids, weak_tags[i]) if on],
            "gold_tags": gold.get(paper.id),
            "differences": {t: {"model": round(float(pool.shipped[i, j]), 3), "weak": round(float(pool.weak[i, j]), 3)}
                            for j, t in enumerate(tag_ids) if differ[i, j]},
            "abstract": paper.abstract,
        }, ensure_ascii=False) + "\n")
    # Whole or not at all: a rerun in the same run directory keeps the last review until the new one is done.
    write_atomic(path, lambda f: f.write("".join(rows).encode("utf-8", "surrogateescape")))
