"""Threshold policies on synthetic scores: honest k-fold scores, and `guarded` keeping 0.5 where a
tuned threshold only fits noise."""

import numpy as np
import pytest

from abstract_tagger.metrics import score
from abstract_tagger.training import thresholds as thr

CFG = {"policy": "auto", "candidates": ["flat", "guarded", "tuned"], "default": 0.5, "min_gain": 0.02, "folds": 5,
       "grid": {"start": 0.05, "stop": 0.95, "step": 0.05}}
TAGS = ["a", "b", "c"]


def policy(name):
    return thr.ThresholdPolicy.from_config(CFG, name)


def test_grid_comes_from_the_config():
    np.testing.assert_allclose(policy("tuned").grid, np.round(np.arange(0.05, 0.951, 0.05), 2))


def test_kfold_scores_are_not_tuned_on_the_scored_papers():
    rng = np.random.default_rng(0)
    gold = (rng.random((60, 3)) < 0.3).astype(np.int8)
    noise = rng.random((60, 3))  # unrelated to gold: tuned-on-self F1 is optimistic, k-fold is not
    tuned = policy("tuned")
    on_self = score(noise >= tuned.fit(noise, gold), gold, TAGS).micro_f1
    assert score(tuned.heldout_predictions(noise, gold), gold, TAGS).micro_f1 < on_self


def test_guarded_keeps_the_default_where_tuning_fits_noise():
    rng = np.random.default_rng(1)
    gold = (rng.random((200, 3)) < 0.25).astype(np.int8)
    # Informative but calibrated scores: 0.5 is right; tuning can only chase noise.
    probs = np.clip(np.where(gold == 1, 0.75, 0.25) + rng.normal(0, 0.2, gold.shape), 0, 1)
    tuned, guarded = policy("tuned").fit(probs, gold), policy("guarded").fit(probs, gold)
    assert (tuned != 0.5).any()                # tuning moves thresholds to fit these 200 papers...
    np.testing.assert_array_equal(guarded, 0.5)  # ...which held-out folds do not reward


def test_guarded_adopts_a_threshold_that_wins_on_held_out_folds():
    rng = np.random.default_rng(2)
    gold = (rng.random((200, 3)) < 0.3).astype(np.int8)
    probs = np.where(gold == 1, 0.35, 0.1) + 0.1 * rng.random(gold.shape)  # positives never reach 0.5
    guarded = policy("guarded").fit(probs, gold)
    assert ((guarded > 0.1) & (guarded <= 0.35)).all(), guarded
    choice = thr.choose(probs, gold, TAGS, CFG)
    assert choice.policy in ("guarded", "tuned") and choice.heldout.micro_f1 == 1.0
    assert set(choice.candidates) == {"flat", "guarded", "tuned"}
    assert choice.candidates["flat"].micro_f1 == 0.0


def test_auto_prefers_the_simplest_policy_among_equals():
    gold = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0]] * 8, dtype=np.int8)
    probs = np.where(gold == 1, 0.9, 0.1)  # every policy is perfect
    choice = thr.choose(probs, gold, TAGS, CFG)
    assert choice.policy == "flat" and set(choice.thresholds.values()) == {0.5}


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="thresholds.policy"):
        policy("best").fit(np.zeros((4, 3)), np.zeros((4, 3), np.int8))
