"""A synthetic ACDC in the SSL4MIS layout (compare ../shared/datasets/ACDC; docs/datasets.md), read by the same
loaders as the real copy::

    root/train_slices.list  train.list  val.list  test.list
    root/data/slices/patientNNN_frameFF_slice_S.h5   'image' float32 (H, W), 'label' uint8 (H, W)   training patients
    root/data/patientNNN_frameFF.h5                  'image' float32 (Z, H, W), 'label' uint8 (Z, H, W)   val/test

The images are drawn, not derived from real data: a cardiac short-axis-like 4-class scene (RV, myocardium, LV)
with look-alike structures around the heart, so shape and context are needed, not a bright region alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from datamodules.synthetic_drawing import SPLIT_STREAM, bias_field, ellipse_distance, lumpy_distance, seeded_rng, smooth_field
from datamodules.synthetic_files import write_h5, write_list

ACDC_BACKGROUND, ACDC_RV, ACDC_MYO, ACDC_LV = 0, 1, 2, 3
_ACDC_PATIENT_STREAM = 2


def _ellipse_radius(radii: tuple[float, float], angle: float, direction: float) -> float:
    """Centre-to-boundary distance along ``direction`` of an ellipse with semi-axes ``radii`` rotated by ``angle``."""
    c, s = math.cos(direction - angle), math.sin(direction - angle)
    return 1.0 / math.sqrt((c / radii[0]) ** 2 + (s / radii[1]) ** 2)


@dataclass(frozen=True)
class _Heart:
    """One patient's anatomy at end-diastole (ED) on the basal slice; other slices and frames are scaled from it.

    Lengths are in pixels. Directions are angles with (row, col) = (sin a, cos a), so pi points to the image's
    left, where the RV sits in ACDC's short-axis views.
    """

    center: tuple[float, float]
    apex_shift: tuple[float, float]  # how far the centre has moved by the apical slice (the long axis is tilted)
    lv_radii: tuple[float, float]
    lv_angle: float
    lv_lumps: tuple[tuple[float, float, int], ...]  # (amplitude, phase, order) harmonics: hearts are not ellipses
    wall: float  # myocardium thickness
    rv_direction: float
    rv_depth: float  # how far the RV crescent reaches out from the epicardium
    rv_span: float  # the RV ellipse's half-length across its direction, relative to the epicardium radius
    es_lv_scale: float  # end-systole: the cavities contract ...
    es_wall_scale: float  # ... and the wall thickens
    es_rv_scale: float
    # Structures that make the task more than "find the bright disc" (none has a class of its own):
    papillary: tuple[tuple[float, float], ...]  # (direction, size) of dark muscles in the LV; labelled LV as in ACDC
    fat_direction: float  # centre of a bright epicardial fat arc
    fat_extent: float  # its half-width in radians
    lung_direction: float  # a dark lung against the lateral wall
    lung_radii: tuple[float, float]
    aorta_direction: float  # a bright disc (descending aorta) near the heart
    aorta_radius: float
    liver_center: tuple[float, float]  # a bright-ish organ that rises into the lower, apical slices
    liver_radii: tuple[float, float]


@dataclass(frozen=True)
class _Contrast:
    """Intensities of one patient's scan (cine bSSFP: bright blood, dark myocardium, grey tissue, black air)."""

    lv_blood: float
    rv_blood: float
    myocardium: float
    tissue: float
    fat: float
    liver: float
    air: float
    noise: float
    bias: float  # strength of the coil shading
    scanner_gain: float  # stored values are integers like the scanner's, before the per-volume min-max


