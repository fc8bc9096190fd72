"""Small surgical-tool data sets in the on-disk layouts of Kvasir-instrument, EndoVis 2017 and MMS's image/mask
folders (datamodules/endoscopy.py), for tests: the same loaders read them as they would read the real downloads.

The frames are drawn, not derived from real data: reddish tissue with a coarse texture and one or two grey,
metallic instrument bars entering from the frame's edge; the masks are the bars. EndoVis frames get the black
borders of the real 1920x1080 frames outside [28:1052, 320:1600] when they have that size, and per-instrument label
PNGs with part values (10 shaft, 20 wrist, 30 claspers) as the challenge's ``ground_truth/<Instrument>_labels``.

Every random draw comes from ``numpy.random.default_rng`` seeded by (seed, stream, index), so the same arguments
always give the same files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from datamodules.endoscopy import (
    ENDOVIS_BLACK_BORDER_CROP,
    ENDOVIS_FULL_FRAME,
    ENDOVIS_RELEASED_TEST_SEQUENCES,
    ENDOVIS_TRAIN_SEQUENCES,
    endovis_sequence_folder,
)
from datamodules.synthetic_drawing import seeded_rng
from datamodules.synthetic_files import write_list
from datamodules.synthetic_kvasir import kvasir_ids

ENDOVIS_INSTRUMENT_FOLDERS = ("Left_Prograsp_Forceps_labels", "Right_Prograsp_Forceps_labels", "Other_labels")
# The part values of the challenge's label PNGs (binary segmentation uses any value > 0).
SHAFT, WRIST, CLASPERS = 10, 20, 30
_FRAME_STREAM, _SEQUENCE_STREAM = 101, 102


def _tissue(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1]: reddish tissue with a coarse texture (noise drawn at 1/8 size, then
    repeated: cheap enough for full 1920x1080 frames)."""
    coarse = rng.normal(0, 1, (shape[0] // 8 + 1, shape[1] // 8 + 1)).astype(np.float32)
    texture = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[: shape[0], : shape[1]]
    base = np.array([rng.uniform(0.55, 0.8), rng.uniform(0.15, 0.3), rng.uniform(0.15, 0.3)], np.float32)
    return np.clip(base[None, None, :] * (1 + 0.15 * texture[..., None]), 0, 1)


def _instrument_parts(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 part labels of one bar entering from the left or right edge: shaft, wrist, then claspers."""
    height, width = shape
    rows, cols = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]
    from_left = rng.random() < 0.5
    start = np.array([rng.uniform(0.2, 0.8) * height, -0.05 * width if from_left else 1.05 * width])
    tip = np.array([rng.uniform(0.3, 0.7) * height, rng.uniform(0.35, 0.65) * width])
    axis = tip - start
    length = float(np.hypot(*axis))
    along = ((rows - start[0]) * axis[0] + (cols - start[1]) * axis[1]) / length
    across = np.abs((rows - start[0]) * axis[1] - (cols - start[1]) * axis[0]) / length
    inside = (along >= 0) & (along <= length) & (across <= max(2.0, 0.04 * min(height, width)))
    parts = np.zeros(shape, np.uint8)
    parts[inside] = SHAFT
    parts[inside & (along > 0.75 * length)] = WRIST
    parts[inside & (along > 0.9 * length)] = CLASPERS
    return parts


def _draw_tools(rng: np.random.Generator, shape: tuple[int, int], count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(H, W, 3) uint8 RGB frame and one part-label map per instrument."""
    image = _tissue(rng, shape)
    instruments = [_instrument_parts(rng, shape) for _ in range(count)]
    for parts in instruments:
        grey = rng.uniform(0.6, 0.85)
        image[parts > 0] = grey + 0.1 * (parts[parts > 0, None] == CLASPERS)  # metal, brighter claspers
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), instruments


def write_kvasir_instrument_layout(root: str | Path, n_train: int = 10, n_test: int = 4,
                                   shape: tuple[int, int] = (48, 60), seed: int = 0) -> Path:
    """Kvasir-instrument's download: ``images/<id>.jpg``, ``masks/<id>.png`` (0/255) and ``train.txt`` /
    ``test.txt`` (no val.txt), 25-character ids as the real ones."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    ids = kvasir_ids(seed, n_train + n_test)
    for index, image_id in enumerate(ids):
        image, instruments = _draw_tools(seeded_rng(seed, _FRAME_STREAM, index), tuple(shape), 1)
        Image.fromarray(image, "RGB").save(root / "images" / f"{image_id}.jpg", quality=90)
        Image.fromarray(((instruments[0] > 0) * 255).astype(np.uint8), "L").save(root / "masks" / f"{image_id}.png")
    write_list(root / "train.txt", ids[:n_train])
    write_list(root / "test.txt", ids[n_train:])
    return root


def write_endovis17_layout(root: str | Path, frames_per_sequence: int = 3, shape: tuple[int, int] = (40, 56),
                           sequences: Sequence[int] = ENDOVIS_TRAIN_SEQUENCES, released_test: bool = False,
                           instrument_folders: Sequence[str] = ENDOVIS_INSTRUMENT_FOLDERS, seed: int = 0) -> Path:
    """EndoVis 2017's download: ``train/instrument_dataset_N/left_frames/frameXXX.png`` (RGB) with
    ``ground_truth/<Instrument>_labels/frameXXX.png`` (grey part labels, one folder per instrument; an instrument
    may be absent from a frame: its label is then all zero, as in the real data), ``right_frames/`` (unused by the
    loaders, present in the download), and with ``released_test`` the sequences 9 and 10 under ``test/``.
    Frames of the real 1080x1920 size get black borders outside the crop box [28:1052, 320:1600]."""
    root = Path(root)
    layout = [("train", n) for n in sequences] + ([("test", n) for n in ENDOVIS_RELEASED_TEST_SEQUENCES] if released_test else [])
    for split, number in layout:
        folder = root / split / endovis_sequence_folder(number)
        for sub in ("left_frames", "right_frames", *(f"ground_truth/{name}" for name in instrument_folders)):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for frame in range(frames_per_sequence):
            rng = seeded_rng(seed, _SEQUENCE_STREAM, number * 10_000 + frame)
            image, instruments = _draw_tools(rng, tuple(shape), len(instrument_folders))
            if tuple(shape) == ENDOVIS_FULL_FRAME:
                bordered = np.zeros_like(image)
                bordered[ENDOVIS_BLACK_BORDER_CROP] = image[ENDOVIS_BLACK_BORDER_CROP]
                image = bordered
            name = f"frame{frame:03d}.png"
            Image.fromarray(image, "RGB").save(folder / "left_frames" / name)
            Image.fromarray(image[:, ::-1].copy(), "RGB").save(folder / "right_frames" / name)
            for index, (labels, parts) in enumerate(zip(instrument_folders, instruments)):
                if index > 0 and frame % 2:  # only the first instrument stays in view in odd frames
                    parts = np.zeros_like(parts)
                Image.fromarray(parts, "L").save(folder / "ground_truth" / labels / name)
    return root


def write_image_mask_folders(root: str | Path, n_train: int = 10, n_test: int = 4, shape: tuple[int, int] = (48, 60),
                             image_suffix: str = ".png", seed: int = 0) -> Path:
    """MMS's packaging (ART-Net, RoboTool): ``{train,test}/{image,mask}/<stem>`` with the same stems; masks are
    binary PNGs (0/255). Stems are frame numbers without zero padding (``1``, ``2``, ... ``10``), so natural and
    lexicographic order differ."""
    root = Path(root)
    index = 0
    for split, count in (("train", n_train), ("test", n_test)):
        (root / split / "image").mkdir(parents=True, exist_ok=True)
        (root / split / "mask").mkdir(parents=True, exist_ok=True)
        for number in range(1, count + 1):
            image, instruments = _draw_tools(seeded_rng(seed, _FRAME_STREAM, index), tuple(shape), 1)
            index += 1
            Image.fromarray(image, "RGB").save(root / split / "image" / f"{number}{image_suffix}")
            Image.fromarray(((instruments[0] > 0) * 255).astype(np.uint8), "L").save(root / split / "mask" / f"{number}.png")
    return root
