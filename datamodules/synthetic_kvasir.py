"""A synthetic Kvasir-SEG (endoscopy; compare ../shared/datasets/Kvasir-SEG), read by the same loaders as the
real download::

    root/images/<id>.jpg  RGB JPEG     root/masks/<id>.jpg  RGB JPEG, 0/255 up to compression noise
    root/train.txt  val.txt  test.txt  one 25-character id per line

The frames are drawn, not derived from real data: colonoscopy-like mucosa with folds, a lumen and highlights,
and one polyp whose tint differs only a little, so colour alone does not give it away.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from datamodules.synthetic_drawing import SPLIT_STREAM, lumpy_distance, seeded_rng, smooth_field
from datamodules.synthetic_files import write_list

_KVASIR_FRAME_STREAM = 4

KVASIR_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
KVASIR_ID_LENGTH = 25  # Kvasir-SEG ids look like cju0qkwl35piu0993l0dewei2


def kvasir_ids(seed: int, count: int) -> list[str]:
    rng = seeded_rng(seed, SPLIT_STREAM, 2)
    ids: list[str] = []
    while len(ids) < count:
        candidate = "".join(rng.choice(list(KVASIR_ID_ALPHABET), KVASIR_ID_LENGTH))
        if candidate not in ids:
            ids.append(candidate)
    return ids


def _kvasir_frame(seed: int, index: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One colonoscopy-like frame: (H, W, 3) uint8 RGB and its (H, W) uint8 {0, 255} polyp mask.

    Pink textured mucosa with dark folds, a darker lumen and the black vignette of an endoscope; the polyp is a
    lumpy blob of a slightly different, patient-specific tint with specular highlights, so colour alone does not
    give it away (folds and highlights fool a colour threshold).
    """
    rng = seeded_rng(seed, _KVASIR_FRAME_STREAM, index)
    height = shape[0] + int(rng.integers(-4, 5)) * max(1, shape[0] // 24)
    width = shape[1] + int(rng.integers(-4, 5)) * max(1, shape[1] // 24)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    unit = min(height, width) / 80.0

    center = (height * rng.uniform(0.3, 0.7), width * rng.uniform(0.3, 0.7))
    radius = unit * rng.uniform(8, 20)
    radii = (radius, radius * rng.uniform(0.6, 1.0))
    lumps = tuple((rng.uniform(0.0, 0.15), rng.uniform(0, 2 * math.pi), order) for order in (2, 3, 5))
    polyp_distance = lumpy_distance(rows, cols, center, radii, rng.uniform(0, math.pi), lumps)
    polyp = polyp_distance < 1

    mucosa = np.array([rng.uniform(0.75, 0.9), rng.uniform(0.35, 0.5), rng.uniform(0.3, 0.45)])
    tint = mucosa * np.array([rng.uniform(1.0, 1.15), rng.uniform(0.6, 0.85), rng.uniform(0.6, 0.95)])
    texture = smooth_field(rng, (height, width), 2.0 * unit)
    image = mucosa[None, None, :] * (1 + 0.08 * texture[..., None])
    folds = np.abs(np.sin(smooth_field(rng, (height, width), 8.0 * unit) * 3.0)) < 0.12
    image[folds] *= 0.6
    lumen_center = (height * rng.uniform(0.2, 0.8), width * rng.uniform(0.2, 0.8))
    lumen = np.exp(-((rows - lumen_center[0]) ** 2 + (cols - lumen_center[1]) ** 2) / (2 * (12 * unit) ** 2))
    image *= (1 - 0.6 * lumen)[..., None]
    dome = 1 + 0.25 * (1 - polyp_distance)  # lit from the scope: brighter top, darker rim
    image[polyp] = (tint[None, :] * (dome + 0.12 * texture)[..., None])[polyp]
    # Specular highlights on and off the polyp.
    for _ in range(int(rng.integers(2, 6))):
        spot = (rng.uniform(0, height), rng.uniform(0, width))
        image[(rows - spot[0]) ** 2 + (cols - spot[1]) ** 2 < (unit * rng.uniform(0.8, 2.0)) ** 2] = 1.0
    vignette = np.sqrt(((rows - height / 2) / (height / 2)) ** 2 + ((cols - width / 2) / (width / 2)) ** 2)
    image *= np.clip(1.25 - 0.5 * vignette, 0, 1)[..., None]
    image = ndimage.gaussian_filter(image, (0.6 * unit, 0.6 * unit, 0)) + rng.normal(0, 0.02, image.shape)
    return np.clip(image * 255, 0, 255).astype(np.uint8), polyp.astype(np.uint8) * 255


def write_kvasir_layout(
    root: str | Path,
    n_train: int = 60,
    n_val: int = 10,
    n_test: int = 10,
    shape: tuple[int, int] = (88, 104),
    seed: int = 0,
    mask_format: str = "jpg",
) -> Path:
    """Write a synthetic Kvasir-SEG under ``root`` and return ``root``.

    ``images/<id>.jpg`` RGB JPEG frames of about ``shape`` (H, W) (each varies, never the training size),
    ``masks/<id>.jpg`` RGB JPEG masks as in Kvasir-SEG (lossy: values near 0 and 255, threshold at 128) or
    ``.png`` (``mask_format="png"``, Kvasir-instrument), and ``train.txt`` / ``val.txt`` / ``test.txt`` with one
    25-character id per line, LF-terminated, in a shuffled order like the real files.
    """
    from PIL import Image

    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"every split needs at least one image, got {n_train} train, {n_val} val, {n_test} test")
    if mask_format not in ("jpg", "png"):
        raise ValueError(f"mask_format must be 'jpg' (Kvasir-SEG) or 'png' (Kvasir-instrument), got {mask_format!r}")
    if min(shape) < 32:
        raise ValueError(f"shape {shape} is too small for a frame (at least 32 x 32)")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    ids = kvasir_ids(seed, n_train + n_val + n_test)
    for index, image_id in enumerate(ids):
        image, mask = _kvasir_frame(seed, index, tuple(shape))
        Image.fromarray(image, "RGB").save(root / "images" / f"{image_id}.jpg", quality=90)
        if mask_format == "jpg":  # Kvasir-SEG's masks are 3-component JPEGs
            Image.fromarray(np.repeat(mask[..., None], 3, axis=2), "RGB").save(root / "masks" / f"{image_id}.jpg", quality=90)
        else:
            Image.fromarray(mask, "L").save(root / "masks" / f"{image_id}.png")
    # Lists last: a folder with lists is one whose files are all there.
    write_list(root / "train.txt", ids[:n_train])
    write_list(root / "val.txt", ids[n_train : n_train + n_val])
    write_list(root / "test.txt", ids[n_train + n_val :])
    return root
