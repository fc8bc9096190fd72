"""Synthetic BraTS 2019 cases in both on-disk forms: the raw NIfTI download and SSL4MIS's h5 files.

Each case is a skull-stripped head: an irregular brain with ventricles, and a glioma of three parts with the
BraTS labels 1 (necrotic / non-enhancing core), 2 (oedema) and 4 (enhancing rim), drawn in four MR contrasts
(t1, t1ce, t2, flair) stored as int16 with zeros outside the brain, as the real files. Oedema is bright in flair
and t2, the rim enhances in t1ce, the core is dark in t1; a bright but unlabelled flair lesion appears in some
cases, so whole-tumour segmentation is more than thresholding flair. The h5 form is made from the raw arrays by
the very preprocessing of SSL4MIS (datamodules/brats.py ``preprocess_case``): crop, clip, z-score.

Layouts (docs/datasets.md#brats-2019)::

    nifti: root/MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz + root/{train,val,test}.txt
    h5:    root/data/<ID>.h5 ('image' float32 (Z, Y, X), 'label' uint8 {0, 1}) + root/{train,val,test}.txt
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.brats import MODALITIES, SEG, preprocess_case
from datamodules.synthetic_drawing import bias_field, ellipsoid_distance, random_rotation, seeded_rng, smooth_field
from datamodules.synthetic_files import write_h5, write_list

RAW_FOLDER = "MICCAI_BraTS_2019_Data_Training"
SITES = ("TCIA01", "TCIA02", "TCIA03", "TCIA04", "TCIA05", "TCIA06", "TCIA08", "TCIA10", "TCIA12", "TCIA13", "CBICA", "2013")
_IDS_STREAM, _CASE_STREAM = 11, 12


def brats_ids(seed: int, count: int) -> list[str]:
    """Distinct IDs like the real ones: BraTS19_<site>_<3 letters or digits>_1."""
    rng = seeded_rng(seed, _IDS_STREAM)
    ids: dict[str, None] = {}
    while len(ids) < count:
        site = SITES[int(rng.integers(len(SITES)))]
        code = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, 3)) if site == "CBICA" else str(int(rng.integers(100, 700)))
        ids[f"BraTS19_{site}_{code}_1"] = None
    return list(ids)


def brats_raw_case(seed: int, index: int, shape: tuple[int, int, int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The four contrasts (int16, zeros outside the brain) and the seg (uint8 {0, 1, 2, 4}), all (z, y, x)."""
    rng = seeded_rng(seed, _CASE_STREAM, index)
    size = np.asarray(shape, dtype=np.float64)
    grid = np.indices(shape, dtype=np.float64)
    center = size / 2 + rng.normal(0, 0.02, 3) * size
    brain_distance = ellipsoid_distance(grid, center, size * np.array([0.4, 0.42, 0.36]), random_rotation(rng, 0.1))
    brain_distance *= 1 + 0.05 * smooth_field(rng, shape, min(shape) / 5)
    brain = brain_distance < 1
    ventricles = np.zeros(shape, bool)
    for side in (-1, 1):
        offset = np.array([0.0, 0.0, side * 0.07]) * size
        ventricles |= ellipsoid_distance(grid, center + offset, size * np.array([0.12, 0.18, 0.04]), np.eye(3)) < 1

    # The tumour sits off-centre inside the brain: core (necrosis + enhancing rim) inside a larger oedema.
    direction = rng.normal(0, 1, 3)
    direction /= np.linalg.norm(direction)
    tumour_center = center + direction * size * rng.uniform(0.08, 0.18)
    core_radius = min(shape) * rng.uniform(0.07, 0.13)
    rotation = random_rotation(rng, np.pi)
    core_distance = ellipsoid_distance(grid, tumour_center, core_radius * rng.uniform(0.8, 1.2, 3), rotation)
    core_distance *= 1 + 0.15 * smooth_field(rng, shape, min(shape) / 8)
    oedema_distance = ellipsoid_distance(grid, tumour_center, core_radius * rng.uniform(1.6, 2.4, 3), rotation)
    oedema_distance *= 1 + 0.25 * smooth_field(rng, shape, min(shape) / 8)
    low_grade = rng.random() < 0.3  # LGG: often no enhancing rim
    seg = np.zeros(shape, np.uint8)
    seg[(oedema_distance < 1) & brain] = 2
    core = (core_distance < 1) & brain
    seg[core] = 1
    if not low_grade:
        seg[core & (core_distance > rng.uniform(0.55, 0.75))] = 4

    # A flair-bright, unlabelled lesion (a vascular or post-treatment change) in some cases.
    mimic = np.zeros(shape, bool)
    if rng.random() < 0.5:
        mimic_center = center - direction * size * rng.uniform(0.12, 0.2)
        mimic = (ellipsoid_distance(grid, mimic_center, (min(shape) * rng.uniform(0.04, 0.07),) * 3, np.eye(3)) < 1) & brain

    #                     tissue  csf   oedema  necrosis  rim   mimic
    contrasts = {
        "t1":    (520, 180, 420, 260, 470, 500),
        "t1ce":  (540, 190, 440, 250, 980, 530),
        "t2":    (420, 1100, 850, 950, 700, 600),
        "flair": (380, 90, 820, 520, 640, 760),
    }
    volumes = {}
    for modality in MODALITIES:
        tissue, csf, oedema, necrosis, rim, mimic_value = (value * rng.uniform(0.85, 1.15) for value in contrasts[modality])
        image = tissue * (1 + 0.08 * smooth_field(rng, shape, 2.0))
        image[ventricles] = csf
        image[seg == 2] = oedema * (1 + 0.08 * smooth_field(rng, shape, 2.0))[seg == 2]
        image[seg == 1] = necrosis
        image[seg == 4] = rim
        image[mimic] = mimic_value
        image = image * bias_field(rng, shape, 0.15) + rng.normal(0, 0.03 * tissue, shape)
        volumes[modality] = np.where(brain, np.clip(np.round(image), 1, 32767), 0).astype(np.int16)
    seg[~brain] = 0
    return volumes, seg


