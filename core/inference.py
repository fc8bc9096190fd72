"""Whole-case inference: the published sliding-window protocol (3D), slice-by-slice prediction (2D volumes) and
whole-image prediction (2D images such as endoscopy frames).

Both take a ``predictor`` mapping a batch (B, C, *patch) to logits and return a label map of the case's shape.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np
import torch

from core.resize import resize_bilinear, zoom_to

Predictor = Callable[[torch.Tensor], torch.Tensor]


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """UA-MT's counting: ceil((size - patch) / stride) + 1 windows, the last start clamped to size - patch."""
    count = math.ceil((size - patch) / stride) + 1
    return [min(stride * i, size - patch) for i in range(count)]


def center_pad_amounts(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """Centred zero padding for axes smaller than the patch (UA-MT pads only when size < patch)."""
    pads = []
    for size, p in zip(shape, patch):
        missing = max(p - size, 0)
        pads.append((missing // 2, missing - missing // 2))
    return pads


@torch.no_grad()
def sliding_window_probabilities(
    predictor: Predictor,
    image: np.ndarray,
    patch: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
    window_batch: int = 4,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Softmax probabilities averaged over overlapping windows, as UA-MT/MC-Net's ``test_single_case``.

    ``image`` has shape (*spatial) or (channels, *spatial). Windows are sent through the network
    ``window_batch`` at a time; probabilities are summed in the same order as the per-window loop.
    """
    volume = torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)
    if volume.ndim == len(patch):
        volume = volume.unsqueeze(0)
    spatial = volume.shape[1:]
    pads = center_pad_amounts(spatial, patch)
    if any(sum(p) for p in pads):
        flat = [amount for pair in reversed(pads) for amount in pair]  # torch pads the last axis first
        volume = torch.nn.functional.pad(volume, flat)
    padded = volume.shape[1:]
    starts = [window_starts(size, p, s) for size, p, s in zip(padded, patch, stride)]
    windows = [tuple(slice(s, s + p) for s, p in zip(corner, patch)) for corner in itertools.product(*starts)]
    scores = torch.zeros((num_classes, *padded), dtype=torch.float32)
    counts = torch.zeros(padded, dtype=torch.float32)
    for first in range(0, len(windows), window_batch):
        chunk = windows[first : first + window_batch]
        batch = torch.stack([volume[(slice(None), *w)] for w in chunk]).to(device)
        probabilities = torch.softmax(predictor(batch).float(), dim=1).cpu()
        for window, probability in zip(chunk, probabilities):
            scores[(slice(None), *window)] += probability
            counts[window] += 1
    scores /= counts.unsqueeze(0)
    crop = tuple(slice(before, before + size) for (before, _), size in zip(pads, spatial))
    return scores[(slice(None), *crop)]


def count_windows(shape: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> int:
    padded = [max(size, p) for size, p in zip(shape, patch)]
    return math.prod(len(window_starts(size, p, s)) for size, p, s in zip(padded, patch, stride))


@torch.no_grad()
def predict_slicewise(
    predictor: Predictor, volume: np.ndarray, size: Sequence[int], batch_size: int = 16, device="cpu"
) -> np.ndarray:
    """SSL4MIS ``test_single_volume``: each slice zoomed to ``size`` (order 0), argmax, zoomed back (order 0)."""
    size = tuple(size)
    predictions = []
    for first in range(0, volume.shape[0], batch_size):
        slices = volume[first : first + batch_size]
        resized = np.stack([zoom_to(s, size, order=0) for s in slices]).astype(np.float32)
        logits = predictor(torch.from_numpy(resized).unsqueeze(1).to(device))
        labels = logits.argmax(dim=1).cpu().numpy().astype(np.uint8)
        predictions.extend(zoom_to(label, s.shape, order=0) for label, s in zip(labels, slices))
    return np.stack(predictions)


@torch.no_grad()
def predict_whole_image(predictor: Predictor, image: np.ndarray, size: Sequence[int], device="cpu") -> np.ndarray:
    """One 2-D image (C, H, W) or (H, W): resized to the training ``size`` (bilinear, antialiased, as the training
    images), one forward pass, logits resized back to (H, W) bilinearly, then argmax: the label map is scored at
    the image's own resolution (the endoscopy convention: PraNet and its successors upsample to the mask size)."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    original = array.shape[-2:]
    logits = predictor(resize_bilinear(array, size).unsqueeze(0).to(device)).float()
    logits = torch.nn.functional.interpolate(logits, size=original, mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
