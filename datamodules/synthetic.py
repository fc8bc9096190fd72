"""Synthetic datasets written in the exact on-disk layouts of the real ones.

Two uses: the suite's built-in ``synthetic_acdc`` / ``synthetic_la`` datasets (generated once into a cache by
:func:`ensure_synthetic`), and test fixtures (call the writers on a temporary folder). The files follow the real
layouts exactly (names, list formats, h5 keys, dtypes, value ranges, gzip; docs/datasets.md), so the very
same loaders read them.

ACDC, SSL4MIS form (compare ../shared/datasets/ACDC)::

    root/train_slices.list  train.list  val.list  test.list
    root/data/slices/patientNNN_frameFF_slice_S.h5   'image' float32 (H, W), 'label' uint8 (H, W)   training patients
    root/data/patientNNN_frameFF.h5                  'image' float32 (Z, H, W), 'label' uint8 (Z, H, W)   val/test

Kvasir-SEG (endoscopy; compare ../shared/datasets/Kvasir-SEG)::

    root/images/<id>.jpg  RGB JPEG     root/masks/<id>.jpg  RGB JPEG, 0/255 up to compression noise
    root/train.txt  val.txt  test.txt  one 25-character id per line

LA, UA-MT form::

    root/2018LA_Seg_Training Set/<20-char ID>/mri_norm2.h5   'image' float32 (X, Y, Z) z-scored, 'label' uint8 {0, 1}
    root/train.list  test.list          (or inside the data folder: DTC's layout)

The images are drawn, not derived from real data: a cardiac short-axis-like 4-class scene for ACDC and an
atrium-like blob among look-alike neighbours for LA. They are learnable in a few hundred CPU steps, but need shape
and context (a bright region alone is not the answer in either set) and vary enough across patients that one or two
labeled patients generalise clearly worse than twenty, which leaves room for what a semi-supervised method adds.

Every random draw comes from ``numpy.random.default_rng`` seeded by (seed, stream, index), so a case does not
change when the number of other cases changes, and the same arguments always give the same arrays.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import h5py
import numpy as np
from scipy import ndimage

from core.errors import UserError, unknown_name

try:  # POSIX advisory locks; elsewhere only the rename race below protects concurrent callers.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# The real folder name, with its space (docs/datasets.md#la-files). Stated here rather than imported from
# datamodules.la so that the writers describe the format on their own; a test checks that the two agree.
LA_DATA_FOLDER = "2018LA_Seg_Training Set"
LA_FILE_NAME = "mri_norm2.h5"
LA_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
LA_ID_LENGTH = 20

ACDC_BACKGROUND, ACDC_RV, ACDC_MYO, ACDC_LV = 0, 1, 2, 3

# Independent random streams, so that e.g. the split order does not shift when a patient's drawing changes.
_SPLIT_STREAM, _ACDC_PATIENT_STREAM, _LA_CASE_STREAM, _KVASIR_FRAME_STREAM = 1, 2, 3, 4


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, index])


# ---- file formats -------------------------------------------------------------------------------------------------


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    """Exactly two datasets, no attributes, gzip with h5py's automatic chunks: what the real files contain."""
    with h5py.File(path, "w") as f:
        # h5py's default gzip level is 4, the level the real files have.
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("label", data=label, compression="gzip")


def _write_list(path: Path, names: Sequence[str], crlf: bool = False) -> None:
    """One name per line, no extension, every line terminated (as the real lists are)."""
    newline = "\r\n" if crlf else "\n"
    # Bytes, not text mode, so no platform ever translates the line endings.
    path.write_bytes("".join(name + newline for name in names).encode("ascii"))


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to unit standard deviation: textures and irregular shapes."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="reflect")
    return field_ / (field_.std() + 1e-12)


