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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from omegaconf import DictConfig, OmegaConf

from abstract_tagger import thresholds as thr
from abstract_tagger import tracking
from abstract_tagger.checkpoint import export_checkpoint, model_card
from abstract_tagger.config_checks import require, validate
from abstract_tagger.corpus import Paper, read_gold, read_gold_sets
from abstract_tagger.labeling.label_model import LearnedLabelModel
from abstract_tagger.model import Backbone, load_backbone
from abstract_tagger.rule_blend import RuleBlend, choose_weight, rule_functions
from abstract_tagger.taxonomy import Taxonomy
from abstract_tagger.training import FitResult, Phase, _loader, fit, make_accelerator, predict_probs
from abstract_tagger.training_data import Split, TrainingData, papers_dataset, training_data

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
        phase = Phase.weak(t) if r == 0 else Phase(f"round-{r}", st.epochs, t.lr, t.head_lr, t.max_steps)
        trained.rounds.append(fit(t, accelerator, model, tokenizer, round_data, dev_data, dev_gold, tag_ids,
                                  run_dir / STATE_DIR / phase.name, phase))
    if cp.epochs:
        clean = train_data.select(np.flatnonzero(train_data.with_format("numpy")["hand"]))
        accelerator.print(f"clean phase: {len(clean)} hand-labelled papers, {cp.epochs} epoch(s)")
        phase = Phase("clean", cp.epochs, cp.lr, cp.head_lr)
        trained.rounds.append(fit(t, accelerator, model, tokenizer, clean, dev_data, dev_gold, tag_ids,
                                  run_dir / STATE_DIR / phase.name, phase))
    backbone.model = model
    return trained


def model_probs(cfg: DictConfig, accelerator: Accelerator, model, tokenizer, data) -> np.ndarray:
    """The model's probabilities for every row of a tokenised dataset."""
    loader = accelerator.prepare(_loader(data, tokenizer, cfg.trainer.eval_batch_size, False,
                                         cfg.trainer.num_workers))
    return predict_probs(accelerator, model, loader)


# --- evaluation -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetScores:
    """Scores of one gold set. Dev sets: `model` and `shipped` are k-fold held-out (each paper scored
    with choices made on the other folds). Test sets: everything chosen on dev, applied as is."""

    weak: thr.Scores            # weak labels (label model over all functions) at 0.5
    model_flat: thr.Scores      # model alone at 0.5
    model: thr.Scores           # model alone, thresholds by the policy
    shipped: thr.Scores         # what predict.py does: model (+ rule blend) with the shipped thresholds

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).to_dict() for k in ("weak", "model_flat", "model", "shipped")}


@dataclass(frozen=True)
class Evaluation:
    sets: dict[str, SetScores]
    dev_in_sample: thr.Scores   # the shipped thresholds on the dev papers they were chosen on
    threshold_policy: str
    policy_candidates: dict[str, float]  # policy -> k-fold held-out mean F1 on dev
    blend_weight: float
    blend_candidates: dict[float, float]  # weight -> k-fold held-out mean F1 on dev
    thresholds: dict[str, float]


