"""The configurable losses: BCE as torch computes it, the asymmetric loss's limits and its asymmetry."""

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from abstract_tagger.training.losses import BCE, AsymmetricLoss


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 18, generator=g) * 3, torch.rand(6, 18, generator=g)  # soft targets


def test_bce_matches_torch_with_and_without_pos_weight(batch):
    logits, targets = batch
    pw = torch.linspace(1, 5, 18)
    for weight in (None, pw):
        expected = torch.nn.BCEWithLogitsLoss(pos_weight=weight)(logits, targets)
        torch.testing.assert_close(BCE(weight)(logits, targets).mean(), expected)


def test_asymmetric_loss_without_focusing_or_clip_is_bce(batch):
    logits, targets = batch
    torch.testing.assert_close(AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(logits, targets),
                               BCE()(logits, targets))


def test_asymmetric_loss_spares_easy_negatives_not_positives():
    loss = AsymmetricLoss()  # gamma_neg 4, clip 0.05
    easy_negative = loss(torch.tensor([[-2.0]]), torch.tensor([[0.0]]))  # p = 0.12
    assert easy_negative.item() < 0.01 * BCE()(torch.tensor([[-2.0]]), torch.tensor([[0.0]])).item()
    assert loss(torch.tensor([[-4.0]]), torch.tensor([[0.0]])).item() == 0  # p = 0.018 < clip: no loss at all
    missed_positive = loss(torch.tensor([[-2.0]]), torch.tensor([[1.0]]))
    torch.testing.assert_close(missed_positive, BCE()(torch.tensor([[-2.0]]), torch.tensor([[1.0]])))
    # Gradients stay finite at extreme logits.
    logits = torch.tensor([[-40.0, 40.0]], requires_grad=True)
    loss(logits, torch.tensor([[1.0, 0.0]])).sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", ["bce", "asl"])
def test_loss_configs_instantiate(root, name):
    cfg = OmegaConf.load(root / "conf" / "trainer" / "loss" / f"{name}.yaml")
    loss = instantiate(cfg, pos_weight=None)
    assert isinstance(loss, (BCE, AsymmetricLoss))
