"""Strong image-space augmentation of a training batch on tensors, with explicit randomness.

``StrongAugmentation`` is MMS's view of the unlabeled image (official data.py, docs/methods.md#mms): random rotation
(90 degrees), vertical and horizontal flips, an affine map (90 degrees, translation 0.5, shear 30), colour jitter
(hue 0.5), random grayscale (p 0.2) and a 3x3 Gaussian blur (sigma in [0.1, 2], torchvision's default), then
GridMask on the normalised image. The geometric and colour transforms are kornia's (batched, differentiable,
torchvision's parameter conventions); kornia has no GridMask, so it is implemented here.

Images arrive as the DataModule gives them (normalised with ``DatasetSpec.image_normalization`` if it has one):
they are mapped back to [0, 1] for the colour transforms and normalised again before GridMask, as upstream
applies ToTensor + Normalize before GridMask. Colour transforms need RGB and are skipped for 1-channel images.

Randomness: kornia draws from torch's global generator, so the draws happen inside ``torch.random.fork_rng`` seeded
from the caller's per-step generator (one seed per (seed, rank, step)): reproducible, different on every DDP rank,
and without disturbing the global stream.
"""
from __future__ import annotations

import math
from typing import Sequence

import kornia.augmentation as K
import torch
from torch import nn

# GridMask as MMS uses it (GridMask(d1=20, d2=80, rotate=90, ratio=0.4, mode=1, prob=0.8)) on 512x288 images; the
# period range is scaled with the image's shorter side relative to 288, so smaller crops get the same pattern.
GRIDMASK_REFERENCE_SIDE = 288
GRIDMASK_PERIOD = (20, 80)  # d drawn from [20, 80) pixels at the reference size
GRIDMASK_RATIO = 0.4  # stripe width l = ceil(0.4 d)
GRIDMASK_MAX_ROTATION = 90  # degrees, drawn from [0, 90)


def grid_mask(
    images: torch.Tensor,
    generator: torch.Generator,
    probability: float = 0.8,
    period: Sequence[int] = GRIDMASK_PERIOD,
    ratio: float = GRIDMASK_RATIO,
    max_rotation: int = GRIDMASK_MAX_ROTATION,
    reference_side: int = GRIDMASK_REFERENCE_SIDE,
) -> torch.Tensor:
    """GridMask (Chen et al. 2020) in MMS's ``mode=1``: per image with ``probability``, a grid of stripes of width
    l = ceil(ratio d) every d pixels (random offsets, rotated by a random angle) is KEPT and the (d - l)^2 squares
    between the stripes are set to 0 (about 36 % of the pixels at ratio 0.4). Returns a new tensor."""
    batch, _, height, width = images.shape
    scale = min(height, width) / reference_side
    low = max(2, round(period[0] * scale))
    high = max(low + 1, round(period[1] * scale))
    rows = torch.arange(height, dtype=torch.float32) - (height - 1) / 2
    cols = torch.arange(width, dtype=torch.float32) - (width - 1) / 2
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    canvas_half = math.ceil(math.sqrt(height**2 + width**2)) / 2  # upstream draws the grid on a square canvas

    def draw(upper: int) -> int:
        return int(torch.randint(0, upper, (1,), generator=generator))

    masks = torch.ones(batch, 1, height, width)
    for index in range(batch):
        if float(torch.rand((1,), generator=generator)) >= probability:
            continue
        d = low + draw(high - low)
        stripe = math.ceil(d * ratio)
        start_row, start_col = draw(d), draw(d)
        angle = math.radians(draw(max_rotation))
        # Canvas coordinates of each output pixel (the grid rotated about the image centre).
        canvas_rows = math.cos(angle) * grid_rows - math.sin(angle) * grid_cols + canvas_half
        canvas_cols = math.sin(angle) * grid_rows + math.cos(angle) * grid_cols + canvas_half
        on_stripe = (torch.remainder(torch.floor(canvas_rows) - start_row, d) < stripe) | (
            torch.remainder(torch.floor(canvas_cols) - start_col, d) < stripe
        )
        masks[index, 0] = on_stripe.float()
    return images * masks.to(images.device, images.dtype)


class StrongAugmentation(nn.Module):
    def __init__(
        self,
        in_channels: int,
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        gridmask_probability: float = 0.8,
    ):
        super().__init__()
        geometric = [
            K.RandomRotation(90.0, resample="nearest", p=1.0),
            K.RandomVerticalFlip(p=0.5),
            K.RandomHorizontalFlip(p=0.5),
            K.RandomAffine(degrees=90.0, translate=(0.5, 0.5), shear=30.0, resample="nearest", p=1.0),
        ]
        colour = [K.ColorJitter(hue=0.5, p=1.0), K.RandomGrayscale(p=0.2)] if in_channels == 3 else []
        self.transforms = K.AugmentationSequential(
            *geometric, *colour, K.RandomGaussianBlur((3, 3), (0.1, 2.0), p=1.0)
        )
        self.gridmask_probability = gridmask_probability
        if normalization is None:
            self.register_buffer("mean", None)
            self.register_buffer("std", None)
        else:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalization)
            self.register_buffer("mean", mean, persistent=False)
            self.register_buffer("std", std, persistent=False)

    def to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.mean is None else images * self.std + self.mean

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.mean is None else (images - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``generator`` is a CPU generator (its draws seed kornia and GridMask)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            augmented = self.transforms(self.to_unit_range(images))
        return grid_mask(self.normalize(augmented), generator, self.gridmask_probability)
