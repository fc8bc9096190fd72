"""Synthetic nuclei images in the MoNuSeg (segmentation distribution) and DSB 2018 stage-1 layouts.

MoNuSeg-like tiles are H&E-like: pink eosin background with fibre texture, dark purple nuclei of varied size and
shape, some touching, and pale purple cytoplasm blobs that are not nuclei (so colour alone is not enough). DSB-like
images are fluorescence-like: grey nuclei on black, stored as RGBA with one 0/255 PNG per nucleus.

    MoNuSeg: root/{Train_Folder,Val_Folder,Test_Folder}/img/<stem>.png|.tif   + labelcol/<stem>.png (0/255)
    DSB:     root/stage1_train/<id>/images/<id>.png (RGBA)   + root/stage1_train/<id>/masks/<mask id>.png (0/255)
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from datamodules.nuclei import DSB_FOLDER, MONUSEG_SPLITS
from datamodules.synthetic_drawing import ellipse_distance, seeded_rng, smooth_field

_MONUSEG_STREAM, _DSB_STREAM = 21, 22


def _nuclei(rng: np.random.Generator, shape: tuple[int, int], count: int, radius: tuple[float, float],
            touching: float) -> list[np.ndarray]:
    """Non-overlapping elliptical nuclei masks; a fraction ``touching`` is placed right next to another one."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    occupied = np.zeros(shape, bool)
    masks: list[np.ndarray] = []
    centers: list[tuple[float, float, float]] = []
    for _ in range(count * 3):
        if len(masks) == count:
            break
        radii = (rng.uniform(*radius), rng.uniform(*radius) * rng.uniform(0.6, 1.0))
        if centers and rng.random() < touching:
            r0, c0, size = centers[int(rng.integers(len(centers)))]
            angle = rng.uniform(0, 2 * math.pi)
            center = (r0 + (size + radii[0]) * math.sin(angle), c0 + (size + radii[0]) * math.cos(angle))
        else:
            center = (rng.uniform(0, shape[0]), rng.uniform(0, shape[1]))
        distance = ellipse_distance(rows, cols, center, radii, rng.uniform(0, math.pi))
        distance *= 1 + 0.08 * np.cos(3 * np.arctan2(rows - center[0], cols - center[1]) + rng.uniform(0, 6.3))
        mask = (distance < 1) & ~occupied
        if mask.sum() < 6:
            continue
        occupied |= mask
        masks.append(mask)
        centers.append((center[0], center[1], max(radii)))
    return masks


def monuseg_tile(seed: int, index: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, uint8 mask 0/255) of one H&E-like tile."""
    rng = seeded_rng(seed, _MONUSEG_STREAM, index)
    unit = min(shape) / 200.0
    density = rng.uniform(0.6, 1.4)
    masks = _nuclei(rng, shape, int(density * 40 * (shape[0] * shape[1]) / 200**2), (3.5 * unit, 8.0 * unit), 0.3)
    nuclei = np.zeros(shape, bool)
    for mask in masks:
        nuclei |= mask
    # Pale cytoplasm blobs (not labelled): larger and lighter than nuclei.
    cytoplasm = np.zeros(shape, bool)
    for mask in _nuclei(rng, shape, int(density * 8), (9 * unit, 15 * unit), 0.0):
        cytoplasm |= mask
    eosin = np.array([235, 165, 200]) * rng.uniform(0.9, 1.05, 3)
    hematoxylin = np.array([85, 50, 135]) * rng.uniform(0.8, 1.2, 3)
    pale = (eosin + hematoxylin) / 2 * rng.uniform(1.0, 1.15)
    fibres = smooth_field(rng, shape, 1.5 * unit)
    image = eosin[None, None, :] * (1 + 0.06 * fibres[..., None])
    image[cytoplasm] = pale * (1 + 0.05 * fibres[cytoplasm, None])
    chromatin = smooth_field(rng, shape, 0.8 * unit)
    image[nuclei] = hematoxylin * (1 + 0.15 * chromatin[nuclei, None])
    image = np.stack([ndimage.gaussian_filter(image[..., c], 0.8 * unit) for c in range(3)], axis=-1)
    image += rng.normal(0, 4, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), nuclei.astype(np.uint8) * 255


def write_monuseg_layout(root: str | Path, n_train: int = 8, n_val: int = 2, n_test: int = 3,
                         shape: tuple[int, int] = (200, 200), seed: int = 0, image_suffix: str = ".png") -> Path:
    """MoNuSeg as distributed for segmentation (Train_Folder/Val_Folder/Test_Folder with img/ and labelcol/).

    Stems look like the TCGA tile names; ``image_suffix`` ".tif" writes the tiles as TIFF (masks stay PNG)."""
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"every split needs an image, got {n_train}, {n_val}, {n_test}")
    if image_suffix not in (".png", ".tif"):
        raise ValueError(f"image_suffix must be .png or .tif, got {image_suffix!r}")
    from PIL import Image

    root = Path(root)
    index = 0
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        folder = root / MONUSEG_SPLITS[split]
        (folder / "img").mkdir(parents=True, exist_ok=True)
        (folder / "labelcol").mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            stem = f"TCGA-{hashlib.sha1(f'{seed}-{index}'.encode()).hexdigest()[:2].upper()}-A{index:03d}-01Z-00-DX1"
            image, mask = monuseg_tile(seed, index, tuple(shape))
            Image.fromarray(image, "RGB").save(folder / "img" / f"{stem}{image_suffix}")
            Image.fromarray(mask, "L").save(folder / "labelcol" / f"{stem}.png")
            index += 1
    return root


def write_dsb_layout(root: str | Path, n_images: int = 10, shape: tuple[int, int] = (96, 128), seed: int = 0) -> Path:
    """DSB 2018 stage 1 training layout: one folder per image (64-hex id) with images/ and one mask PNG per nucleus."""
    if n_images < 2:
        raise ValueError(f"need at least two images (train and test), got {n_images}")
    from PIL import Image

    folder = Path(root) / DSB_FOLDER
    for index in range(n_images):
        rng = seeded_rng(seed, _DSB_STREAM, index)
        size = (shape[0] + int(rng.integers(0, 3)) * 8, shape[1] + int(rng.integers(0, 3)) * 8)  # sizes vary
        image_id = hashlib.sha256(f"dsb-{seed}-{index}".encode()).hexdigest()
        masks = _nuclei(rng, size, int(rng.integers(8, 20)), (3.0, 8.0), 0.25)
        brightness = rng.uniform(60, 200)
        image = np.zeros(size)
        for mask in masks:
            image[mask] = brightness * rng.uniform(0.6, 1.2)
        image = ndimage.gaussian_filter(image, 0.8) + rng.normal(0, 5, size)
        gray = np.clip(np.round(image), 0, 255).astype(np.uint8)
        (folder / image_id / "images").mkdir(parents=True, exist_ok=True)
        (folder / image_id / "masks").mkdir(parents=True, exist_ok=True)
        rgba = np.stack([gray, gray, gray, np.full(size, 255, np.uint8)], axis=-1)
        Image.fromarray(rgba, "RGBA").save(folder / image_id / "images" / f"{image_id}.png")
        for number, mask in enumerate(masks):
            mask_id = hashlib.sha256(f"{image_id}-{number}".encode()).hexdigest()
            Image.fromarray(mask.astype(np.uint8) * 255, "L").save(folder / image_id / "masks" / f"{mask_id}.png")
    return Path(root)
