"""CutMix boxes in any number of spatial dimensions (rectangles in 2-D, cuboids in 3-D) and pasting with them.

The box follows UniMatch's ``obtain_cutmix_box`` (LiheYoung/UniMatch ``dataset/transform.py``, used unchanged by its
medical version): with probability ``probability`` a sample gets one box covering a fraction of the image drawn
from ``U(area_range)``, with aspect ratio drawn from ``U(aspect_range)``; otherwise it gets no box (no mixing).

Generalisation to ``d`` axes: one aspect ratio per axis but the last is drawn, the side fractions are
``area^(1/d) * r_i / geomean(r)`` with ``r = (r_1, ..., r_{d-1}, 1)``, so their product is the area and in 2-D the
two sides are ``sqrt(area * r)`` and ``sqrt(area / r)`` of the image size (UniMatch's, on a square image; on a
non-square image or patch each side is a fraction of its own axis). Upstream redraws the ratio and the corner
until the box fits; here a side longer than its axis is clipped to the axis and the corner is uniform over the
positions where the box fits (no loop, the same box for ratios that fit).

Every draw comes from the ``generator`` passed in (a method's ``step_generator()``), so DDP ranks differ and a
resumed run repeats itself. ``paste`` mixes any tensor laid out as ``(N, *spatial)`` or ``(N, C, *spatial)`` with
the same masks, so an image, its (pseudo) label map and its confidence map are mixed consistently.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

#: UniMatch's defaults: box probability 0.5, area 2-40 % of the image, aspect ratio 0.3 - 1/0.3.
CUTMIX_PROBABILITY = 0.5
CUTMIX_AREA = (0.02, 0.4)
CUTMIX_ASPECT = (0.3, 1 / 0.3)


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)


def cutmix_masks(
    n: int,
    spatial_size: Sequence[int],
    generator: torch.Generator,
    probability: float = CUTMIX_PROBABILITY,
    area_range: tuple[float, float] = CUTMIX_AREA,
    aspect_range: tuple[float, float] = CUTMIX_ASPECT,
) -> torch.Tensor:
    """``(n, *spatial_size)`` boolean masks, True inside each sample's box (all False for samples without one).

    The masks live on ``generator.device``.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"CutMix probability must lie in [0, 1], got {probability}")
    if not 0.0 < area_range[0] <= area_range[1] <= 1.0:
        raise ValueError(f"CutMix area range must satisfy 0 < low <= high <= 1, got {tuple(area_range)}")
    if not 0.0 < aspect_range[0] <= aspect_range[1]:
        raise ValueError(f"CutMix aspect range must satisfy 0 < low <= high, got {tuple(aspect_range)}")
    dims = len(spatial_size)
    device = generator.device
    has_box = torch.rand(n, generator=generator, device=device) < probability
    area = _uniform(*area_range, n, generator)
    log_ratios = torch.zeros(n, dims, dtype=torch.float64, device=device)
    for axis in range(dims - 1):
        log_ratios[:, axis] = torch.log(_uniform(*aspect_range, n, generator))
    log_ratios -= log_ratios.mean(dim=1, keepdim=True)  # product of the per-axis factors = 1
    fractions = area.unsqueeze(1) ** (1.0 / dims) * torch.exp(log_ratios)
    sizes = torch.tensor(list(spatial_size), dtype=torch.float64, device=device)
    sides = (fractions * sizes).round().clamp(min=torch.ones_like(sizes), max=sizes).long()
    free = sizes.long() - sides  # the corner is uniform over 0..free (inclusive)
    starts = (torch.rand(n, dims, generator=generator, device=device, dtype=torch.float64) * (free + 1)).floor().long()

    masks = torch.ones(n, *spatial_size, dtype=torch.bool, device=device)
    for axis, size in enumerate(spatial_size):
        coordinate = torch.arange(size, device=device)
        inside = (coordinate >= starts[:, axis : axis + 1]) & (coordinate < (starts + sides)[:, axis : axis + 1])
        shape = [n] + [1] * dims
        shape[axis + 1] = size
        masks &= inside.view(shape)
    return masks & has_box.view(n, *([1] * dims))


def paste(target: torch.Tensor, source: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``target`` with ``source`` inside the boxes: ``where(mask, source, target)``, one mask per sample.

    ``target`` / ``source`` are ``(N, *spatial)`` (label or confidence maps) or ``(N, C, *spatial)`` (images,
    probabilities): the channel axis is broadcast. Differentiable in both inputs.
    """
    if target.shape != source.shape:
        raise ValueError(f"CutMix target and source differ in shape: {tuple(target.shape)} vs {tuple(source.shape)}")
    spatial = masks.shape[1:]
    if target.shape[0] != masks.shape[0] or tuple(target.shape[-len(spatial):]) != tuple(spatial):
        raise ValueError(f"CutMix masks {tuple(masks.shape)} do not fit tensors of shape {tuple(target.shape)}")
    extra = target.dim() - masks.dim()
    if extra not in (0, 1):
        raise ValueError(f"CutMix pastes (N, *spatial) or (N, C, *spatial) tensors, got {tuple(target.shape)}")
    mask = masks.unsqueeze(1) if extra else masks
    return torch.where(mask, source, target)

