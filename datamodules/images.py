"""Pixel values of 2-D image files (PNG, TIFF, JPEG) at every bit depth Pillow opens, as 8-bit arrays.

Pillow converts a 16-bit grey image (mode ``I;16``) to ``L`` or ``RGB`` by clipping every value above 255 to 255,
so a 16-bit PNG read with ``convert("RGB")`` is nearly all white. Images are therefore rescaled from the full
16-bit range (0..65535 -> 0..255, what an 8-bit export of the same picture holds); masks and label maps keep their
values (a 0/1 or 0/65535 mask stays one). 32-bit integer and float images are refused: their range is not defined
by the format.
"""
from __future__ import annotations

import numpy as np

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SIXTEEN_BIT_MAX = 65535


def pixel_array(image, mode: str, rescale: bool = True) -> np.ndarray:
    """``image`` (an open PIL image) as ``mode`` ("RGB" (H, W, 3) or "L" (H, W)) uint8, or, for a 16-bit image with
    ``rescale=False`` (masks), its grey values unchanged (uint16). Raises OSError for modes without a defined range."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image)
        if image.mode == "I" and (values.min(initial=0) < 0 or values.max(initial=0) > SIXTEEN_BIT_MAX):
            raise OSError(f"32-bit integer image (values {values.min()}..{values.max()}) is not supported: save it as 8- or 16-bit")
        if not rescale:
            return values.astype(np.uint16)
        grey = np.round(values.astype(np.float64) * (255 / SIXTEEN_BIT_MAX)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1) if mode == "RGB" else grey
    if image.mode == "F":
        raise OSError("32-bit float image is not supported: save it as 8- or 16-bit")
    return np.asarray(image.convert(mode) if image.mode != mode else image)