def fit_blend(cfg: DictConfig, taxonomy: Taxonomy, data: TrainingData, pool: Sequence[Paper],
              pool_probs: np.ndarray) -> tuple[RuleBlend | None, dict[float, float], np.ndarray]:
    """The rule blend (None where `rule_blend.weights` is [0]), every candidate weight's k-fold dev
    score, and the probabilities it ships for every paper of `pool` (the held-out papers, then the first
    training papers). Its label model is fitted on the rule votes of the first `labeling.fit_max_records`
    training papers; the rule functions vote once on each paper."""
    if list(cfg.rule_blend.weights) == [0.0]:
        return None, {0.0: 0.0}, pool_probs
    min_hits = cfg.labeling.keywords.min_abstract_hits
    rules = rule_functions(taxonomy, min_hits)
    n_review = len(pool) - len(data.held_out)
    n_fit = min(cfg.labeling.fit_max_records, len(data.train))
    train_votes = np.concatenate([rules(papers) for papers, _ in data.train_papers(max(n_fit, n_review))])
    blend = RuleBlend.fit(taxonomy, min_hits, train_votes[:n_fit], LearnedLabelModel(cfg.labeling.label_model))
    rule_probs = blend.probs_from_votes(np.concatenate([rules(data.held_out), train_votes[:n_review]]))
    dev_rows = data.split.rows("dev")
    weights = choose_weight(pool_probs[dev_rows], rule_probs[dev_rows], data.split.gold("dev"), taxonomy.ids,
                            cfg.rule_blend.weights, OmegaConf.to_container(cfg.thresholds, resolve=True), cfg.seed)
    blend.weight = max(weights, key=lambda w: (round(weights[w], 6), -w))  # the lowest weight among equals
    return blend, weights, blend.mix(pool_probs, rule_probs)


def evaluate_run(cfg: DictConfig, split: Split, model_probs: np.ndarray, shipped_probs: np.ndarray,
                 weak_probs: np.ndarray, blend_weight: float, blend_candidates: dict[float, float],
                 tag_ids: list[str]) -> Evaluation:
    """Choose the thresholds on dev for the model alone and for what ships; score every gold set."""
    tcfg = OmegaConf.to_container(cfg.thresholds, resolve=True)
    dev_rows, dev_gold = split.rows("dev"), split.gold("dev")
    model_choice = thr.choose(model_probs[dev_rows], dev_gold, tag_ids, tcfg, cfg.seed)
    shipped_choice = thr.choose(shipped_probs[dev_rows], dev_gold, tag_ids, tcfg, cfg.seed)
    model_cut = np.array([model_choice.thresholds[t] for t in tag_ids])
    shipped_cut = np.array([shipped_choice.thresholds[t] for t in tag_ids])

    sets: dict[str, SetScores] = {}
    offset = 0
    for name in [*split.of("dev"), *split.of("test")]:
        rows, gold = split.sets[name], split.labels[name]
        if name.startswith("dev/"):
            # Slices of the k-fold held-out predictions over all dev papers.
            part = slice(offset, offset + len(rows))
            offset += len(rows)
            model_pred, shipped_pred = model_choice.heldout_pred[part], shipped_choice.heldout_pred[part]
        else:
            model_pred, shipped_pred = model_probs[rows] >= model_cut, shipped_probs[rows] >= shipped_cut
        sets[name] = SetScores(
            weak=thr.score(weak_probs[rows] >= 0.5, gold, tag_ids),
            model_flat=thr.score(model_probs[rows] >= 0.5, gold, tag_ids),
            model=thr.score(model_pred, gold, tag_ids),
            shipped=thr.score(shipped_pred, gold, tag_ids),
        )
    # All dev sets together, as chosen on.
    sets["dev"] = SetScores(
        weak=thr.score(weak_probs[dev_rows] >= 0.5, dev_gold, tag_ids),
        model_flat=thr.score(model_probs[dev_rows] >= 0.5, dev_gold, tag_ids),
        model=model_choice.heldout, shipped=shipped_choice.heldout)
    return Evaluation(
        sets=sets,
        dev_in_sample=thr.score(shipped_probs[dev_rows] >= shipped_cut, dev_gold, tag_ids),
        threshold_policy=shipped_choice.policy,
        policy_candidates={k: v.mean_f1 for k, v in shipped_choice.candidates.items()},
        blend_weight=blend_weight,
        blend_candidates=blend_candidates,
        thresholds=shipped_choice.thresholds,
    )


# --- the run ----------------------------------------------------------------------------------------


def load_model(cfg: DictConfig, tag_ids: list[str]) -> Backbone:
    """The configured backbone with a fresh multi-label head. Where the fallback serves, its own
    max_length and learning rates replace the primary's in `cfg.model` (trainer.lr and head_lr
    interpolate them, so explicit trainer overrides still win)."""
    backbone = load_backbone(cfg.model, tag_ids)
    for key, value in backbone.settings.items():
        cfg.model[key] = value
    return backbone


