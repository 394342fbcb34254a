"""Multi-label losses over soft targets, chosen by `trainer/loss=<name>` (`conf/trainer/loss/`, built
with `hydra.utils.instantiate`). Each returns the loss of every (paper, tag) pair; the training loop
weights papers (hand-labelled ones by `trainer.hand_weight`) and averages."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BCE(nn.Module):
    """Binary cross-entropy on the logits; `pos_weight` ([tags]) scales each tag's positive term."""

    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021), as multi-label taggers with many easy negatives use
    it: negatives are focused down by `gamma_neg` and shifted by `clip` (a negative scored under `clip`
    costs nothing), so the 16-17 absent tags of a paper stop dominating the gradient. With
    `gamma_pos=gamma_neg=clip=0` it is BCE. Soft targets weight the two terms."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 pos_weight: torch.Tensor | None = None, eps: float = 1e-8):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        # The shifted negative probability p_m = max(p - clip, 0); log(1 - p_m) without cancelling 1 - p.
        p_neg = (p - self.clip).clamp(min=0) if self.clip else p
        log_pos = F.logsigmoid(logits)
        log_neg = torch.log((1 - p_neg).clamp(min=self.eps)) if self.clip else F.logsigmoid(-logits)
        pos = targets * log_pos * (1 - p).pow(self.gamma_pos)
        if self.pos_weight is not None:
            pos = pos * self.pos_weight
        neg = (1 - targets) * log_neg * p_neg.pow(self.gamma_neg)
        return -(pos + neg)
