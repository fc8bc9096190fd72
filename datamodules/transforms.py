"""Training augmentations exactly as the published pipelines do them (their shared resizes: core/resize.py).

The ops are SSL4MIS's / UA-MT's (numpy rot90 + flip, scipy rotate and zoom with order 0, pad-then-crop with
their index conventions), not MONAI's: MONAI's Resize/Rotate resample on a different grid and its random
transforms keep their own RandomState that Lightning's worker seeding does not reach (docs/design.md#randomness).
Every random draw comes from an explicit ``numpy.random.Generator``.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from core.resize import zoom_to


def random_rot_flip(rng: np.random.Generator, image: np.ndarray, label: np.ndarray | None):
    """rot90 by k in {0..3} in the first two axes, then a flip along axis 0 or 1 (SSL4MIS/UA-MT).

    Returns views (no copy): the LA crop that follows copies only the patch instead of the whole volume, and the
    input, which may be a cached decoded volume, is never written to.
    """
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))
    image = np.flip(np.rot90(image, k, axes=(0, 1)), axis=axis)
    if label is not None:
        label = np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
    return image, label


def random_rotate(rng: np.random.Generator, image: np.ndarray, label: np.ndarray | None, max_degrees: int = 20):
    """In-plane rotation by an integer angle in [-20, 20), nearest neighbour, same size (SSL4MIS)."""
    angle = int(rng.integers(-max_degrees, max_degrees))
    image = ndimage.rotate(image, angle, order=0, reshape=False)
    if label is not None:
        label = ndimage.rotate(label, angle, order=0, reshape=False)
    return image, label


def acdc_train_transform(rng: np.random.Generator, image: np.ndarray, label: np.ndarray | None, size):
    """SSL4MIS `RandomGenerator`: rot/flip or rotate with p=0.5 each, then zoom to ``size`` (order 0)."""
    if rng.random() > 0.5:
        image, label = random_rot_flip(rng, image, label)
    else:
        image, label = random_rotate(rng, image, label)
    image = zoom_to(image, size, order=0)
    if label is not None:
        label = zoom_to(label, size, order=0)
    return image, label


def pad_to_at_least(image: np.ndarray, label: np.ndarray | None, size):
    """UA-MT `RandomCrop` padding: a dimension <= the patch is padded by (patch - dim)//2 + 3 on each side."""
    pads = []
    for dim, patch in zip(image.shape, size):
        extra = (patch - dim) // 2 + 3 if dim <= patch else 0
        pads.append((extra, extra))
    if any(p != (0, 0) for p in pads):
        # A trailing channel axis (multi-modal images are (*spatial, channels)) is not padded.
        image = np.pad(image, pads + [(0, 0)] * (image.ndim - len(pads)), mode="constant", constant_values=0)
        if label is not None:
            label = np.pad(label, pads, mode="constant", constant_values=0)
    return image, label


def random_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray | None, size):
    """UA-MT `RandomCrop`: pad if needed, start drawn from [0, dim - patch) (exclusive, as np.random.randint)."""
    image, label = pad_to_at_least(image, label, size)
    starts = [int(rng.integers(0, dim - patch)) if dim > patch else 0 for dim, patch in zip(image.shape, size)]
    window = tuple(slice(s, s + p) for s, p in zip(starts, size))
    return image[window], None if label is None else label[window]


def la_train_transform(rng: np.random.Generator, image: np.ndarray, label: np.ndarray | None, size):
    """UA-MT LA pipeline: RandomRotFlip then RandomCrop(patch)."""
    image, label = random_rot_flip(rng, image, label)
    return random_crop(rng, image, label, size)
