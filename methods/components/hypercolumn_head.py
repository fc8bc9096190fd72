"""A representation head (k x k conv without bias, then 1x1 conv) on the hypercolumn of decoder maps upsampled to
full resolution (align_corners), evaluated at chosen pixels only, with gradient.

ReCo / ACTION apply such a head to every pixel, but their loss takes gradients only at a few hundred sampled query
pixels (prototypes and negative keys are read without gradient). ``at(pixels)`` interpolates each pixel's k^d
neighbourhood of the hypercolumn from the low-resolution maps directly (zero outside the image, as the conv's
padding) and applies the head as a linear map: the same values as the dense head up to float order, and backward
touches only those neighbourhoods instead of the full-resolution hypercolumn and conv.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn


class HypercolumnHead:
    def __init__(self, levels: Sequence[torch.Tensor], size: Sequence[int], head: nn.Sequential):
        first, second = head[0], head[1]
        radius = first.kernel_size[0] // 2
        if (first.bias is not None or len(set(first.kernel_size)) != 1 or first.kernel_size[0] % 2 == 0
                or set(first.padding) != {radius} or set(first.stride) != {1} or set(second.kernel_size) != {1}):
            raise ValueError("HypercolumnHead needs a same-padded odd-kernel conv without bias followed by a 1x1 conv")
        self.levels, self.size = list(levels), tuple(int(s) for s in size)
        self.dims = len(self.size)
        self.first_weight = first.weight  # (R, C, k, ...)
        self.second_weight = second.weight.flatten(1)  # (R, R)
        self.second_bias = second.bias
        # kernel order: row-major over the kernel, offset = kernel index - radius (the conv is a cross-correlation)
        self.offsets = list(itertools.product(range(-radius, radius + 1), repeat=self.dims))

    # ---- at chosen pixels, with gradient ---------------------------------------------------------------------
    def at(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, R) head outputs at flat pixel indices into (B, *size)."""
        spatial = math.prod(self.size)
        batch_index = torch.div(pixels, spatial, rounding_mode="floor")
        coords = torch.stack(torch.unravel_index(pixels % spatial, self.size), dim=1)  # (n, d)
        offsets = torch.tensor(self.offsets, device=coords.device)  # (K, d)
        shifted = coords.unsqueeze(1) + offsets  # (n, K, d)
        inside = ((shifted >= 0) & (shifted < torch.tensor(self.size, device=coords.device))).all(-1)  # (n, K)
        columns = [self._interpolate_at(level, batch_index, shifted) for level in self.levels]  # (n, K, C_l) each
        # Under mixed precision the decoder maps are half precision; the head (and its caller's loss) runs in the
        # weights' dtype.
        patches = torch.cat(columns, dim=2).to(self.first_weight.dtype) * inside.unsqueeze(2).to(self.first_weight.dtype)
        hidden = torch.einsum("nkc,rck->nr", patches, self.first_weight.flatten(2))
        return hidden @ self.second_weight.T + self.second_bias

    def _interpolate_at(self, level: torch.Tensor, batch_index: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """F.interpolate(level, size, align_corners=True) read at integer full-resolution ``coords`` (n, K, d):
        (n, K, C); coordinates outside the image are clamped (the caller zeroes them). One gather per level, so
        backward allocates the level's gradient once."""
        low = level.shape[2:]
        # Sub-pixel positions in at least float32: bfloat16 cannot even hold a 128-pixel coordinate's fraction.
        dtype = torch.promote_types(level.dtype, torch.float32)
        corners_low, corners_high, fractions, strides = [], [], [], []
        stride = 1
        for axis in reversed(range(self.dims)):
            strides.insert(0, stride)
            stride *= low[axis]
        for axis in range(self.dims):
            full, small = self.size[axis], low[axis]
            scale = (small - 1) / (full - 1) if full > 1 else 0.0
            source = coords[..., axis].clamp(0, full - 1).to(dtype) * scale
            lower = source.floor().long().clamp(0, small - 1)
            corners_low.append(lower)
            corners_high.append((lower + 1).clamp(max=small - 1))
            fractions.append(source - lower.to(dtype))
        corners = list(itertools.product((0, 1), repeat=self.dims))
        index = torch.stack([sum((corners_high[a] if corner[a] else corners_low[a]) * strides[a] for a in range(self.dims))
                             for corner in corners], dim=-1)  # (n, K, 2^d)
        weight = torch.stack([math.prod(fractions[a] if corner[a] else 1 - fractions[a] for a in range(self.dims))
                              for corner in corners], dim=-1)  # (n, K, 2^d)
        flat = level.flatten(2).transpose(1, 2)  # (B, P, C)
        values = flat[batch_index.view(-1, 1, 1), index]  # (n, K, 2^d, C)
        return (weight.unsqueeze(-1) * values).sum(2)