def write_brats_layout(
    root: str | Path,
    n_train: int = 16,
    n_val: int = 4,
    n_test: int = 6,
    shape: tuple[int, int, int] = (48, 56, 48),
    seed: int = 0,
    form: str = "h5",
) -> Path:
    """Write a synthetic BraTS 2019 under ``root`` in the ``form`` "h5" (SSL4MIS) or "nifti" (raw download).

    ``shape`` is the raw (z, y, x) volume; the h5 images are the brain-cropped, slightly smaller arrays.
    """
    if min(n_train, n_val, n_test) < 1:
        raise ValueError(f"every split needs a case, got {n_train} train, {n_val} val, {n_test} test")
    if form not in ("h5", "nifti"):
        raise ValueError(f"form must be 'h5' or 'nifti', got {form!r}")
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be (z, y, x) with every size >= 16, got {shape}")
    import nibabel as nib

    root = Path(root)
    ids = brats_ids(seed, n_train + n_val + n_test)
    for index, case_id in enumerate(ids):
        volumes, seg = brats_raw_case(seed, index, tuple(shape))
        if form == "h5":
            (root / "data").mkdir(parents=True, exist_ok=True)
            write_h5(root / "data" / f"{case_id}.h5", *preprocess_case(volumes, seg, ("flair",), regions=False))
            continue
        grade = "LGG" if not (seg == 4).any() else "HGG"
        folder = root / RAW_FOLDER / grade / case_id
        folder.mkdir(parents=True, exist_ok=True)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS NIfTI: 1 mm, LPS-like sign flips on x and y
        for kind, array in {**volumes, SEG: seg}.items():
            # NIfTI stores (x, y, z); the suite's arrays are (z, y, x) like SimpleITK's.
            nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine), folder / f"{case_id}_{kind}.nii.gz")
    # SSL4MIS's lists are in a random order (not sorted); the first 25/50 of train.txt are the labeled cases.
    write_list(root / "train.txt", ids[:n_train])
    write_list(root / "val.txt", ids[n_train : n_train + n_val])
    write_list(root / "test.txt", ids[n_train + n_val :])
    return root