def _bias_field(rng: np.random.Generator, shape: Sequence[int], strength: float = 0.12) -> np.ndarray:
    """Coil-sensitivity shading: a random smooth quadratic around 1 (far cheaper than filtering with a wide kernel)."""
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    linear = sum(rng.normal(0, 1) * axis for axis in axes)
    quadratic = sum(rng.normal(0, 0.5) * axis * axis for axis in axes)
    shading = linear + quadratic
    return 1 + strength * shading / (np.abs(shading).max() + 1e-12)


def _ellipse_radius(radii: tuple[float, float], angle: float, direction: float) -> float:
    """Centre-to-boundary distance along ``direction`` of an ellipse with semi-axes ``radii`` rotated by ``angle``."""
    c, s = math.cos(direction - angle), math.sin(direction - angle)
    return 1.0 / math.sqrt((c / radii[0]) ** 2 + (s / radii[1]) ** 2)


def _ellipse_distance(rows, cols, center, radii, angle) -> np.ndarray:
    """Normalised elliptical distance: < 1 inside, 1 on the boundary. ``angle`` rotates the first semi-axis."""
    dr, dc = rows - center[0], cols - center[1]
    c, s = math.cos(angle), math.sin(angle)
    along = dr * s + dc * c  # component along the first axis, direction (sin a, cos a) in (row, col)
    across = -dr * c + dc * s
    return np.sqrt((along / radii[0]) ** 2 + (across / radii[1]) ** 2)


# ---- ACDC ---------------------------------------------------------------------------------------------------------


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


def _lumpy_distance(rows, cols, center, radii, angle, lumps) -> np.ndarray:
    """Elliptical distance whose boundary is pushed in and out by a few angular harmonics."""
    theta = np.arctan2(rows - center[0], cols - center[1])
    boundary = 1 + sum(amplitude * np.cos(order * theta + phase) for amplitude, phase, order in lumps)
    return _ellipse_distance(rows, cols, center, radii, angle) / boundary


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
    lv = _lumpy_distance(rows, cols, center, lv_radii, heart.lv_angle, heart.lv_lumps) < 1
    epi_distance = _lumpy_distance(rows, cols, center, epi_radii, heart.lv_angle, heart.lv_lumps)
    epicardium = epi_distance < 1
    epi_radius = _ellipse_radius(epi_radii, heart.lv_angle, heart.rv_direction)

    label = np.zeros(shape, np.uint8)
    # An RV thinner than ~1.5 px would be a few scattered pixels; real apical slices simply have none.
    if rv_depth >= 1.5 * unit:
        # The RV ellipse reaches rv_depth beyond the epicardium and half an epicardial radius into it; what is left
        # outside the epicardium is a crescent hugging the septum.
        half_depth = (rv_depth + 0.5 * epi_radius) / 2
        rv_center = _offset(center, heart.rv_direction, epi_radius + rv_depth - half_depth)
        rv = _ellipse_distance(rows, cols, rv_center, (half_depth, heart.rv_span * epi_radius), heart.rv_direction) < 1
        label[rv & ~epicardium] = ACDC_RV
    label[epicardium] = ACDC_MYO
    label[lv] = ACDC_LV

    torso_radii = (0.47 * shape[0], 0.49 * shape[1])
    torso = _ellipse_distance(rows, cols, (shape[0] / 2, shape[1] / 2), torso_radii, math.pi / 2) < 1
    coarse, fine = _smooth_field(rng, shape, 5 * unit), _smooth_field(rng, shape, 1.2 * unit)
    image = np.full(shape, contrast.air)
    image[torso] = (contrast.tissue * (1 + 0.2 * coarse + 0.1 * fine))[torso]
    lung_center = _offset(center, heart.lung_direction, max(epi_radii) + 0.8 * heart.lung_radii[0])
    lung = (_ellipse_distance(rows, cols, lung_center, heart.lung_radii, heart.lung_direction) < 1) & torso
    image[lung] = (contrast.air * 2 + 0.03 * (1 + fine))[lung]
    if position > 0.35:  # the liver/stomach only reaches the lower slices
        grow = (position - 0.35) / 0.65
        liver_radii = (heart.liver_radii[0] * (0.5 + grow), heart.liver_radii[1] * (0.5 + grow))
        liver = (_ellipse_distance(rows, cols, heart.liver_center, liver_radii, 0.0) < 1) & torso
        image[liver] = (contrast.liver * (1 + 0.1 * coarse))[liver]
    aorta_distance = max(lv_radii) + wall + heart.aorta_radius + 3 * unit
    aorta_center = _offset(center, heart.aorta_direction, aorta_distance)
    aorta = _ellipse_distance(rows, cols, aorta_center, (heart.aorta_radius,) * 2, 0.0) < 1
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
            muscle = _ellipse_distance(rows, cols, muscle_center, (size * min(lv_radii),) * 2, 0.0) < 1
            image[muscle & lv] = contrast.myocardium

    image = ndimage.gaussian_filter(image, 0.7 * unit)  # partial-volume blur: boundaries are not one-pixel steps
    image *= _bias_field(rng, shape, contrast.bias)
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
    rng = _rng(seed, _ACDC_PATIENT_STREAM, patient)
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
    order_rng = _rng(seed, _SPLIT_STREAM)
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
                _write_h5(slice_folder / f"{volume}_slice_{z + 1}.h5", image[z], label[z])
            # Grouped by patient, frame01's slices before frame02's, shuffled within a frame: the real list's order.
            slice_names += [f"{volume}_slice_{z + 1}" for z in order_rng.permutation(image.shape[0])]
    for patient in val + test:
        for frame_name, (image, label) in zip(frame_names, _acdc_patient_volumes(seed, patient, shape, slices, frames)):
            _write_h5(root / "data" / f"patient{patient:03d}_{frame_name}.h5", image, label)

    # Lists last: a folder with lists is one whose data files are all there.
    _write_list(root / "train_slices.list", slice_names)
    _write_list(root / "train.list", volume_names(train))
    _write_list(root / "val.list", volume_names(val))
    _write_list(root / "test.list", volume_names(test))
    return root


