"""Photometric augmentation of image batches on the device, drawn from a given generator (per-rank, per-step).

Grayscale versions of what ACTION applies with torchvision/PIL per sample: ``ColorJitter`` (only brightness and
contrast act on one channel; saturation and hue are no-ops there) and ``GaussianBlur`` in the image plane (3D
volumes slice by slice). Unlike torchvision, intensities are not clamped to [0, 1] (LA images are z-scored).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _per_sample(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (images.dim() - 1)))


def random_intensity_jitter(images: torch.Tensor, generator: torch.Generator, strength: float, probability: float) -> torch.Tensor:
    """With ``probability`` per sample: brightness x b, then contrast c around the sample mean, b and c drawn
    from U(1 - strength, 1 + strength) (ColorJitter's brightness/contrast ranges)."""
    count, device = images.shape[0], images.device
    apply = torch.rand(count, generator=generator, device=device) < probability
    brightness = 1 + (2 * torch.rand(count, generator=generator, device=device) - 1) * strength
    contrast = 1 + (2 * torch.rand(count, generator=generator, device=device) - 1) * strength
    brightness = torch.where(apply, brightness, torch.ones_like(brightness))
    contrast = torch.where(apply, contrast, torch.ones_like(contrast))
    out = images * _per_sample(brightness, images)
    mean = out.flatten(1).mean(1)
    return (out - _per_sample(mean, images)) * _per_sample(contrast, images) + _per_sample(mean, images)


def gaussian_kernel(sigma: float, device=None, dtype=None) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    return kernel / kernel.sum()


def blur_in_plane(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of one (C, H, W, *rest) sample over H and W (every slice of a volume separately)."""
    kernel = gaussian_kernel(sigma, image.device, image.dtype)
    radius = kernel.numel() // 2
    planes = image.movedim((1, 2), (-2, -1))
    shape = planes.shape
    x = planes.reshape(-1, 1, *shape[-2:])
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return x.reshape(shape).movedim((-2, -1), (1, 2))


def random_blur(images: torch.Tensor, generator: torch.Generator, sigma_range: tuple[float, float], probability: float) -> torch.Tensor:
    """With ``probability`` per sample, an in-plane Gaussian blur with sigma ~ U(sigma_range)."""
    count, device = images.shape[0], images.device
    apply = torch.rand(count, generator=generator, device=device) < probability
    sigmas = sigma_range[0] + torch.rand(count, generator=generator, device=device) * (sigma_range[1] - sigma_range[0])
    samples = [blur_in_plane(image, float(sigma)) if flag else image for image, flag, sigma in zip(images, apply, sigmas)]
    return torch.stack(samples)
