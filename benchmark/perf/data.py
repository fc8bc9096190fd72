"""The data the perf sections run on: the real ACDC copy and generated LA-sized volumes (no LA copy here)."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ACDC = REPO_ROOT.parent / "shared" / "datasets" / "ACDC"
# A typical LA crop of the UA-MT h5 files (X, Y, Z); the real volumes range ~(130-210, 110-170, 80-90).
LA_SIZED_SHAPE = (200, 150, 88)


def acdc_root(root: Path | None) -> Path:
    root = Path(root) if root else DEFAULT_ACDC
    if not (root / "test.list").is_file():
        raise UserError("the real ACDC copy is needed for make perf", where=str(root), fix="pass --acdc-root /path/to/ACDC")
    return root


def acdc_test_labels(root: Path, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    names = [line.strip() for line in (root / "test.list").read_text().splitlines() if line.strip()][:limit]
    cases = []
    for name in names:
        with h5py.File(root / "data" / f"{name}.h5", "r") as file:
            cases.append((name, file["label"][()]))
    return cases


def perturbed_acdc_prediction(gt: np.ndarray) -> np.ndarray:
    """A plausible prediction without a trained model: RV dilated, myocardium eroded in-plane, LV shifted."""
    pred = np.zeros_like(gt)
    pred[ndimage.binary_dilation(gt == 1)] = 1
    in_plane_cross = ndimage.generate_binary_structure(3, 1) & (np.arange(3) == 1)[:, None, None]
    pred[ndimage.binary_erosion(gt == 2, structure=in_plane_cross)] = 2
    pred[ndimage.shift(gt == 3, (1, 3, -2), order=0, mode="constant", cval=False)] = 3
    return pred


def write_la_sized(root: Path, n_train: int = 6, n_test: int = 2, shape=LA_SIZED_SHAPE) -> Path:
    """The synthetic LA generator at the real volumes' size, in the UA-MT layout (so the real loader reads it)."""
    from datamodules.synthetic_la import write_la_layout

    if not (root / "train.list").is_file():
        write_la_layout(root, n_train=n_train, n_test=n_test, shape=tuple(shape), seed=0)
    return root


def la_cases(root: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from datamodules.la import DATA_FOLDER

    cases = []
    for list_name in ("train.list", "test.list"):
        for case in (root / list_name).read_text().split():
            with h5py.File(root / DATA_FOLDER / case / "mri_norm2.h5", "r") as file:
                cases.append((case, file["image"][()], file["label"][()]))
    return cases


def perturbed_la_prediction(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible 3-D prediction: the boundary moved in and out by a smooth random field (~2.5 voxels) and three
    small stray blobs anywhere in the volume (they make the union's bounding box large, as real errors do)."""
    gt = gt != 0
    signed = ndimage.distance_transform_edt(gt) - ndimage.distance_transform_edt(~gt)
    field = ndimage.gaussian_filter(rng.normal(size=gt.shape), 4)
    pred = signed + 2.5 * field / field.std() > 0
    grid = np.ogrid[tuple(slice(0, size) for size in gt.shape)]
    for _ in range(3):
        centre = rng.uniform(0, gt.shape)
        pred |= sum((axis - c) ** 2 for axis, c in zip(grid, centre)) <= rng.uniform(2, 5) ** 2
    return pred


# The raw LA challenge volumes (X, Y, Z) before UA-MT's crop: the atrium fills a small part of them.
LA_RAW_SHAPE = (576, 576, 88)
# A half-trained network's scattered false positives: this fraction of the volume, each voxel its own component.
SCATTERED_FP_FRACTION = 0.0005


def scattered_fp_la_case(crop_label: np.ndarray, rng: np.random.Generator, shape=LA_RAW_SHAPE,
                         fp_fraction: float = SCATTERED_FP_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, ground truth) as uint8 label maps of ``shape``: an LA crop's label placed in the middle of the
    raw volume, predicted with a moved boundary (``perturbed_la_prediction``) plus ``fp_fraction`` of the volume
    as isolated single false-positive voxels scattered anywhere.

    The stray voxels sit on a stride-2 lattice and one voxel away from the prediction, so none touches another or
    the atrium (each is its own component under full connectivity) and every one is a surface voxel: the case that
    makes surface distances expensive (the union's bounding box is the whole volume).
    """
    shape = tuple(shape)
    if any(c > s for c, s in zip(crop_label.shape, shape)):
        raise ValueError(f"the crop {crop_label.shape} does not fit in the volume {shape}")
    offset = tuple((s - c) // 2 for s, c in zip(shape, crop_label.shape))
    where = tuple(slice(o, o + c) for o, c in zip(offset, crop_label.shape))
    gt = np.zeros(shape, np.uint8)
    gt[where] = crop_label != 0
    pred = np.zeros(shape, np.uint8)
    pred[where] = perturbed_la_prediction(crop_label, rng)

    lattice = np.zeros(shape, bool)
    lattice[::2, ::2, ::2] = True
    lattice[where] &= ~ndimage.binary_dilation(pred[where] != 0, ndimage.generate_binary_structure(3, 3))
    candidates = np.flatnonzero(lattice)
    count = min(len(candidates), round(fp_fraction * gt.size))
    pred.ravel()[rng.choice(candidates, size=count, replace=False)] = 1
    return pred, gt
