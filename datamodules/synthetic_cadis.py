"""Synthetic CaDIS frames in the real layout: ``VideoNN/Images/VideoN_frameXXXXXX.png`` (RGB) and
``VideoNN/Labels/VideoN_frameXXXXXX.png`` (single channel, the 36 original classes 0..35).

Each video has its own eye (skin, cornea, iris and pupil, retractors, sometimes tape and a gloved hand) that moves a
little from frame to frame, and one or two instruments (a tip class with its handle class, e.g. 12 Primary Knife
with 28 Primary Knife Handle) drawn from all 29 instrument classes, so every task's remapping has work to do,
including the classes that tasks II and III ignore (255).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from datamodules.cadis import TEST_VIDEOS, TRAIN_VIDEOS, VAL_VIDEOS, video_folder
from datamodules.synthetic_drawing import ellipse_distance, seeded_rng, smooth_field

_CADIS_STREAM = 31
PUPIL, TAPE, HAND, RETRACTORS, IRIS, SKIN, CORNEA = range(7)
# Instrument tips with their handles (CaDIS classes); tools without a handle class have None.
TOOLS = ((7, 32), (8, None), (9, 22), (10, 20), (11, None), (12, 28), (13, 21), (14, 24), (15, 18), (16, 23),
         (17, None), (19, None), (25, 26), (27, None), (29, None), (30, None), (31, None), (33, None), (34, None), (35, None))
COLOURS = {PUPIL: (110, 35, 30), TAPE: (225, 225, 215), HAND: (120, 140, 205), RETRACTORS: (165, 165, 170),
           IRIS: (120, 80, 55), SKIN: (205, 150, 125), CORNEA: (175, 110, 95)}


def cadis_frame(seed: int, video: int, frame: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8, original-class uint8) of one frame."""
    scene = seeded_rng(seed, _CADIS_STREAM, video)  # what stays the same over a video
    rng = seeded_rng(seed, _CADIS_STREAM, 1000 * video + frame + 1)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    unit = min(shape) / 54.0
    label = np.full(shape, SKIN, np.uint8)
    center = (shape[0] * scene.uniform(0.4, 0.6) + rng.normal(0, unit), shape[1] * scene.uniform(0.4, 0.6) + rng.normal(0, unit))
    cornea_radius = min(shape) * scene.uniform(0.32, 0.42)
    distance = ellipse_distance(rows, cols, center, (cornea_radius, cornea_radius * 1.05), 0.0)
    label[distance < 1] = CORNEA
    label[distance < scene.uniform(0.6, 0.75)] = IRIS
    label[distance < scene.uniform(0.3, 0.45)] = PUPIL
    for side in (-1, 1):  # retractors above and below the eye
        retractor = (np.abs(cols - center[1]) < 3 * unit) & (side * (rows - center[0]) > cornea_radius * 1.05)
        label[retractor] = RETRACTORS
    if scene.random() < 0.5:
        label[:, : int(4 * unit)] = TAPE
    if scene.random() < 0.4:
        label[ellipse_distance(rows, cols, (shape[0], shape[1]), (12 * unit, 18 * unit), 0.3) < 1] = HAND
    for _ in range(int(scene.integers(1, 3))):
        tip, handle = TOOLS[int(scene.integers(len(TOOLS)))]
        angle = scene.uniform(0, 2 * math.pi) + rng.normal(0, 0.1)
        end = (center[0] + rng.normal(0, 3 * unit), center[1] + rng.normal(0, 3 * unit))
        direction = (math.sin(angle), math.cos(angle))
        along = (rows - end[0]) * direction[0] + (cols - end[1]) * direction[1]
        across = np.abs(-(rows - end[0]) * direction[1] + (cols - end[1]) * direction[0])
        shaft = (along > 0) & (across < 1.2 * unit)
        label[shaft & (along < 14 * unit)] = tip
        label[shaft & (along >= 14 * unit) & (across < 2.2 * unit)] = tip if handle is None else handle
    image = np.zeros((*shape, 3))
    for cls in np.unique(label):
        colour = np.array(COLOURS.get(int(cls), (195, 195, 205) if cls in {t for t, _ in TOOLS} else (95, 95, 105)))
        image[label == cls] = colour * scene.uniform(0.9, 1.1)
    image *= 1 + 0.06 * smooth_field(rng, shape, 2 * unit)[..., None]
    image = np.stack([ndimage.gaussian_filter(image[..., c], 0.6 * unit) for c in range(3)], axis=-1)
    image += rng.normal(0, 3, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def write_cadis_layout(root: str | Path, frames_per_video: int = 2, shape: tuple[int, int] = (54, 96), seed: int = 0,
                       videos: tuple[int, ...] = TRAIN_VIDEOS + VAL_VIDEOS + TEST_VIDEOS) -> Path:
    """All 25 videos (by default), ``frames_per_video`` annotated frames each, numbered like the release (every 5th)."""
    if frames_per_video < 1:
        raise ValueError(f"frames_per_video must be >= 1, got {frames_per_video}")
    from PIL import Image

    root = Path(root)
    for video in videos:
        for folder in ("Images", "Labels"):
            (root / video_folder(video) / folder).mkdir(parents=True, exist_ok=True)
        for frame in range(frames_per_video):
            name = f"Video{video}_frame{90 + 5 * frame:06d}.png"
            image, label = cadis_frame(seed, video, frame, tuple(shape))
            Image.fromarray(image, "RGB").save(root / video_folder(video) / "Images" / name)
            Image.fromarray(label, "L").save(root / video_folder(video) / "Labels" / name)
    return root
