"""The shared supervised loss against SSL4MIS's formula, computed by hand; ramp-ups against their definition."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.components.ramps import linear_rampup, sigmoid_rampup
from methods.losses import SupervisedSegmentationLoss


def ssl4mis_dice_loss(probabilities, labels, num_classes, classes):
    """SSL4MIS utils/losses.DiceLoss: per class 1 - (2 sum(p t) + s) / (sum(p^2) + sum(t^2) + s), averaged."""
    smooth = 1e-5
    losses = []
    for c in classes:
        p, t = probabilities[:, c], (labels == c).float()
        losses.append(1 - (2 * (p * t).sum() + smooth) / ((p * p).sum() + (t * t).sum() + smooth))
    return sum(losses) / len(losses)


def test_supervised_loss_matches_ssl4mis_on_a_tiny_example():
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [1.0, 0.0]]]])  # (1, 2, 2, 2)
    labels = torch.tensor([[[0, 1], [1, 1]]])
    # Hand computation of the CE: -log softmax at the true class, averaged over the 4 pixels.
    p = torch.softmax(logits, 1)
    ce_by_hand = -(math.log(p[0, 0, 0, 0]) + math.log(p[0, 1, 0, 1]) + math.log(p[0, 1, 1, 0]) + math.log(p[0, 1, 1, 1])) / 4
    dice_by_hand = ssl4mis_dice_loss(p, labels, 2, [0, 1])
    loss = SupervisedSegmentationLoss(include_background=True)(logits, labels)
    assert loss.item() == pytest.approx(0.5 * ce_by_hand + 0.5 * dice_by_hand.item(), abs=1e-6)


@pytest.mark.parametrize("include_background", [True, False])
def test_supervised_loss_matches_ssl4mis_on_random_3d_batches(include_background):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, 3, requires_grad=True)
    labels = torch.randint(0, 3, (2, 5, 4, 3))
    probabilities = torch.softmax(logits, 1)
    classes = [0, 1, 2] if include_background else [1, 2]
    expected = 0.5 * F.cross_entropy(logits, labels) + 0.5 * ssl4mis_dice_loss(probabilities, labels, 3, classes)
    got = SupervisedSegmentationLoss(include_background=include_background)(logits, labels)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    got.backward()
    assert logits.grad.abs().sum() > 0


def test_rampups():
    assert sigmoid_rampup(0, 40) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(20, 40) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(400, 40) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    assert linear_rampup(5, 10) == 0.5 and linear_rampup(50, 10) == 1.0
