"""Mixing of unlabeled samples with their pseudo labels, as ReCo's ``generate_unsup_data`` (used by ACTION), and
UniMatch's CutMix boxes in 2-D and 3-D (``cutmix_box_masks``, used by MCL-CS).

Sample i keeps the region where its mask is 1 and takes the rest from sample (i + 1) mod B; images, pseudo
labels and confidences move together. With one sample per batch every mix is a no-op (sample i is its own
partner), as upstream with batch 1.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

#: The mixes of the unlabeled batch ACTION offers (its ``method.mix``).
MixMode = Literal["cutmix", "classmix", "none"]


def cutmix_keep_masks(shape: tuple[int, ...], generator: torch.Generator, depth: int | None = None, device=None) -> torch.Tensor:
    """(B, *spatial) masks that are 1 except for one box per sample (ReCo ``generate_cutout_mask``): in the
    (H, W) plane a rectangle of area H*W/2, width ~ U{W/2 + 1, ..., W - 1}, height = round(area / width); in 3D
    the box spans ``depth`` slices (all if None) at a random position along the last axis."""
    count, height, width = shape[0], shape[1], shape[2]
    masks = torch.ones(shape, device=device)

    def draw(low: int, high: int) -> int:  # uniform integer in [low, high)
        return int(torch.randint(low, max(high, low + 1), (1,), generator=generator, device=generator.device))

    for index in range(count):
        box_width = draw(width // 2 + 1, width)
        box_height = min(height, round(height * width / 2 / box_width))
        x0, y0 = draw(0, width - box_width + 1), draw(0, height - box_height + 1)
        box = [slice(y0, y0 + box_height), slice(x0, x0 + box_width)]
        if len(shape) == 4:
            slices = shape[3] if depth is None else min(depth, shape[3])
            z0 = draw(0, shape[3] - slices + 1)
            box.append(slice(z0, z0 + slices))
        masks[(index, *box)] = 0
    return masks


def classmix_keep_masks(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, *spatial) masks of the pixels whose pseudo label is one of a random half (rounded down) of the
    classes present in that sample (ReCo ``generate_class_mask``)."""
    masks = []
    for sample in labels:
        classes = torch.unique(sample)
        order = torch.randperm(len(classes), generator=generator, device=generator.device).to(classes.device)
        chosen = classes[order[: len(classes) // 2]]
        masks.append(torch.isin(sample, chosen).float())
    return torch.stack(masks)


def mix_with_next(mask: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor (B, [C,] *spatial) mixed as ``mask * t[i] + (1 - mask) * t[(i + 1) % B]``; integer tensors
    (labels) are selected, not blended."""
    out = []
    for tensor in tensors:
        partner = torch.roll(tensor, shifts=-1, dims=0)
        keep = mask if tensor.dim() == mask.dim() else mask.unsqueeze(1)
        out.append(torch.where(keep.bool(), tensor, partner))
    return out


#: UniMatch's defaults: box probability 0.5, area 2-40 % of the image, aspect ratio 0.3 - 1/0.3.
CUTMIX_PROBABILITY = 0.5
CUTMIX_AREA = (0.02, 0.4)
CUTMIX_ASPECT = (0.3, 1 / 0.3)


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)


def cutmix_box_masks(
    n: int,
    spatial_size: Sequence[int],
    generator: torch.Generator,
    probability: float = CUTMIX_PROBABILITY,
    area_range: tuple[float, float] = CUTMIX_AREA,
    aspect_range: tuple[float, float] = CUTMIX_ASPECT,
) -> torch.Tensor:
    """``(n, *spatial_size)`` boolean masks, True inside each sample's box (all False for samples without one),
    UniMatch's ``obtain_cutmix_box`` in any number of dimensions (LiheYoung/UniMatch ``dataset/transform.py``).

    With probability ``probability`` a sample gets one box covering a share ``U(area_range)`` of the image with
    aspect ratio ``U(aspect_range)``. For ``d`` axes one ratio per axis but the last is drawn and the side
    fractions are ``area^(1/d) r_i / geomean(r)`` with ``r = (r_1, ..., r_{d-1}, 1)`` (product = area; in 2-D the
    sides are ``sqrt(area r)`` and ``sqrt(area / r)``, UniMatch's on a square image). Upstream redraws until the box
    fits; here a side longer than its axis is clipped and the corner is uniform over the fitting positions.
    Draws from ``generator``; the masks live on ``generator.device``. Mix with ``mix_with_next(~masks, ...)``:
    the box shows the next sample.
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
