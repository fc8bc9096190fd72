"""The supervised loss of the SSL4MIS lineage: 0.5 * (cross-entropy + soft Dice).

The Dice term is SSL4MIS's ``DiceLoss`` (softmax, one-hot target, squared denominators, smooth 1e-5, summed
over the batch, averaged over classes), which MONAI's DiceLoss computes with ``squared_pred=True, batch=True``.
UA-MT's LA version scores the foreground channel only: ``include_background=False``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


class SupervisedSegmentationLoss(nn.Module):
    def __init__(self, include_background: bool = True, dice_weight: float = 0.5, ce_weight: float = 0.5):
        super().__init__()
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            squared_pred=True,
            batch=True,
            smooth_nr=1e-5,
            smooth_dr=1e-5,
        )
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        dice = self.dice(logits, labels.unsqueeze(1))
        return self.ce_weight * ce + self.dice_weight * dice
