"""The two resizes shared by the data loaders and the evaluator, so both see identically resized inputs.

``zoom_to`` is SSL4MIS's scipy zoom (slices of the 2-D slicewise protocol); ``resize_bilinear`` is the image resize
of the 2-D whole-image protocol (endoscopy).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def zoom_to(array: np.ndarray, size: tuple[int, ...], order: int = 0) -> np.ndarray:
    """Resize the first len(size) axes to ``size`` with scipy zoom (order 0 = nearest, as SSL4MIS does)."""
    factors = [target / current for target, current in zip(size, array.shape)]
    if all(f == 1 for f in factors):
        return array
    # Trailing axes (channels of an RGB or multi-modal image) keep their size.
    return ndimage.zoom(array, factors + [1] * (array.ndim - len(factors)), order=order)


def resize_bilinear(image: np.ndarray | torch.Tensor, size) -> torch.Tensor:
    """(C, H, W) -> (C, *size) float32, bilinear with antialiasing (area-like when shrinking, as PIL's resize).

    The one image resize of the 2-D whole-image protocol (endoscopy): the loaders use it for training images and
    the evaluator for test images, so both see identically resized inputs.
    """
    tensor = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image, dtype=torch.float32)
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor.unsqueeze(0), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
