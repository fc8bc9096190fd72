"""Mixing of unlabeled samples with their pseudo labels, as ReCo's ``generate_unsup_data`` (used by ACTION).

Sample i keeps the region where its mask is 1 and takes the rest from sample (i + 1) mod B; images, pseudo
labels and confidences move together. With one sample per batch every mix is a no-op (sample i is its own
partner), as upstream with batch 1.
"""
from __future__ import annotations

import torch

MIX_MODES = ("cutmix", "classmix", "none")


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