# ---- LA -----------------------------------------------------------------------------------------------------------


def _la_ids(seed: int, count: int) -> list[str]:
    """Distinct 20-character uppercase alphanumeric IDs, like the challenge's case folders."""
    rng = _rng(seed, _SPLIT_STREAM)
    ids: set[str] = set()
    while len(ids) < count:
        ids.add("".join(LA_ID_ALPHABET[i] for i in rng.integers(0, len(LA_ID_ALPHABET), LA_ID_LENGTH)))
    return sorted(ids)


def _random_rotation(rng: np.random.Generator, max_tilt: float) -> np.ndarray:
    """A free spin about the third axis combined with a tilt of at most ``max_tilt`` radians."""
    spin, tilt, tilt_axis = rng.uniform(0, 2 * math.pi), rng.uniform(0, max_tilt), rng.uniform(0, 2 * math.pi)
    c, s = math.cos(spin), math.sin(spin)
    spin_matrix = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    axis = np.array([math.cos(tilt_axis), math.sin(tilt_axis), 0.0])
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    tilt_matrix = np.eye(3) + math.sin(tilt) * cross + (1 - math.cos(tilt)) * cross @ cross  # Rodrigues
    return tilt_matrix @ spin_matrix


def _ellipsoid_distance(grid: np.ndarray, center, radii, rotation: np.ndarray) -> np.ndarray:
    """Normalised ellipsoidal distance (< 1 inside) on a (3, X, Y, Z) coordinate grid."""
    offsets = grid - np.asarray(center, dtype=np.float64)[:, None, None, None]
    local = np.tensordot(rotation.T, offsets, axes=1)
    return np.sqrt(sum((local[i] / radii[i]) ** 2 for i in range(3)))


