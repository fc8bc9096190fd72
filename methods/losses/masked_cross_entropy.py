"""Cross-entropy to hard pseudo-labels on the kept pixels only, with the two normalisers the methods use.

Both sum the per-pixel CE over the kept pixels (``keep`` true); they differ in what they divide that sum by:

* :func:`cross_entropy_mean_over_kept` divides by the number of KEPT pixels (Co-DA's over-expectation CE,
  ``sum M CE / sum M``): the loss stays a per-pixel mean however few pixels pass the filter, so its scale does
  not fall as the filter tightens;
* :func:`cross_entropy_mean_over_all` divides by ALL pixels (UniMatch's normalisation, MCL-CS): a pixel that is
  not kept counts as a zero, so the loss shrinks with the kept fraction and a step with few confident pixels
  weighs little.

With every pixel kept both equal the plain mean CE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.losses.precision import float32_island


@float32_island
def cross_entropy_mean_over_kept(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``sum_i keep_i CE_i / sum_i keep_i``; zero, with gradient, when nothing is kept."""
    per_pixel = F.cross_entropy(logits, targets, reduction="none")
    weights = keep.to(per_pixel.dtype)
    return (per_pixel * weights).sum() / weights.sum().clamp_min(1.0)


@float32_island
def cross_entropy_mean_over_all(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``sum_i keep_i CE_i / N`` with N every pixel of the batch, kept or not."""
    per_pixel = F.cross_entropy(logits, targets, reduction="none")
    return (per_pixel * keep.to(per_pixel.dtype)).sum() / per_pixel.numel()
