"""Batched, dimension-agnostic perturbations of images and features, drawn from an explicit generator.

Each function perturbs every sample of an ``(N, C, *spatial)`` batch with its own random draw and takes the
``generator`` to draw from (a method's ``step_generator()``: different on every DDP rank, repeated on resume).
They run on the batch's device inside ``training_step``, so a method can build strong views of images it already
has (UniMatch / FixMatch style) without touching the data pipeline.

* ``gaussian_noise``: ``x + clamp(s * eps, -clamp, clamp)`` with ``s ~ U(0, max_std)`` per sample (the mean-teacher
  noise of SSL4MIS has a fixed s = 0.1, clamp 0.2).
* ``intensity_jitter``: with probability ``probability`` per sample, brightness ``x * b`` then contrast
  ``(x - mean) * c + mean`` with ``b ~ U(1 - brightness, 1 + brightness)``, ``c ~ U(1 - contrast, 1 + contrast)``,
  the mean over the sample's voxels: torchvision's ``ColorJitter`` brightness/contrast on a one-channel image
  (UniMatch's medical strong view uses ColorJitter(0.5, 0.5, 0.5, 0.25); saturation and hue do nothing to a
  gray image), without the clamp to [0, 1] since the suite's images may be z-scored.
* ``gaussian_blur``: with probability ``probability`` per sample, a Gaussian of ``sigma ~ U(sigma_range)`` voxels
  along every spatial axis (MONAI's separable kernel, replicate padding). UniMatch blurs with PIL radius
  U(0.1, 2.0) with probability 0.5.
* ``channel_dropout``: UniMatch's feature perturbation, ``Dropout2d(0.5)`` on each encoder feature: whole
  channels of each sample are zeroed with probability ``p`` and the rest scaled by ``1 / (1 - p)``; the same
  for 3-D maps (``Dropout3d``).
"""
from __future__ import annotations

import torch
from monai.networks.layers.simplelayers import gaussian_1d, separable_filtering


def _per_sample_uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(N,)`` values shaped to broadcast over an ``(N, ...)`` tensor."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def gaussian_noise(images: torch.Tensor, generator: torch.Generator, max_std: float = 0.1, clamp: float = 0.2) -> torch.Tensor:
    std = _per_sample(_per_sample_uniform(images.shape[0], 0.0, max_std, generator), images)
    noise = torch.randn(images.shape, generator=generator, device=generator.device, dtype=images.dtype)
    return images + (noise * std).clamp(-clamp, clamp)


def intensity_jitter(
    images: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.5,
    contrast: float = 0.5,
    probability: float = 0.8,
) -> torch.Tensor:
    n = images.shape[0]
    apply = torch.rand(n, generator=generator, device=generator.device) < probability
    factor_b = _per_sample_uniform(n, 1.0 - brightness, 1.0 + brightness, generator)
    factor_c = _per_sample_uniform(n, 1.0 - contrast, 1.0 + contrast, generator)
    bright = images * _per_sample(factor_b, images)
    mean = _per_sample(bright.flatten(1).mean(dim=1), images)
    jittered = (bright - mean) * _per_sample(factor_c, images) + mean
    return torch.where(_per_sample(apply, images).bool(), jittered, images)  # untouched samples stay bit-exact


def gaussian_blur(
    images: torch.Tensor,
    generator: torch.Generator,
    sigma_range: tuple[float, float] = (0.1, 2.0),
    probability: float = 0.5,
) -> torch.Tensor:
    n, spatial_dims = images.shape[0], images.dim() - 2
    apply = (torch.rand(n, generator=generator, device=generator.device) < probability).tolist()
    sigmas = _per_sample_uniform(n, *sigma_range, generator).tolist()
    blurred = []
    for image, blur, sigma in zip(images, apply, sigmas):
        if blur:
            kernel = gaussian_1d(torch.tensor(sigma, device=images.device), normalize=True).to(images.dtype)
            image = separable_filtering(image.unsqueeze(0), [kernel] * spatial_dims, mode="replicate").squeeze(0)
        blurred.append(image)
    return torch.stack(blurred)


def channel_dropout(features: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"channel dropout probability must lie in [0, 1), got {p}")
    keep_shape = (*features.shape[:2], *([1] * (features.dim() - 2)))
    keep = torch.rand(keep_shape, generator=generator, device=generator.device) >= p
    return features * keep.to(features.dtype) / (1.0 - p)