def _line_distance(grid: np.ndarray, point: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of every voxel from the line through ``point`` along unit ``direction``, and its position along it."""
    offsets = grid - point[:, None, None, None]
    along = np.tensordot(direction, offsets, axes=1)
    across = offsets - direction[:, None, None, None] * along[None]
    return np.sqrt((across**2).sum(0)), along


def _unit_vector(rng: np.random.Generator, max_z: float) -> np.ndarray:
    """A random direction whose Z component is at most ``max_z`` in size (mostly in-plane)."""
    angle, z = rng.uniform(0, 2 * math.pi), rng.uniform(-max_z, max_z)
    planar = math.sqrt(1 - z * z)
    return np.array([planar * math.cos(angle), planar * math.sin(angle), z])


def _la_case(seed: int, index: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One LGE-MRI-like crop around a left atrium: (image z-scored float32, label uint8), both (X, Y, Z).

    What makes it more than thresholding: neighbours as bright as the atrium touch its thin, patchy dark wall, and
    pulmonary veins leave it with only their first few voxels labelled (as in the challenge's masks).
    """
    rng = _rng(seed, _LA_CASE_STREAM, index)
    shape_array = np.asarray(shape, dtype=np.float64)
    grid = np.indices(shape, dtype=np.float64)

    # The atrium: an irregular ellipsoid filling the middle of the crop (the real crops are cut around it).
    center = shape_array / 2 + rng.normal(0, 0.04, 3) * shape_array
    radii = shape_array * np.array([0.27, 0.27, 0.3]) * rng.uniform(0.8, 1.1, 3)
    distance = _ellipsoid_distance(grid, center, radii, _random_rotation(rng, 0.35))
    # Lumpy surface: the distance is modulated by a smooth field, so the boundary bulges in and out by ~15 %.
    distance *= 1 + 0.12 * _smooth_field(rng, shape, min(shape) / 6)
    wall_outside = 1 + 2.5 / radii.mean()  # the atrial wall, ~2.5 voxels thick
    atrium = distance < 1
    wall = (distance >= 1) & (distance < wall_outside)
    outside_wall = distance >= wall_outside

    # Pulmonary veins: 2-4 tubes leaving the atrium; only the ostium (up to ~25 % beyond the surface) is labelled.
    veins = np.zeros(shape, bool)
    for _ in range(int(rng.integers(2, 5))):
        line, along = _line_distance(grid, center, _unit_vector(rng, 0.5))
        veins |= (line < rng.uniform(2.0, 3.5) * min(shape) / 64) & (along > 0) & (distance >= 1)
    label = atrium | (veins & (distance < 1.25))

    # Neighbours that touch the wall from outside: the aorta (a tube along Z) and a ventricle/right atrium (a big
    # ellipsoid). They are as bright as the atrium, so only the wall and the shapes separate them.
    aorta_direction = _unit_vector(rng, 0.0)
    aorta_radius = min(shape[:2]) * rng.uniform(0.08, 0.12)
    aorta_axis = center + (radii[:2].mean() + aorta_radius * rng.uniform(0.6, 1.1)) * aorta_direction
    aorta_line, _ = _line_distance(grid, aorta_axis, np.array([*rng.normal(0, 0.15, 2), 1.0]) / math.sqrt(1.03))
    aorta = (aorta_line < aorta_radius) & outside_wall
    neighbour_direction = _unit_vector(rng, 0.3)
    neighbour_radii = shape_array * np.array([0.25, 0.25, 0.35]) * rng.uniform(0.8, 1.2, 3)
    neighbour_center = center + (radii.mean() + neighbour_radii.mean() * rng.uniform(0.7, 1.0)) * neighbour_direction
    neighbour_distance = _ellipsoid_distance(grid, neighbour_center, neighbour_radii, _random_rotation(rng, 0.5))
    neighbour = (neighbour_distance < 1) & outside_wall

    tissue = rng.uniform(40, 80)
    blood = min(230.0, tissue * rng.uniform(1.5, 2.4))
    image = tissue * (1 + 0.2 * _smooth_field(rng, shape, 3.0))  # fibrous/fatty texture of the surroundings
    # The wall is dark only in patches (it is thin and LGE-enhanced in places).
    wall_darkness = np.clip(0.6 + 0.5 * _smooth_field(rng, shape, 4.0), 0, 1) * rng.uniform(0.4, 0.7)
    image[wall] = (tissue * (1 - wall_darkness))[wall]
    blood_texture = 1 + 0.08 * _smooth_field(rng, shape, 2.0)
    image[aorta | neighbour] = (blood * rng.uniform(0.85, 1.15) * blood_texture)[aorta | neighbour]
    image[veins | atrium] = (blood * blood_texture)[veins | atrium]
    image = ndimage.gaussian_filter(image, 0.7) * _bias_field(rng, shape, rng.uniform(0.1, 0.3))
    image += rng.normal(0, rng.uniform(8, 16), shape)
    # The raw LGE data is 8-bit, so the stored z-scores take few distinct values, as in the real files.
    raw = np.clip(np.round(image), 0, 255)
    z_scored = ((raw - raw.mean()) / raw.std()).astype(np.float32)
    return z_scored, label.astype(np.uint8)


def write_la_layout(
    root: str | Path,
    n_train: int = 16,
    n_test: int = 4,
    shape: tuple[int, int, int] = (72, 64, 40),
    seed: int = 0,
    crlf: bool = False,
    lists_in: str = "root",
) -> Path:
    """Write a synthetic LA in the UA-MT layout under ``root`` and return ``root``.

    train.list holds the alphabetically first ``n_train`` IDs in sorted order and test.list the last ``n_test``
    shuffled, as in the real lists. ``lists_in="root"`` is MC-Net/BCP's layout (the loaders' DATA_ROOT is ``root``),
    ``"data_folder"`` is DTC's (lists inside the data folder). ``crlf`` writes FBA-Net's CRLF line endings.
    ``shape`` is (X, Y, Z) for every case; the default is smaller than the 112x112x80 patch, so padding is exercised.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"need at least one training and one test case, got n_train={n_train}, n_test={n_test}")
    if lists_in not in ("root", "data_folder"):
        raise ValueError(f"lists_in must be 'root' (MC-Net/BCP) or 'data_folder' (DTC), got {lists_in!r}")
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be (X, Y, Z) with every size >= 16, got {shape}")
    root = Path(root)
    data_folder = root / LA_DATA_FOLDER
    ids = _la_ids(seed, n_train + n_test)
    for index, case_id in enumerate(ids):
        (data_folder / case_id).mkdir(parents=True, exist_ok=True)
        _write_h5(data_folder / case_id / LA_FILE_NAME, *_la_case(seed, index, tuple(shape)))

    train_ids, test_ids = ids[:n_train], ids[n_train:]
    shuffled = [test_ids[i] for i in _rng(seed, _SPLIT_STREAM, 1).permutation(n_test)]
    if len(shuffled) > 1 and shuffled == test_ids:
        shuffled.reverse()  # the real test.list is not sorted; make sure loaders never rely on it
    lists_folder = root if lists_in == "root" else data_folder
    _write_list(lists_folder / "train.list", train_ids, crlf)
    _write_list(lists_folder / "test.list", shuffled, crlf)
    return root


# ---- Kvasir (endoscopy) --------------------------------------------------------------------------------------------

KVASIR_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
KVASIR_ID_LENGTH = 25  # Kvasir-SEG ids look like cju0qkwl35piu0993l0dewei2


def _kvasir_ids(seed: int, count: int) -> list[str]:
    rng = _rng(seed, _SPLIT_STREAM, 2)
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
    rng = _rng(seed, _KVASIR_FRAME_STREAM, index)
    height = shape[0] + int(rng.integers(-4, 5)) * max(1, shape[0] // 24)
    width = shape[1] + int(rng.integers(-4, 5)) * max(1, shape[1] // 24)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    unit = min(height, width) / 80.0

    center = (height * rng.uniform(0.3, 0.7), width * rng.uniform(0.3, 0.7))
    radius = unit * rng.uniform(8, 20)
    radii = (radius, radius * rng.uniform(0.6, 1.0))
    lumps = tuple((rng.uniform(0.0, 0.15), rng.uniform(0, 2 * math.pi), order) for order in (2, 3, 5))
    polyp_distance = _lumpy_distance(rows, cols, center, radii, rng.uniform(0, math.pi), lumps)
    polyp = polyp_distance < 1

    mucosa = np.array([rng.uniform(0.75, 0.9), rng.uniform(0.35, 0.5), rng.uniform(0.3, 0.45)])
    tint = mucosa * np.array([rng.uniform(1.0, 1.15), rng.uniform(0.6, 0.85), rng.uniform(0.6, 0.95)])
    texture = _smooth_field(rng, (height, width), 2.0 * unit)
    image = mucosa[None, None, :] * (1 + 0.08 * texture[..., None])
    folds = np.abs(np.sin(_smooth_field(rng, (height, width), 8.0 * unit) * 3.0)) < 0.12
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
    ids = _kvasir_ids(seed, n_train + n_val + n_test)
    for index, image_id in enumerate(ids):
        image, mask = _kvasir_frame(seed, index, tuple(shape))
        Image.fromarray(image, "RGB").save(root / "images" / f"{image_id}.jpg", quality=90)
        if mask_format == "jpg":  # Kvasir-SEG's masks are 3-component JPEGs
            Image.fromarray(np.repeat(mask[..., None], 3, axis=2), "RGB").save(root / "masks" / f"{image_id}.jpg", quality=90)
        else:
            Image.fromarray(mask, "L").save(root / "masks" / f"{image_id}.png")
    # Lists last: a folder with lists is one whose files are all there.
    _write_list(root / "train.txt", ids[:n_train])
    _write_list(root / "val.txt", ids[n_train : n_train + n_val])
    _write_list(root / "test.txt", ids[n_train + n_val :])
    return root


# ---- built-in synthetic datasets, generated once into a cache --------------------------------------------------


@dataclass(frozen=True)
class SyntheticDataset:
    """A built-in synthetic dataset: which writer makes it and with what arguments.

    The cache folder is ``<name>-v<version>``: bump ``version`` whenever the generated files change (new
    arguments or a changed drawing), so caches made by older code are not reused.
    """

    writer: Callable[..., Path] | str  # a function or "module:function" (imported on use, no import cycles)
    version: int
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


SYNTHETIC_DATASETS: dict[str, SyntheticDataset] = {
    # 30 patients x 2 frames, 6-9 slices of about 96 x 80: ~300 training slices, 20 val/test volumes.
    "synthetic_acdc": SyntheticDataset(
        write_acdc_layout,
        version=1,
        params=dict(
            n_train_patients=20, n_val_patients=4, n_test_patients=6, slices=(6, 9), shape=(96, 80), seed=0, frames=2
        ),
        description="cardiac short-axis-like slices, 4 classes (RV, Myo, LV), SSL4MIS ACDC layout",
    ),
    # 20 volumes of 72 x 64 x 40, lists at the root (MC-Net/BCP layout).
    "synthetic_la": SyntheticDataset(
        write_la_layout,
        version=1,
        params=dict(n_train=16, n_test=4, shape=(72, 64, 40), seed=0, lists_in="root"),
        description="atrium-like blob among distractors, binary, UA-MT LA layout",
    ),
    # 26 heads of 48 x 56 x 48 (z, y, x), brain-cropped to about 36 x 46 x 34.
    "synthetic_brats": SyntheticDataset(
        "datamodules.synthetic_brats:write_brats_layout",
        version=1,
        params=dict(n_train=16, n_val=4, n_test=6, shape=(48, 56, 48), seed=0, form="h5"),
        description="glioma-like lesions in a brain, flair + whole tumour, SSL4MIS BraTS 2019 h5 layout",
    ),
    # 16 H&E-like tiles of 200 x 200 (10 train, 2 val, 4 test).
    "synthetic_monuseg": SyntheticDataset(
        "datamodules.synthetic_nuclei:write_monuseg_layout",
        version=1,
        params=dict(n_train=10, n_val=2, n_test=4, shape=(200, 200), seed=0, image_suffix=".png"),
        description="H&E-like tiles with nuclei and look-alike cytoplasm, binary, MoNuSeg segmentation layout",
    ),
    # 80 RGB frames of about 88 x 104 with JPEG masks: 60 train / 10 val / 10 test.
    "synthetic_kvasir": SyntheticDataset(
        write_kvasir_layout,
        version=1,
        params=dict(n_train=60, n_val=10, n_test=10, shape=(88, 104), seed=0, mask_format="jpg"),
        description="colonoscopy-like RGB frames with one polyp, binary, Kvasir-SEG layout",
    ),
}


def _writer(dataset: SyntheticDataset) -> Callable[..., Path]:
    if callable(dataset.writer):
        return dataset.writer
    import importlib

    module, function = dataset.writer.split(":")
    return getattr(importlib.import_module(module), function)

CACHE_ENV = "SSL_BENCH_CACHE"
_PARTIAL_MARK = ".partial-"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ssl-medseg-bench").expanduser()


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``path`` (blocking). Yields whether a real lock is held.

    The kernel drops the lock when its holder dies, so a killed generation never blocks the next one.
    """
    if fcntl is None:
        yield False
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_synthetic(name: str, cache_dir: str | Path | None = None) -> Path:
    """The root of the built-in synthetic dataset ``name``, generated on first use.

    Looks in ``cache_dir``, else $SSL_BENCH_CACHE, else ~/.cache/ssl-medseg-bench. Generation writes into a
    temporary sibling folder that is renamed to ``<name>-v<version>`` only when complete, so the final folder
    exists if and only if the dataset is whole. Concurrent callers serialise on a lock file; without locks (or
    if the lock is not honoured, e.g. on some network file systems) the loser of the rename race discards its copy.
    """
    if name not in SYNTHETIC_DATASETS:
        raise unknown_name("synthetic dataset", name, SYNTHETIC_DATASETS)
    dataset = SYNTHETIC_DATASETS[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder_name = f"{name}-v{dataset.version}"
    final = cache / folder_name
    if final.is_dir():
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create the cache folder for synthetic data ({error})",
            where=str(cache),
            fix=f"set {CACHE_ENV} to a writable folder",
        ) from error

    with _exclusive_lock(cache / f"{folder_name}.lock") as locked:
        if final.is_dir():  # another process finished it while this one waited for the lock
            return final
        if locked:
            # Holding the lock means no generation is running, so leftovers are from killed ones.
            for stale in cache.glob(f".{folder_name}{_PARTIAL_MARK}*"):
                shutil.rmtree(stale, ignore_errors=True)
        # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide a shared cache from other users.
        partial = cache / f".{folder_name}{_PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        try:
            _writer(dataset)(partial, **dataset.params)
            try:
                os.rename(partial, final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(partial, ignore_errors=True)  # lost the race: an identical copy is already in place
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return final


__all__ = [
    "CACHE_ENV",
    "LA_DATA_FOLDER",
    "SYNTHETIC_DATASETS",
    "SyntheticDataset",
    "default_cache_dir",
    "ensure_synthetic",
    "write_acdc_layout",
    "write_kvasir_layout",
    "write_la_layout",
]
