"""The pseudo-labelling pieces (methods/components/pseudo_labels.py) against values computed by hand."""
from __future__ import annotations

import pytest
import torch

from methods.components.pseudo_labels import align_distribution, class_quota_mask, expected_confidence_mask, sharpen


def test_sharpen_by_hand():
    p = torch.tensor([0.0, 0.5, 0.6, 1.0])
    assert torch.allclose(sharpen(p, 0.5), torch.tensor([0.0, 0.5, 9 / 13, 1.0]))  # 0.36 / (0.36 + 0.16)
    assert sharpen(torch.tensor([0.6]), 0.1).item() == pytest.approx(0.6**10 / (0.6**10 + 0.4**10))
    # element-wise, not renormalised over channels (MC-Net's sharpening)
    three = sharpen(torch.tensor([0.2, 0.3, 0.5]), 0.5)
    assert three.sum().item() != pytest.approx(1.0)
    with pytest.raises(ValueError):
        sharpen(p, 0.0)


def test_alignment_raises_a_rare_class_towards_its_labeled_share_by_hand():
    # Two classes, four unlabeled pixels; the model under-predicts the rare class 1 on them.
    rare = torch.tensor([0.4, 0.3, 0.2, 0.1])
    probabilities = torch.stack([1 - rare, rare]).view(1, 2, 4, 1).requires_grad_()
    unlabeled_marginal = torch.tensor([0.75, 0.25])  # mean of p over the 4 pixels
    labeled_marginal = torch.tensor([0.5, 0.5])  # the share of class 1 on labeled data
    aligned = align_distribution(probabilities, labeled_marginal, unlabeled_marginal)
    # ratios: class 1 x 0.5/0.25 = 2, class 0 x 0.5/0.75 = 2/3 -> p~ = 2p / (2p + (2/3)(1-p)) = 3p / (1 + 2p)
    expected = [1.2 / 1.8, 0.9 / 1.6, 0.6 / 1.4, 0.3 / 1.2]
    assert aligned[0, 1, :, 0].tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(aligned.sum(dim=1), torch.ones(1, 4, 1))
    assert not aligned.requires_grad  # the pseudo-label source carries no gradient
    # pseudo-label share of the rare class: 0 of 4 before, 2 of 4 (= its labeled share 0.5) after
    assert (probabilities.argmax(1) == 1).float().mean().item() == 0.0
    assert (aligned.argmax(1) == 1).float().mean().item() == 0.5
    # its mean probability moves from 0.25 towards 0.5
    assert aligned[0, 1].mean().item() == pytest.approx(sum(expected) / 4)  # 0.477


def test_expected_confidence_filter_keeps_pixels_at_or_over_their_class_expectation():
    confidence = torch.tensor([0.9, 0.6, 0.7, 0.5, 0.6, 0.8, 0.55])
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    keep = expected_confidence_mask(confidence, labels, torch.tensor([0.7, 0.6, 0.9]))
    # class 0 (E 0.7): 0.9 yes, 0.6 no; class 1 (E 0.6): 0.7 yes, 0.5 no, 0.6 yes (equal); class 2 (E 0.9): none
    assert keep.tolist() == [True, False, True, False, True, False, False]


def test_class_quota_filter_keeps_the_most_confident_up_to_the_labeled_share():
    # 10 pixels, shares (0.5, 0.3, 0.2, 0.0) -> quotas 5, 3, 2, 0
    confidence = torch.tensor([0.9, 0.2, 0.8, 0.3, 0.7, 0.6, 0.4, 0.5, 0.45, 0.99])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 3])
    keep = class_quota_mask(confidence.view(1, 2, 5), labels.view(1, 2, 5), torch.tensor([0.5, 0.3, 0.2, 0.0]))
    # class 0 has 7 pixels: its 5 most confident (0.9, 0.8, 0.7, 0.6, 0.4) stay, 0.2 and 0.3 go; class 1 has 2
    # (under its quota of 3): both stay; class 3's quota is 0: its pixel goes however confident
    assert keep.flatten().tolist() == [True, False, True, False, True, True, True, True, True, False]
    # ties: exactly the quota
    tied = class_quota_mask(torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long), torch.tensor([0.5, 0.5]))
    assert tied.sum().item() == 2