def _draw_heart(rng: np.random.Generator, height: int, width: int) -> tuple[_Heart, _Contrast]:
    unit = min(height, width) / 80.0  # the anatomy is designed on an 80-pixel field and scaled to the image
    lv_major = unit * rng.uniform(9.0, 14.0)
    rv_direction = math.pi + rng.normal(0, 0.3)
    lateral = rv_direction + math.pi  # the LV free wall, away from the RV
    side = rng.choice([-1.0, 1.0])  # lung and aorta sit on opposite sides of the lateral wall
    heart = _Heart(
        center=(height / 2 + rng.normal(0, 0.04 * height), width / 2 + unit * 4 + rng.normal(0, 0.04 * width)),
        apex_shift=(unit * rng.uniform(-4, 4), unit * rng.uniform(-2, 5)),
        lv_radii=(lv_major, lv_major * rng.uniform(0.75, 1.0)),
        lv_angle=rng.uniform(0, math.pi),
        lv_lumps=tuple((rng.uniform(0.0, 0.07), rng.uniform(0, 2 * math.pi), order) for order in (2, 3, 4)),
        wall=unit * rng.uniform(2.6, 4.5),
        rv_direction=rv_direction,
        rv_depth=unit * rng.uniform(6.0, 11.0),
        rv_span=rng.uniform(1.2, 1.6),
        es_lv_scale=rng.uniform(0.6, 0.8),
        es_wall_scale=rng.uniform(1.25, 1.55),
        es_rv_scale=rng.uniform(0.55, 0.8),
        papillary=tuple(
            (lateral + offset + rng.normal(0, 0.2), rng.uniform(0.14, 0.22))
            for offset in (-0.8, 0.8)
            if rng.random() < 0.85
        ),
        fat_direction=rng.uniform(0, 2 * math.pi),
        fat_extent=rng.uniform(0.3, 1.2),
        lung_direction=lateral + side * rng.uniform(0.3, 0.9),
        lung_radii=(unit * rng.uniform(12, 20), unit * rng.uniform(8, 14)),
        aorta_direction=lateral - side * rng.uniform(0.6, 1.2),
        aorta_radius=unit * rng.uniform(3.0, 5.0),
        liver_center=(height * rng.uniform(0.8, 0.95), width * rng.uniform(0.55, 0.85)),
        liver_radii=(height * rng.uniform(0.2, 0.3), width * rng.uniform(0.25, 0.4)),
    )
    tissue = rng.uniform(0.25, 0.5)
    lv_blood = min(1.0, tissue * rng.uniform(1.6, 2.8))
    contrast = _Contrast(
        lv_blood=lv_blood,
        rv_blood=lv_blood * rng.uniform(0.85, 1.0),
        myocardium=tissue * rng.uniform(0.45, 0.85),  # darker than its surroundings, by a varying margin
        tissue=tissue,
        fat=lv_blood * rng.uniform(0.7, 1.0),
        liver=tissue * rng.uniform(1.1, 1.6),
        air=rng.uniform(0.01, 0.04),
        noise=rng.uniform(0.03, 0.07),
        bias=rng.uniform(0.1, 0.3),
        scanner_gain=rng.uniform(200, 400),
    )
    return heart, contrast


def _offset(center, direction: float, distance: float) -> tuple[float, float]:
    return center[0] + distance * math.sin(direction), center[1] + distance * math.cos(direction)


