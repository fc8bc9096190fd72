"""A representation head (k x k conv without bias, then 1x1 conv) on the hypercolumn of decoder maps upsampled to
full resolution (align_corners), evaluated at chosen pixels only, with gradient.

ReCo / ACTION apply such a head to every pixel, but their loss takes gradients only at a few hundred sampled query
pixels (prototypes and negative keys are read without gradient). ``at(pixels)`` interpolates each pixel's k^d
neighbourhood of the hypercolumn from the low-resolution maps directly (zero outside the image, as the conv's
padding) and applies the head as a linear map: the same values as the dense head up to float order, and backward
touches only those neighbourhoods instead of the full-resolution hypercolumn and conv.

``dense()`` gives the head at every pixel without gradient (the keys) without building the hypercolumn: the head has
no non-linearity, so it splits into one linear map per decoder map. Upsampling (per axis an interpolation matrix)
commutes with mixing channels, so a coarse map is first projected to the head's R channels per kernel offset at its
own resolution and then interpolated with the kernel's shifts folded into the per-axis matrices: for the 8x8
bottleneck of 128 channels under a 3x3 head that is tens of times fewer multiplications than upsampling it and
convolving.
Maps where that does not pay (the full-resolution one) take the plain upsample-and-convolve path.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.losses.precision import float32_island


class HypercolumnHead:
    def __init__(self, levels: Sequence[torch.Tensor], size: Sequence[int], head: nn.Sequential):
        first, second = head[0], head[1]
        radius = first.kernel_size[0] // 2
        if (first.bias is not None or len(set(first.kernel_size)) != 1 or first.kernel_size[0] % 2 == 0
                or set(first.padding) != {radius} or set(first.stride) != {1} or set(second.kernel_size) != {1}):
            raise ValueError("HypercolumnHead needs a same-padded odd-kernel conv without bias followed by a 1x1 conv")
        self.levels, self.size = list(levels), tuple(int(s) for s in size)
        self.dims = len(self.size)
        self.radius = radius
        self.first_weight = first.weight  # (R, C, k, ...)
        self.second_weight = second.weight.flatten(1)  # (R, R)
        self.second_bias = second.bias

    # ---- every pixel, without gradient ----------------------------------------------------------------------
    @torch.no_grad()
    def dense(self) -> torch.Tensor:
        """(B, R, *size) head outputs at every pixel, without gradient, laid out channels-last (so the caller's
        per-pixel view needs no copy)."""
        return _dense_head(self.levels, self.size, self.first_weight, self.second_weight, self.second_bias, self.radius)

    # ---- at chosen pixels, with gradient ---------------------------------------------------------------------
    def at(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, R) head outputs at flat pixel indices into (B, *size)."""
        spatial = math.prod(self.size)
        batch_index = torch.div(pixels, spatial, rounding_mode="floor")
        coords = torch.stack(torch.unravel_index(pixels % spatial, self.size), dim=1)  # (n, d)
        columns = [self._neighbourhood(level, batch_index, coords) for level in self.levels]  # (n, K, C_l) each
        # Under mixed precision the decoder maps are half precision; the head (and its caller's loss) runs in the
        # weights' dtype.
        patches = torch.cat(columns, dim=2).to(self.first_weight.dtype)
        hidden = torch.einsum("nkc,rck->nr", patches, self.first_weight.flatten(2))
        return hidden @ self.second_weight.T + self.second_bias

    def _neighbourhood(self, level: torch.Tensor, batch_index: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """(n, K, C): F.interpolate(level, size, align_corners=True) read at the k^d kernel neighbourhood of each
        full-resolution pixel ``coords`` (n, d), zero outside the image (the conv's padding). Per axis, the 2r+1
        shifted positions interpolate from at most ceil(2r scale) + 2 consecutive low-resolution pixels, so one
        small window per pixel is gathered (16 rows in 2-D at r = 1, where the interpolation's corners of every
        offset would be 36) and mixed by one (2r+1, width) interpolation matrix per axis. One gather per level, so
        backward allocates the level's gradient once."""
        low, dims, kernel = level.shape[2:], self.dims, 2 * self.radius + 1
        # Interpolation weights in at least float32: bfloat16 cannot even hold a 128-pixel coordinate's fraction.
        dtype = torch.promote_types(level.dtype, torch.float32)
        starts, widths, mixing = [], [], []
        for axis in range(dims):
            full, small = self.size[axis], low[axis]
            scale = (small - 1) / (full - 1) if full > 1 else 0.0
            width = min(small, math.ceil(2 * self.radius * scale) + 2)
            # the first offset's lower corner is the window's first column, computed as interpolation_matrix does
            first = (coords[:, axis] - self.radius).clamp(0, full - 1).to(torch.float64) * scale
            start = first.floor().long().clamp(0, small - width)
            # (full, k, low): row X, offset i = the interpolated axis read at X + i - radius, zero outside
            shifted = _axis_matrix(full, small, self.radius, dtype, coords.device).view(full, small, kernel).transpose(1, 2)
            columns = (start.view(-1, 1, 1) + torch.arange(width, device=coords.device)).expand(-1, kernel, -1)
            mixing.append(shifted.index_select(0, coords[:, axis]).gather(2, columns))  # (n, k, width)
            starts.append(start)
            widths.append(width)
        strides = [math.prod(low[axis + 1:]) for axis in range(dims)]
        index = batch_index * math.prod(low)
        for axis in range(dims):  # flat row of every window pixel: (n, w_1, ..., w_d)
            span = (starts[axis].unsqueeze(1) + torch.arange(widths[axis], device=coords.device)) * strides[axis]
            index = index.unsqueeze(-1) + span.view(-1, *([1] * axis), widths[axis])
        rows = level.movedim(1, -1).reshape(-1, level.shape[1])  # (B P, C): a view of a channels-last map
        # index_select: its backward is one index_add into the map's gradient
        window = rows.index_select(0, index.reshape(-1)).view(*index.shape, -1).to(dtype)  # (n, w_1..w_d, C)
        window_axes, offset_axes = "abc"[:dims], "ijk"[:dims]
        for axis in reversed(range(dims)):  # window axis -> kernel offset axis, the last first
            before = window_axes[:axis + 1] + offset_axes[axis + 1:]
            after = window_axes[:axis] + offset_axes[axis:]
            window = torch.einsum(f"n{offset_axes[axis]}{window_axes[axis]},n{before}y->n{after}y", mixing[axis], window)
        return window.reshape(window.shape[0], kernel ** dims, -1)


#: Largest intermediate of the separable part per call, in bytes (see _dense_head).
SEPARABLE_CHUNK_BYTES = 16 << 20


def interpolation_matrix(full: int, low: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(full, low): linear interpolation with align_corners (F.interpolate's sampling positions) along one axis."""
    scale = (low - 1) / (full - 1) if full > 1 else 0.0
    source = torch.arange(full, dtype=torch.float64, device=device) * scale
    lower = source.floor().long().clamp(0, low - 1)
    upper = (lower + 1).clamp(max=low - 1)
    fraction = source - lower.to(torch.float64)
    matrix = torch.zeros(full, low, dtype=torch.float64, device=device)
    rows = torch.arange(full, device=device)
    matrix.index_put_((rows, lower), 1 - fraction, accumulate=True)
    matrix.index_put_((rows, upper), fraction, accumulate=True)
    return matrix.to(dtype)


def shifted_interpolation(full: int, low: int, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(full, k, low): row X, offset i reads the interpolated axis at X + i - radius, zero outside (the conv's
    zero padding)."""
    base = interpolation_matrix(full, low, dtype, device)
    padded = F.pad(base, (0, 0, radius, radius))
    return torch.stack([padded[i:i + full] for i in range(2 * radius + 1)], dim=1)


@functools.lru_cache(maxsize=64)
def _axis_matrix(full: int, low: int, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(full, low k): :func:`shifted_interpolation` with its columns ordered (low, offset), as the projected map's
    axes are. Depends on the shapes only, so it is built once per shape rather than on every training step (read
    only by its callers)."""
    return shifted_interpolation(full, low, radius, dtype, device).transpose(1, 2).reshape(full, low * (2 * radius + 1))


@float32_island
def _dense_head(levels, size, first_weight, second_weight, second_bias, radius) -> torch.Tensor:
    kernel = 2 * radius + 1
    weight = torch.einsum("rs,sc...->rc...", second_weight, first_weight)  # no non-linearity: fold the 1x1 conv in
    out_channels = weight.shape[0]
    direct, separable, start = [], [], 0
    for level in levels:
        channels, low = level.shape[1], tuple(level.shape[2:])
        part = (level, weight[:, start:start + channels])
        start += channels
        cheaper = _separable_cost(channels, low, size, out_channels, kernel) < _direct_cost(channels, low, size, out_channels, kernel)
        (separable if cheaper else direct).append(part)
    # (B, *size, R) contiguous, which the separable parts add into as matrix products
    if direct:  # the maps at or near full resolution: upsampled and convolved together, bias included
        mode = "bilinear" if len(size) == 2 else "trilinear"
        upsampled = [level if tuple(level.shape[2:]) == tuple(size) else F.interpolate(level, size=size, mode=mode, align_corners=True)
                     for level, _ in direct]
        conv = F.conv2d if len(size) == 2 else F.conv3d
        # channels-last operands: oneDNN's convolution is faster on them than on channels-first, and its output is
        # then already the (B, *size, R) layout the separable parts add into
        layout = torch.channels_last if len(size) == 2 else torch.channels_last_3d
        total = conv(torch.cat(upsampled, dim=1).contiguous(memory_format=layout),
                     torch.cat([w for _, w in direct], dim=1).contiguous(memory_format=layout), second_bias, padding=radius)
        total = total.movedim(1, -1).contiguous()  # a view when the convolution kept the channels-last layout
    else:
        total = second_bias.expand(levels[0].shape[0], *size, out_channels).clone()
    for level, level_weight in separable:
        # a few samples at a time: intermediates above glibc's largest mmap threshold (32 MB) are page-faulted in
        # afresh on every call (a fifth of this part's time here), smaller ones come from the heap
        per_sample = _largest_intermediate(level.shape[2:], size, out_channels, kernel) * total.element_size()
        step = max(1, SEPARABLE_CHUNK_BYTES // per_sample)
        for start in range(0, level.shape[0], step):
            _add_separable_part(total[start:start + step], level[start:start + step], level_weight, size, radius)
    return total.movedim(-1, 1)


def _direct_cost(channels, low, size, out_channels, kernel) -> float:
    """Multiplications per sample of upsampling a map and convolving it."""
    return math.prod(size) * channels * (out_channels * kernel ** len(size) + (4 if tuple(low) != tuple(size) else 0))


def _separable_cost(channels, low, size, out_channels, kernel) -> float:
    """Multiplications per sample of projecting a map and interpolating it, every axis counted as a dense matrix
    product (the band taken for the last one only makes it cheaper)."""
    dims = len(size)
    cost = out_channels * kernel ** dims * channels * math.prod(low)  # the projection at low resolution
    for axis in reversed(range(dims)):  # axis a: (offset, low) -> full, with the axes after it already full
        cost += (out_channels * math.prod(kernel * low[b] for b in range(axis + 1)) * size[axis]
                 * math.prod(size[axis + 1:]))
    return cost


def _largest_intermediate(low, size, out_channels, kernel) -> int:
    """Elements per sample of the largest tensor _add_separable_part allocates: the projected map, or the map after
    one of its axes other than the first has been interpolated."""
    dims = len(size)
    sizes = [out_channels * kernel ** dims * math.prod(low)]
    sizes += [out_channels * math.prod(kernel * low[b] for b in range(axis)) * math.prod(size[axis:]) for axis in range(1, dims)]
    return max(sizes)


def _add_separable_part(total, level, weight, size, radius) -> None:
    """total (B, *size, R) += sum over offsets and low-resolution pixels of interp[X + offset, x] (W_offset level)[x],
    one axis at a time (last first), each a few matrix products over contiguous memory."""
    dims, batch, out_channels = len(size), level.shape[0], weight.shape[0]
    low, kernel = level.shape[2:], weight.shape[2]
    # (B, *low, *offsets, R), then interleaved to (B, low_1, k, ..., low_d, k, R)
    projected = (level.movedim(1, -1).reshape(-1, level.shape[1]) @ weight.movedim(0, -1).reshape(level.shape[1], -1))
    projected = projected.view(batch, *low, *([kernel] * dims), out_channels)
    order = [0] + [index for axis in range(dims) for index in (1 + axis, 1 + dims + axis)] + [1 + 2 * dims]
    current = projected.permute(order).contiguous()
    for axis in reversed(range(dims)):
        matrix = _axis_matrix(size[axis], low[axis], radius, current.dtype, current.device)
        outer = batch * math.prod(kernel * low[b] for b in range(axis))
        operand = current.reshape(outer, low[axis] * kernel, -1)
        if axis == 0:  # the largest product, into the output: only the band of the matrix
            _add_banded_product(matrix, operand, total.view(batch, size[0], -1))
        else:
            current = torch.matmul(matrix, operand)


def _add_banded_product(matrix: torch.Tensor, operand: torch.Tensor, result: torch.Tensor, block: int = 16) -> None:
    """result[:, rows] += matrix[rows] @ operand for blocks of rows, each over only the columns its rows touch (an
    interpolation matrix with the kernel's shifts is banded: ~2k non-zeros per row)."""
    touched = matrix != 0
    for start in range(0, matrix.shape[0], block):
        columns = torch.nonzero(touched[start:start + block].any(0)).squeeze(1)
        first, last = int(columns[0]), int(columns[-1]) + 1
        part = matrix[start:start + block, first:last]
        result[:, start:start + block].baddbmm_(part.expand(operand.shape[0], -1, -1), operand[:, first:last])
