"""BraTS 2019 in two forms: SSL4MIS's h5 (flair, whole tumour) and the raw NIfTI download (docs/datasets.md#brats-2019).

SSL4MIS h5 form (``brats``)::

    root/train.txt (250)  val.txt (25)  test.txt (60)        one case ID per line, e.g. BraTS19_TCIA02_370_1
    root/data/<ID>.h5      'image' float32 (Z, Y, X) flair, brain-cropped, clipped and z-scored; 'label' uint8 {0, 1}

Raw NIfTI form (``brats`` reads it too, ``brats_regions`` needs it)::

    root/train.txt  val.txt  test.txt                       the same lists (copy them from SSL4MIS's data/BraTS2019)
    root/**/<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz          e.g. MICCAI_BraTS_2019_Data_Training/HGG/<ID>/...

A raw case is preprocessed on loading as SSL4MIS's ``brats_proprecessing.py`` did for its h5 files
(:func:`preprocess_case`, also used by the converter): arrays in SimpleITK's (z, y, x) order, crop to the
bounding box of the brain (non-zero voxels; the box's upper end is exclusive, as the reference slicing), clip each
modality at its 99.9th percentile, z-score it with the mean/std of its voxels > 0. ``brats`` keeps flair and the
whole tumour (seg > 0); ``brats_regions`` keeps t1, t1ce, t2, flair as four channels and the classes
0 background, 1 NCR/NET, 2 edema, 3 enhancing tumour (seg value 4), scored as the BraTS regions WT = {1, 2, 3},
TC = {1, 3} and ET = {3}. Loading NIfTI on every step is slow: convert once with
``python -m benchmark data convert brats RAW OUT`` for the h5 form.

Protocol (SSL4MIS): labeled = the first 25 ("10 %") or 50 ("20 %") IDs of train.txt, the rest unlabeled; random
rot/flip and 96^3 crops; validation on val.txt, test on test.txt with a 96^3 sliding window, stride 64.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from core.errors import UserError
from datamodules.base import (
    ListedData, SemiSupervisedDataModule, check_files_exist, check_stored_dtypes, read_h5, read_list,
)
from core.spec import DatasetSpec
from datamodules.checks import report
from datamodules.transforms import la_train_transform

MODALITIES = ("t1", "t1ce", "t2", "flair")
SEG = "seg"
RAW_LABELS = (0, 1, 2, 4)  # 1 NCR/NET, 2 edema, 4 enhancing tumour (no 3)
CLIP_QUANTILE = 0.999

BRATS_SPEC = DatasetSpec(
    name="brats",
    spatial_dims=3,
    in_channels=1,
    class_names=("background", "WT"),
    patch_size=(96, 96, 96),
    eval_mode="sliding_window",
    eval_stride=(64, 64, 64),
    spacing=(1.0, 1.0, 1.0),  # "all spacing is 1mm" (SSL4MIS issue #95)
    labeled_counts={0.1: 25, 0.2: 50, 1.0: 250},
    labeled_unit="case",
    # SSL4MIS's 3D training scripts: CE + DiceLoss(2) over both channels.
    dice_include_background=True,
)

BRATS_REGIONS_SPEC = replace(
    BRATS_SPEC,
    name="brats_regions",
    in_channels=len(MODALITIES),
    class_names=("background", "NCR/NET", "edema", "ET"),
    eval_regions=(("WT", (1, 2, 3)), ("TC", (1, 3)), ("ET", (3,))),
)


def brain_box(volumes: Sequence[np.ndarray]) -> tuple[slice, ...]:
    """SSL4MIS ``brain_bbox``: min..max of the non-zero voxels, upper end exclusive (one brain voxel is lost)."""
    brain = np.zeros(volumes[0].shape, bool)
    for volume in volumes:
        brain |= volume != 0
    if not brain.any():
        raise ValueError("the image is empty (no non-zero voxel)")
    box = tuple(slice(int(c.min()), int(c.max())) for c in np.nonzero(brain))
    if any(s.start == s.stop for s in box):
        raise ValueError("the brain is one voxel thin along an axis, so the (exclusive) crop is empty")
    return box


def clip_and_zscore(volume: np.ndarray) -> np.ndarray:
    """Clip at the 99.9th percentile, then z-score with the voxels > 0 (SSL4MIS ``MedicalImageDeal`` +
    ``itensity_normalize_one_volume``). The reference takes the first histogram value whose CDF reaches 0.999;
    for integer images (BraTS stores int16) skimage's histogram has one bin per value, which is numpy's
    ``inverted_cdf`` quantile."""
    volume = volume.astype(np.float64)
    ceiling = np.quantile(volume, CLIP_QUANTILE, method="inverted_cdf")
    volume = np.clip(volume, volume.min(), ceiling)
    foreground = volume[volume > 0]
    if foreground.size == 0 or foreground.std() == 0:
        raise ValueError("no varying voxels > 0 to normalise with")
    return ((volume - foreground.mean()) / foreground.std()).astype(np.float32)


def preprocess_case(volumes: dict[str, np.ndarray], seg: np.ndarray, modalities: Sequence[str], regions: bool):
    """Raw arrays in (z, y, x) -> (image, label): image (Z, Y, X) for one modality, (Z, Y, X, C) for several.

    The brain box is that of flair for the single-modality form (exactly SSL4MIS) and of the union of the used
    modalities otherwise. Labels: whole tumour {0, 1}, or with ``regions`` {0, 1, 2, 3} (seg 4 -> 3).
    """
    box = brain_box([volumes[m] for m in modalities])
    channels = [clip_and_zscore(volumes[m][box]) for m in modalities]
    image = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
    label = np.asarray(seg)[box]
    if regions:
        label = np.where(label == 4, 3, label).astype(np.uint8)
    else:
        label = (label > 0).astype(np.uint8)
    return image, label


def read_nifti_zyx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI volume as a (z, y, x) array (SimpleITK's order, that of the SSL4MIS files) and its affine."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises several types for truncated / non-NIfTI files
        raise UserError(f"cannot read NIfTI file ({type(error).__name__}: {error})", where=str(path),
                        fix="the file is corrupt or truncated: copy it again") from error
    return np.ascontiguousarray(np.transpose(data, (2, 1, 0))), image.affine


class BraTSDataModule(SemiSupervisedDataModule):
    """Both forms; which one is read is decided by the folder (``data/`` with h5 files, else NIfTI case folders)."""

    _case_folders: dict[str, Path] = {}  # raw form: case ID -> its folder, found by read_split

    @property
    def modalities(self) -> tuple[str, ...]:
        return MODALITIES if self.spec.in_channels == len(MODALITIES) else ("flair",)

    @property
    def regions(self) -> bool:
        return self.spec.eval_regions is not None

    @property
    def form(self) -> str:
        return "h5" if (self.root / "data").is_dir() else "nifti"

    def read_split(self):
        lists = {split: read_list(self.root / f"{split}.txt", what) for split, what in
                 (("train", "training"), ("val", "validation"), ("test", "test"))}
        if self.form == "h5":
            if self.spec.in_channels != 1 or self.regions:
                report(UserError(
                    f"{self.spec.name} needs the raw NIfTI form; the SSL4MIS h5 files hold flair and the whole tumour only",
                    where=str(self.root / "data"),
                    fix="point DATA_ROOT at the raw BraTS folder (with the three .txt lists), or use DATASET=brats",
                ))
            for split, ids in lists.items():
                check_files_exist([self.h5_path(i) for i in ids], self.root / f"{split}.txt")
        else:
            self._case_folders = {path.parent.name: path.parent for path in self.root.rglob(f"*_{SEG}.nii.gz")}
            if not self._case_folders:
                report(UserError(
                    "no BraTS case found: neither data/<ID>.h5 (SSL4MIS form) nor <ID>/<ID>_seg.nii.gz (raw NIfTI form)",
                    where=str(self.root),
                    fix="DATA_ROOT is the folder holding train.txt/val.txt/test.txt and data/ or the case folders",
                ))
            for split, ids in lists.items():
                check_files_exist([self.nifti_path(i, kind) for i in ids for kind in (*self.modalities, SEG)],
                                  self.root / f"{split}.txt")
        units = [(case, [case]) for case in lists["train"]]
        return ListedData(units, lists["val"], lists["test"], listed_units=len(units))

    def h5_path(self, case_id: str) -> Path:
        return self.root / "data" / f"{case_id}.h5"

    def nifti_path(self, case_id: str, kind: str) -> Path:
        folder = self._case_folders.get(case_id, self.root / case_id)
        return folder / f"{case_id}_{kind}.nii.gz"

    def describe(self, kind: str, name: str) -> str:
        return str(self.h5_path(name) if self.form == "h5" else self.nifti_path(name, SEG).parent)

    def read_case(self, case_id: str, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(image, label) with the image (Z, Y, X) or (Z, Y, X, C), whichever the form."""
        if self.form == "h5":
            arrays = read_h5(self.h5_path(case_id), ["image", "label"] if with_label else ["image"])
            return arrays["image"], arrays.get("label")
        volumes = {m: read_nifti_zyx(self.nifti_path(case_id, m))[0] for m in self.modalities}
        seg, _ = read_nifti_zyx(self.nifti_path(case_id, SEG))
        unknown = sorted({int(v) for v in np.unique(seg)} - set(RAW_LABELS))
        if unknown:
            raise UserError(f"seg has values {unknown}; BraTS labels are 0, 1, 2 and 4", where=str(self.nifti_path(case_id, SEG)),
                            fix="re-download the case: the seg file is not a BraTS 2019 label map")
        shapes = {m: v.shape for m, v in volumes.items()} | {SEG: seg.shape}
        if len(set(shapes.values())) > 1:
            raise UserError(f"the modalities and seg differ in shape: {shapes}", where=str(self.nifti_path(case_id, SEG).parent),
                            fix="BraTS cases are co-registered 240x240x155 volumes: re-download the case")
        try:
            return preprocess_case(volumes, seg, self.modalities, self.regions)
        except ValueError as error:
            raise UserError(f"cannot preprocess the case: {error}", where=str(self.nifti_path(case_id, SEG).parent),
                            fix="the images should be skull-stripped brains with zeros outside") from error

    def load_item(self, item, with_label):
        return self.read_case(item, with_label)

    def train_transform(self, rng: np.random.Generator, image, label):
        # SSL4MIS BraTS: RandomRotFlip then RandomCrop(96^3), the LA pipeline of UA-MT.
        return la_train_transform(rng, image, label, self.patch_size)

    def load_case(self, case_id):
        image, label = self.read_case(case_id)
        if image.ndim == 4:
            image = np.moveaxis(image, -1, 0)  # cases are channel-first for the sliding window
        return {"case": case_id, "image": image, "label": label, "spacing": self.spec.spacing}

    def check_sample(self, kind, name, image, label, checks):
        if self.form == "h5":
            check_stored_dtypes(image, label, self.describe(kind, name), checks)