def _acdc_slice(
    rng: np.random.Generator, heart: _Heart, contrast: _Contrast, shape: tuple[int, int], position: float, phase: float
) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of one slice; ``position`` 0 = base .. 1 = apex, ``phase`` 0 = ED .. 1 = ES.

    The image is in arbitrary units (roughly [0, 1]) and is quantised and normalised per volume by the caller.
    """
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    unit = min(shape) / 80.0
    center = (heart.center[0] + position * heart.apex_shift[0], heart.center[1] + position * heart.apex_shift[1])
    # Towards the apex the ventricles narrow (the RV faster) and the wall thins a little.
    lv_scale = (1 - 0.55 * position**1.4) * (1 + phase * (heart.es_lv_scale - 1))
    wall = heart.wall * (1 - 0.2 * position) * (1 + phase * (heart.es_wall_scale - 1))
    rv_depth = heart.rv_depth * (1 - 0.9 * position**1.2) * (1 + phase * (heart.es_rv_scale - 1))

    lv_radii = (heart.lv_radii[0] * lv_scale, heart.lv_radii[1] * lv_scale)
    epi_radii = (lv_radii[0] + wall, lv_radii[1] + wall)
    lv = lumpy_distance(rows, cols, center, lv_radii, heart.lv_angle, heart.lv_lumps) < 1
    epi_distance = lumpy_distance(rows, cols, center, epi_radii, heart.lv_angle, heart.lv_lumps)
    epicardium = epi_distance < 1
    epi_radius = _ellipse_radius(epi_radii, heart.lv_angle, heart.rv_direction)

    label = np.zeros(shape, np.uint8)
    # An RV thinner than ~1.5 px would be a few scattered pixels; real apical slices simply have none.
    if rv_depth >= 1.5 * unit:
        # The RV ellipse reaches rv_depth beyond the epicardium and half an epicardial radius into it; what is left
        # outside the epicardium is a crescent hugging the septum.
        half_depth = (rv_depth + 0.5 * epi_radius) / 2
        rv_center = _offset(center, heart.rv_direction, epi_radius + rv_depth - half_depth)
        rv = ellipse_distance(rows, cols, rv_center, (half_depth, heart.rv_span * epi_radius), heart.rv_direction) < 1
        label[rv & ~epicardium] = ACDC_RV
    label[epicardium] = ACDC_MYO
    label[lv] = ACDC_LV

    torso_radii = (0.47 * shape[0], 0.49 * shape[1])
    torso = ellipse_distance(rows, cols, (shape[0] / 2, shape[1] / 2), torso_radii, math.pi / 2) < 1
    coarse, fine = smooth_field(rng, shape, 5 * unit), smooth_field(rng, shape, 1.2 * unit)
    image = np.full(shape, contrast.air)
    image[torso] = (contrast.tissue * (1 + 0.2 * coarse + 0.1 * fine))[torso]
    lung_center = _offset(center, heart.lung_direction, max(epi_radii) + 0.8 * heart.lung_radii[0])
    lung = (ellipse_distance(rows, cols, lung_center, heart.lung_radii, heart.lung_direction) < 1) & torso
    image[lung] = (contrast.air * 2 + 0.03 * (1 + fine))[lung]
    if position > 0.35:  # the liver/stomach only reaches the lower slices
        grow = (position - 0.35) / 0.65
        liver_radii = (heart.liver_radii[0] * (0.5 + grow), heart.liver_radii[1] * (0.5 + grow))
        liver = (ellipse_distance(rows, cols, heart.liver_center, liver_radii, 0.0) < 1) & torso
        image[liver] = (contrast.liver * (1 + 0.1 * coarse))[liver]
    aorta_distance = max(lv_radii) + wall + heart.aorta_radius + 3 * unit
    aorta_center = _offset(center, heart.aorta_direction, aorta_distance)
    aorta = ellipse_distance(rows, cols, aorta_center, (heart.aorta_radius,) * 2, 0.0) < 1
    image[aorta] = contrast.lv_blood * 0.95
    angle_gap = np.angle(np.exp(1j * (np.arctan2(rows - center[0], cols - center[1]) - heart.fat_direction)))
    fat_layer = (epi_distance >= 1) & (epi_distance < 1 + 1.5 * unit / max(epi_radii))
    fat = fat_layer & (np.abs(angle_gap) < heart.fat_extent)
    image[fat] = contrast.fat

    blood_texture = 1 + 0.05 * fine
    image[label == ACDC_RV] = (contrast.rv_blood * blood_texture)[label == ACDC_RV]
    image[label == ACDC_MYO] = (contrast.myocardium * (1 + 0.15 * fine))[label == ACDC_MYO]
    image[label == ACDC_LV] = (contrast.lv_blood * blood_texture)[label == ACDC_LV]
    if 0.1 < position < 0.85:  # papillary muscles: myocardium-dark, but part of the LV cavity label (ACDC convention)
        for direction, size in heart.papillary:
            muscle_center = _offset(center, direction, 0.62 * min(lv_radii))
            muscle = ellipse_distance(rows, cols, muscle_center, (size * min(lv_radii),) * 2, 0.0) < 1
            image[muscle & lv] = contrast.myocardium

    image = ndimage.gaussian_filter(image, 0.7 * unit)  # partial-volume blur: boundaries are not one-pixel steps
    image *= bias_field(rng, shape, contrast.bias)
    # Magnitude of complex Gaussian noise: Rician, like real MR magnitude images (never negative).
    real = image + rng.normal(0, contrast.noise, shape)
    imaginary = rng.normal(0, contrast.noise, shape)
    return np.sqrt(real**2 + imaginary**2), label


def _minmax_normalise(raw: np.ndarray) -> np.ndarray:
    """SSL4MIS: (x - min) / (max - min) over the whole 3D volume, so min is exactly 0 and max exactly 1."""
    low, high = raw.min(), raw.max()
    return ((raw - low) / (high - low)).astype(np.float32)


def _acdc_patient_volumes(
    seed: int, patient: int, base_shape: tuple[int, int], slices: tuple[int, int], frames: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, label) of each frame of one patient: (Z, H, W) float32 in [0, 1] and uint8 in {0..3}."""
    rng = seeded_rng(seed, _ACDC_PATIENT_STREAM, patient)
    # Scans differ a little in field of view; never square, so no size equals a square training crop.
    height = base_shape[0] + int(rng.integers(-3, 4)) * max(1, base_shape[0] // 32)
    width = base_shape[1] + int(rng.integers(-3, 4)) * max(1, base_shape[1] // 32)
    if width == height:
        width += 1
    depth = int(rng.integers(slices[0], slices[1] + 1))
    heart, contrast = _draw_heart(rng, height, width)

    volumes = []
    for frame in range(frames):
        phase = frame / (frames - 1) if frames > 1 else 0.0  # frame01 = ED (largest), the last frame = ES
        drawn = [_acdc_slice(rng, heart, contrast, (height, width), z / max(depth - 1, 1), phase) for z in range(depth)]
        raw = np.round(np.stack([image for image, _ in drawn]) * contrast.scanner_gain)
        volumes.append((_minmax_normalise(raw), np.stack([label for _, label in drawn])))
    return volumes


def write_acdc_layout(
    root: str | Path,
    n_train_patients: int = 20,
    n_val_patients: int = 4,
    n_test_patients: int = 6,
    slices: tuple[int, int] = (6, 9),
    shape: tuple[int, int] = (96, 80),
    seed: int = 0,
    frames: int = 2,
) -> Path:
    """Write a synthetic ACDC in the SSL4MIS layout under ``root`` and return ``root``.

    Patients are numbered 001.. and split at random into disjoint train/val/test sets. ``slices`` is the inclusive
    range of slices per patient, ``shape`` the nominal (H, W) (each patient varies by a few pixels), ``frames`` the
    frames per patient (frame01 = ED .. last = ES). As in the real copy, training patients are stored as slices only
    and val/test patients as volumes only; train.list still names the training volumes.
    """
    if min(n_train_patients, n_val_patients, n_test_patients) < 1:
        raise ValueError(
            "every split needs at least one patient, got "
            f"{n_train_patients} train, {n_val_patients} val, {n_test_patients} test"
        )
    total = n_train_patients + n_val_patients + n_test_patients
    if total > 999:
        raise ValueError(f"ACDC patient numbers have three digits; {total} patients do not fit")
    if not 1 <= slices[0] <= slices[1]:
        raise ValueError(f"slices must be an inclusive range (min, max) with 1 <= min <= max, got {slices}")
    if not 1 <= frames <= 99:
        raise ValueError(f"frames must be in 1..99, got {frames}")
    if min(shape) < 24:
        raise ValueError(f"shape {shape} is too small to draw a heart in (at least 24 x 24)")
    root = Path(root)
    slice_folder = root / "data" / "slices"
    slice_folder.mkdir(parents=True, exist_ok=True)

    # A shuffled assignment of the numbers 1..total to the splits; list orders are shuffled too, like the real lists.
    order_rng = seeded_rng(seed, SPLIT_STREAM)
    numbers = [int(n) for n in order_rng.permutation(np.arange(1, total + 1))]
    train = numbers[:n_train_patients]
    val = numbers[n_train_patients : n_train_patients + n_val_patients]
    test = numbers[n_train_patients + n_val_patients :]
    frame_names = [f"frame{frame + 1:02d}" for frame in range(frames)]

    def volume_names(patients: list[int]) -> list[str]:
        return [f"patient{p:03d}_{frame}" for p in patients for frame in frame_names]

    slice_names = []
    for patient in train:
        for frame_name, (image, label) in zip(frame_names, _acdc_patient_volumes(seed, patient, shape, slices, frames)):
            volume = f"patient{patient:03d}_{frame_name}"
            for z in range(image.shape[0]):
                # Slices are numbered from 1 in the distributed data (docs/datasets.md#acdc-files).
                write_h5(slice_folder / f"{volume}_slice_{z + 1}.h5", image[z], label[z])
            # Grouped by patient, frame01's slices before frame02's, shuffled within a frame: the real list's order.
            slice_names += [f"{volume}_slice_{z + 1}" for z in order_rng.permutation(image.shape[0])]
    for patient in val + test:
        for frame_name, (image, label) in zip(frame_names, _acdc_patient_volumes(seed, patient, shape, slices, frames)):
            write_h5(root / "data" / f"patient{patient:03d}_{frame_name}.h5", image, label)

    # Lists last: a folder with lists is one whose data files are all there.
    write_list(root / "train_slices.list", slice_names)
    write_list(root / "train.list", volume_names(train))
    write_list(root / "val.list", volume_names(val))
    write_list(root / "test.list", volume_names(test))
    return root
