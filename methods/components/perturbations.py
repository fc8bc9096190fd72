"""Batched, dimension-agnostic perturbations of images (noise) and features (channel dropout), drawn from an
explicit generator.

Each function perturbs every sample of an ``(N, C, *spatial)`` batch with its own random draw and takes the
``generator`` to draw from (a method's ``step_generator()``: different on every DDP rank, repeated on resume).
They run on the batch's device inside ``training_step``, so a method can build strong views of images it already
has (UniMatch / FixMatch style) without touching the data pipeline.

* ``gaussian_noise``: ``x + clamp(s * eps, -clamp, clamp)`` with ``s ~ U(0, max_std)`` per sample (the mean-teacher
  noise of SSL4MIS has a fixed s = 0.1, clamp 0.2).
* intensity jitter and blur: :mod:`methods.components.photometric`.
* ``channel_dropout``: UniMatch's feature perturbation, ``Dropout2d(0.5)`` on each encoder feature: whole
  channels of each sample are zeroed with probability ``p`` and the rest scaled by ``1 / (1 - p)``; the same
  for 3-D maps (``Dropout3d``).
"""
from __future__ import annotations

import torch


def _per_sample_uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(N,)`` values shaped to broadcast over an ``(N, ...)`` tensor."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def gaussian_noise(images: torch.Tensor, generator: torch.Generator, max_std: float = 0.1, clamp: float = 0.2) -> torch.Tensor:
    std = _per_sample(_per_sample_uniform(images.shape[0], 0.0, max_std, generator), images)
    noise = torch.randn(images.shape, generator=generator, device=generator.device, dtype=images.dtype)
    return images + (noise * std).clamp(-clamp, clamp)


def channel_dropout(features: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"channel dropout probability must lie in [0, 1), got {p}")
    keep_shape = (*features.shape[:2], *([1] * (features.dim() - 2)))
    keep = torch.rand(keep_shape, generator=generator, device=generator.device) >= p
    return features * keep.to(features.dtype) / (1.0 - p)