def run(cfg: DictConfig) -> dict[str, Any]:
    """The full training run; returns the summary also written to `<run_dir>/metrics.json`."""
    from abstract_tagger.labeling.weak_labels import build_weak_labels

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
    gold_train = read_gold(cfg.data.gold_train, tag_ids) if cfg.data.gold_train else None
    with accelerator.main_process_first():  # built once into the cache; the other ranks read it
        data = training_data(cfg, weak, read_gold_sets(cfg.data.gold, tag_ids), gold_train, tag_ids,
                             backbone.tokenizer, cfg.model.max_length)
    accelerator.print(f"{data.n_corpus} papers: {len(data.train)} train ({data.n_hand} hand-labelled), "
                      + ", ".join(f"{len(rows)} {name}" for name, rows in data.split.sets.items()) + " (held out)")
    if accelerator.is_main_process:
        weak.write(run_dir)

    trained = train(cfg, accelerator, backbone, data, tag_ids, run_dir)
    # Scored after training: every held-out paper, then the first training papers (for review.jsonl).
    review = list(data.train_papers(cfg.export.review_pool))
    pool = data.held_out + [p for papers, _ in review for p in papers]
    pool_weak = np.concatenate([data.held_out_weak, *(targets for _, targets in review)])
    probs = model_probs(cfg, accelerator, trained.backbone.model, trained.backbone.tokenizer,
                        papers_dataset(pool, trained.backbone.tokenizer, cfg.model.max_length))
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        blend, weights, shipped = fit_blend(cfg, taxonomy, data, pool, probs)
        evaluation = evaluate_run(cfg, data.split, probs, shipped, pool_weak, blend.weight if blend else 0.0,
                                  weights, tag_ids)
        summary = _export_and_report(cfg, accelerator, taxonomy, weak, data, pool, pool_weak, shipped, trained,
                                     evaluation, blend, run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


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


def _export_and_report(cfg, accelerator, taxonomy, weak, data, pool, pool_weak, shipped, trained, evaluation, blend,
                       run_dir) -> dict[str, Any]:
    """Main process: checkpoint, review.jsonl, charts, tracking, metrics.json. `shipped`: the
    probabilities predict.py gives every paper of `pool` (the model's, blended with the rules where shipped)."""
    tag_ids = taxonomy.ids
    t = cfg.trainer
    precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    corpus = {"sources": {n: s["kept"] for n, s in weak.report["corpus"]["per_source"].items()},
              "train": len(data.train), "held_out": {n: len(r) for n, r in data.split.sets.items()}}
    training = {"epochs": t.epochs, "loss": t.loss._target_.rsplit(".", 1)[-1], "pos_weight": t.pos_weight,
                "hand_papers": data.n_hand, "hand_weight": t.hand_weight, "clean_phase_epochs": t.clean_phase.epochs,
                "self_training_rounds": t.self_training.rounds,
                "self_training_epochs": t.self_training.epochs, "self_training_model_weight": t.self_training.model_weight,
                "batch_size": t.batch_size * accelerator.num_processes * t.grad_accum,
                "max_length": cfg.model.max_length, "lr": t.lr, "head_lr": t.head_lr or t.lr,
                "precision": precision, "seed": cfg.seed, "threshold_folds": cfg.thresholds.folds}
    card = model_card(backbone=trained.backbone.source, taxonomy=taxonomy, evaluation=evaluation, corpus=corpus,
                      labeling={"functions": weak.report["functions"]}, training=training)
    model = accelerator.unwrap_model(trained.backbone.model)
    checkpoint = export_checkpoint(model, trained.backbone.tokenizer, run_dir / "checkpoint",
                                   thresholds=evaluation.thresholds, taxonomy=taxonomy,
                                   max_length=cfg.model.max_length, dtype=cfg.export.dtype, card=card, blend=blend)
    cut = np.array([evaluation.thresholds[tg] for tg in tag_ids])
    split = data.split
    gold_tags = {pool[r].id: [tg for tg, on in zip(tag_ids, y) if on]
                 for name in split.sets for r, y in zip(split.sets[name], split.labels[name])}
    write_review(run_dir / "review.jsonl", pool, shipped, pool_weak, cut, weak.threshold, tag_ids, gold_tags,
                 cfg.export.review_size)

    dev = evaluation.sets["dev"]
    per_tag = {"weak labels (0.5)": dev.weak.per_tag, "model (k-fold)": dev.model.per_tag,
               "shipped (k-fold)": dev.shipped.per_tag}
    tracking.plot_per_tag_f1(run_dir / "per_tag_f1.png", tag_ids, per_tag)
    steps, losses, epoch_steps, offset = [], [], [], 0
    for r in trained.rounds:  # rounds continue the step count
        steps += [offset + s for s in r.steps]
        losses += r.losses
        epoch_steps += [offset + s for s in r.epoch_steps]
        offset = epoch_steps[-1] if epoch_steps else offset
    tracking.plot_loss(run_dir / "loss.png", steps, losses, epoch_steps)
    tracking.log_per_tag_table(accelerator, tag_ids, per_tag)
    accelerator.log({f"final/{name}/{kind}/{m}": getattr(getattr(s, kind), m)
                     for name, s in evaluation.sets.items() for kind in ("weak", "model", "shipped")
                     for m in ("micro_f1", "macro_f1")})

    summary = {
        "checkpoint": str(checkpoint),
        "backbone": trained.backbone.source,
        "fell_back": trained.backbone.fell_back,
        "corpus": corpus,
        "train_seconds": round(trained.seconds, 1),
        "train_samples_per_s": round(trained.samples_per_s, 2),
        "precision": precision,
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
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("micro/macro F1 (weak | model | shipped): %s", "; ".join(
        f"{name}: {s.weak.micro_f1:.3f}/{s.weak.macro_f1:.3f} | {s.model.micro_f1:.3f}/{s.model.macro_f1:.3f} | "
        f"{s.shipped.micro_f1:.3f}/{s.shipped.macro_f1:.3f}" for name, s in evaluation.sets.items()))
    log.info("checkpoint: %s", checkpoint)
    return summary


def write_review(path: Path, papers: Sequence[Paper], model_probs: np.ndarray, weak_probs: np.ndarray,
                 thresholds: np.ndarray, weak_threshold: float, tag_ids: list[str],
                 gold: Mapping[str, list[str]], size: int) -> None:
    """Papers where the model and the weak labels disagree most, most first: the ones worth relabelling
    (corrected rows can go back in as `data.gold_train`). Disagreement is the summed |model - weak|
    probability over the tags whose decisions differ."""
    model_tags = model_probs >= thresholds
    weak_tags = weak_probs >= weak_threshold
    differ = model_tags != weak_tags
    gap = np.abs(model_probs - weak_probs) * differ
    order = np.argsort(-gap.sum(1), kind="stable")
    with open(path, "w", encoding="utf-8") as f:
        for i in order[:size]:
            if not differ[i].any():
                break
            f.write(json.dumps({
                "id": papers[i].id, "title": papers[i].title, "disagreement": round(float(gap[i].sum()), 4),
                "model_tags": [t for t, on in zip(tag_ids, model_tags[i]) if on],
                "weak_tags": [t for t, on in zip(tag_ids, weak_tags[i]) if on],
                "gold_tags": gold.get(papers[i].id),
                "differences": {t: {"model": round(float(model_probs[i, j]), 3), "weak": round(float(weak_probs[i, j]), 3)}
                                for j, t in enumerate(tag_ids) if differ[i, j]},
                "abstract": papers[i].abstract,
            }, ensure_ascii=False) + "\n")
