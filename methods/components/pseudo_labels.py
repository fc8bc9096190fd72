"""Pieces that turn predictions into pseudo-labels, each an idea of its own that methods combine (as USB's hooks):

* :func:`sharpen`: soft pseudo-labels sharpened by a temperature (MC-Net's element-wise form; MC-Net+ and
  FBA-Net+ through the mutual-consistency loss);
* :func:`align_distribution`: ReMixMatch's distribution alignment of the pseudo-label source, ``p * pi_L / pi_U``
  renormalised (Co-DA);
* which pixels to keep, class-adaptive masks on the confidence of hard pseudo-labels (Co-DA's over-expectation
  filter in its two readings): :func:`expected_confidence_mask` (a per-class threshold, the class's expected
  confidence) and :func:`class_quota_mask` (per class the most confident pixels up to a share, DARS-style).

A fixed confidence threshold is one comparison (``confidence >= threshold``) and stays in the methods' code.
"""
from __future__ import annotations

import torch

from methods.losses.precision import float32_island

_EPS = 1e-8


@float32_island
def sharpen(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Element-wise sharpening ``p^(1/T) / (p^(1/T) + (1-p)^(1/T))`` (MC-Net's ``sharpening``, T=0.1 upstream)."""
    if temperature <= 0:
        raise ValueError(f"sharpening temperature must be > 0, got {temperature}")
    power = 1.0 / temperature
    high = probabilities.pow(power)
    low = (1.0 - probabilities).pow(power)
    return high / (high + low)


@float32_island
@torch.no_grad()
def align_distribution(probabilities: torch.Tensor, labeled_marginal: torch.Tensor,
                       unlabeled_marginal: torch.Tensor) -> torch.Tensor:
    """``p * pi_L / pi_U`` per class (channel dim 1), renormalised over the classes per pixel; no gradient."""
    shape = (1, -1) + (1,) * (probabilities.dim() - 2)
    ratio = (labeled_marginal / unlabeled_marginal.clamp_min(_EPS)).view(shape)
    aligned = probabilities.detach() * ratio
    return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(_EPS)


def expected_confidence_mask(confidence: torch.Tensor, pseudo_labels: torch.Tensor,
                             expectation: torch.Tensor) -> torch.Tensor:
    """Keep a pixel iff its confidence is at least the expected confidence of its pseudo-label's class."""
    return confidence >= expectation[pseudo_labels]


def class_quota_mask(confidence: torch.Tensor, pseudo_labels: torch.Tensor, class_shares: torch.Tensor) -> torch.Tensor:
    """Keep, per class c, the ``round(class_shares[c] * N)`` most confident of the pixels labeled c (N = all
    pixels given; every pixel of c if there are fewer). Exactly that many even when confidences tie."""
    flat_confidence, flat_labels = confidence.reshape(-1), pseudo_labels.reshape(-1)
    quotas = torch.round(class_shares.detach().double() * flat_confidence.numel()).long().tolist()
    keep = torch.zeros_like(flat_labels, dtype=torch.bool)
    for label, quota in enumerate(quotas):
        members = torch.nonzero(flat_labels == label).squeeze(1)
        count = min(quota, members.numel())
        if count > 0:
            keep[members[flat_confidence[members].topk(count).indices]] = True
    return keep.view_as(pseudo_labels)
