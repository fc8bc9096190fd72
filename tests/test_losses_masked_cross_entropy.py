"""The two pseudo-label cross-entropies (methods/losses/masked_cross_entropy.py) against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from methods.losses.masked_cross_entropy import cross_entropy_mean_over_all, cross_entropy_mean_over_kept


def test_mean_over_kept_divides_by_the_kept_pixels_by_hand():
    log3 = math.log(3.0)
    logits = torch.tensor([[[log3, 0.0, 0.0]], [[0.0, 0.0, log3]]]).unsqueeze(0).requires_grad_()  # (1, 2, 1, 3)
    targets = torch.tensor([[[0, 0, 1]]])
    # pixel CE: log(4/3), log 2, log(4/3); mask keeps pixels 0 and 1
    mask = torch.tensor([[[True, True, False]]])
    loss = cross_entropy_mean_over_kept(logits, targets, mask)
    assert loss.item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2, rel=1e-6)
    empty = cross_entropy_mean_over_kept(logits, targets, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()  # nothing kept: a zero loss that still back-propagates (zero gradient)
    assert logits.grad.abs().sum().item() == 0.0


def test_mean_over_all_divides_by_every_pixel_by_hand():
    log3 = math.log(3.0)
    # two pixels: logits [log 3, 0] -> p = (3/4, 1/4); [0, 0] -> (1/2, 1/2); pseudo-labels 0 and 1
    logits = torch.tensor([[[[log3, 0.0]], [[0.0, 0.0]]]])
    pseudo = torch.tensor([[[0, 1]]])
    everything = cross_entropy_mean_over_all(logits, pseudo, torch.tensor([[[True, True]]]))
    assert everything.item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)
    confident_only = cross_entropy_mean_over_all(logits, pseudo, torch.tensor([[[True, False]]]))
    assert confident_only.item() == pytest.approx(math.log(4 / 3) / 2)  # / 2 pixels, not / 1 kept
