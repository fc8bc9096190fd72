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

from methods.losses.precision import float32_island


class SupervisedSegmentationLoss(nn.Module):
    """``ignore_index``: pixels with this label (CaDIS: 255) add nothing to either term: cross-entropy skips them and
    the Dice term sees neither their prediction nor their target."""

    def __init__(self, include_background: bool = True, dice_weight: float = 0.5, ce_weight: float = 0.5,
                 ignore_index: int | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            squared_pred=True,
            batch=True,
            smooth_nr=1e-5,
            smooth_dr=1e-5,
        )
        self._masked_dice = DiceLoss(
            include_background=include_background, squared_pred=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
        )
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    @float32_island
    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.ignore_index is None:
            ce = F.cross_entropy(logits, labels)
            dice = self.dice(logits, labels.unsqueeze(1))
            return self.ce_weight * ce + self.dice_weight * dice
        valid = labels != self.ignore_index
        ce = F.cross_entropy(logits, labels, ignore_index=self.ignore_index)
        # Masked Dice: the softmax and the one-hot target are zeroed at ignored pixels (MONAI's MaskedDiceLoss would
        # mask the logits before its softmax, which leaves a uniform distribution there instead of nothing).
        mask = valid.unsqueeze(1).to(logits.dtype)
        probabilities = torch.softmax(logits, dim=1) * mask
        target = F.one_hot(torch.where(valid, labels, 0), logits.shape[1]).movedim(-1, 1).to(logits.dtype) * mask
        dice = self._masked_dice(probabilities, target)
        return self.ce_weight * ce + self.dice_weight * dice
