"""A synthetic LA in the UA-MT layout (docs/datasets.md), read by the same loaders as the real data::

    root/2018LA_Seg_Training Set/<20-char ID>/mri_norm2.h5   'image' float32 (X, Y, Z) z-scored, 'label' uint8 {0, 1}
    root/train.list  test.list          (or inside the data folder: DTC's layout)

The volumes are drawn, not derived from real data: an atrium-like blob with a thin, patchy wall among look-alike
neighbours as bright as it (aorta, ventricle), so the wall and the shapes separate them, not the intensity.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from datamodules.synthetic_drawing import (
    SPLIT_STREAM,
    bias_field,
    ellipsoid_distance,
    random_rotation,
    seeded_rng,
    smooth_field,
)
from datamodules.synthetic_files import write_h5, write_list

# The real folder name, with its space (docs/datasets.md#la-files). Stated here rather than imported from
# datamodules.la so that the writer describes the format on its own; a test checks that the two agree.
LA_DATA_FOLDER = "2018LA_Seg_Training Set"
LA_FILE_NAME = "mri_norm2.h5"
LA_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
LA_ID_LENGTH = 20
_LA_CASE_STREAM = 3


def _la_ids(seed: int, count: int) -> list[str]:
    """Distinct 20-character uppercase alphanumeric IDs, like the challenge's case folders."""
    rng = seeded_rng(seed, SPLIT_STREAM)
    ids: set[str] = set()
    while len(ids) < count:
        ids.add("".join(LA_ID_ALPHABET[i] for i in rng.integers(0, len(LA_ID_ALPHABET), LA_ID_LENGTH)))
    return sorted(ids)


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
    rng = seeded_rng(seed, _LA_CASE_STREAM, index)
    shape_array = np.asarray(shape, dtype=np.float64)
    grid = np.indices(shape, dtype=np.float64)

    # The atrium: an irregular ellipsoid filling the middle of the crop (the real crops are cut around it).
    center = shape_array / 2 + rng.normal(0, 0.04, 3) * shape_array
    radii = shape_array * np.array([0.27, 0.27, 0.3]) * rng.uniform(0.8, 1.1, 3)
    distance = ellipsoid_distance(grid, center, radii, random_rotation(rng, 0.35))
    # Lumpy surface: the distance is modulated by a smooth field, so the boundary bulges in and out by ~15 %.
    distance *= 1 + 0.12 * smooth_field(rng, shape, min(shape) / 6)
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
    neighbour_distance = ellipsoid_distance(grid, neighbour_center, neighbour_radii, random_rotation(rng, 0.5))
    neighbour = (neighbour_distance < 1) & outside_wall

    tissue = rng.uniform(40, 80)
    blood = min(230.0, tissue * rng.uniform(1.5, 2.4))
    image = tissue * (1 + 0.2 * smooth_field(rng, shape, 3.0))  # fibrous/fatty texture of the surroundings
    # The wall is dark only in patches (it is thin and LGE-enhanced in places).
    wall_darkness = np.clip(0.6 + 0.5 * smooth_field(rng, shape, 4.0), 0, 1) * rng.uniform(0.4, 0.7)
    image[wall] = (tissue * (1 - wall_darkness))[wall]
    blood_texture = 1 + 0.08 * smooth_field(rng, shape, 2.0)
    image[aorta | neighbour] = (blood * rng.uniform(0.85, 1.15) * blood_texture)[aorta | neighbour]
    image[veins | atrium] = (blood * blood_texture)[veins | atrium]
    image = ndimage.gaussian_filter(image, 0.7) * bias_field(rng, shape, rng.uniform(0.1, 0.3))
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
        write_h5(data_folder / case_id / LA_FILE_NAME, *_la_case(seed, index, tuple(shape)))

    train_ids, test_ids = ids[:n_train], ids[n_train:]
    shuffled = [test_ids[i] for i in seeded_rng(seed, SPLIT_STREAM, 1).permutation(n_test)]
    if len(shuffled) > 1 and shuffled == test_ids:
        shuffled.reverse()  # the real test.list is not sorted; make sure loaders never rely on it
    lists_folder = root if lists_in == "root" else data_folder
    write_list(lists_folder / "train.list", train_ids, crlf)
    write_list(lists_folder / "test.list", shuffled, crlf)
    return root
