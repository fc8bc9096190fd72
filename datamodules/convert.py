"""Converters from the raw public downloads to the canonical forms the suite trains on
(``python -m benchmark data convert KIND SOURCE TARGET``).

- ``la``: 2018 Atrial Segmentation Challenge ``<ID>/lgemri.nrrd`` + ``laendo.nrrd`` -> the UA-MT h5 form, with
  UA-MT's ``la_heart_processing.py`` preprocessing: label = (laendo == 255); z-score over the whole uncropped volume;
  in-plane crop around the ground-truth box with a random margin of 10..19 voxels per side, widened (by half the
  shortfall per side) where the box is narrower than 112; z is not cropped (the reference computes a z range and
  never uses it). The margins are random in the reference too (unseeded), so converted files match the distributed
  ones in preprocessing, not byte for byte; ``--seed`` makes them reproducible.
- ``acdc``: ACDC ``database/training/patientNNN/`` (Info.cfg, frame NIfTI + _gt) -> the SSL4MIS h5 form: the two
  labelled frames renamed frame01 (the lower frame number, normally ED) and frame02; per-volume min-max to [0, 1];
  volumes ``data/<patient>_frame0F.h5`` for every patient, slices ``data/slices/<volume>_slice_<1..Z>.h5`` for the
  training patients; the published val/test patients (docs/datasets.md#acdc), the other patients train. The published
  train_slices.list order (a random patient order) cannot be derived: it is drawn with ``--seed``; copy SSL4MIS's
  list files over the written ones to get the published labeled subsets exactly (the names agree).
- ``brats``: BraTS 2019 NIfTI case folders -> the SSL4MIS h5 form (flair, whole tumour; datamodules/brats.py
  ``preprocess_case``). The lists are copied from the source when it has train.txt/val.txt/test.txt.

Every output h5 keeps ``image`` and ``label`` as the published files and adds provenance as attributes: the voxel
spacing in the array's axis order, the source's direction/affine and origin, the crop box and the source file.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from core.errors import UserError
from datamodules.brats import SEG, brain_box, preprocess_case, read_nifti_zyx

LA_OUTPUT_SIZE = (112, 112, 80)
ACDC_VAL_PATIENTS = (2, 19, 28, 30, 39, 45, 78, 82, 85, 87)
ACDC_TEST_PATIENTS = (1, 7, 8, 11, 13, 22, 24, 33, 52, 59, 64, 65, 66, 68, 75, 80, 81, 83, 84, 93)


@dataclass(frozen=True)
class Converter:
    function: Callable[..., Path]
    dataset: str  # the dataset name whose layout the output has (for `data verify`)
    help: str

    def run(self, source, target, seed: int = 0) -> Path:
        source, target = Path(source), Path(target)
        if not source.is_dir():
            raise UserError("the raw data folder does not exist", where=str(source), fix="give the folder of the raw download")
        if target.exists() and any(target.iterdir()):
            raise UserError("the output folder is not empty", where=str(target),
                            fix="give a new or empty folder (converters never overwrite data)")
        target.mkdir(parents=True, exist_ok=True)
        return self.function(source, target, seed=seed)


def write_h5(path: Path, image: np.ndarray, label: np.ndarray, **attributes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("label", data=label, compression="gzip")
        for key, value in attributes.items():
            f.attrs[key] = value


def write_list(path: Path, names: list[str]) -> None:
    path.write_bytes("".join(f"{name}\n" for name in names).encode("ascii"))


def read_sitk(path: Path):
    """(array in SimpleITK's (z, y, x) order, the image) of a medical image file; unreadable = UserError."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise UserError(f"cannot read image ({str(error).strip().splitlines()[-1]})", where=str(path),
                        fix="the file is corrupt or truncated: copy it again") from error
    return sitk.GetArrayFromImage(image), image


def geometry(image, reverse: bool) -> dict:
    """Spacing, origin and direction of a SimpleITK image; spacing in the array's axis order."""
    spacing = tuple(image.GetSpacing())
    return {"spacing": spacing[::-1] if reverse else spacing, "origin": tuple(image.GetOrigin()),
            "direction": tuple(image.GetDirection())}


# ---- LA ---------------------------------------------------------------------------------------------------------
def ua_mt_crop(label: np.ndarray, rng: np.random.Generator) -> tuple[slice, slice]:
    """UA-MT's in-plane crop box around the label (x, y axes of an (x, y, z) array)."""
    box = []
    for axis in (0, 1):
        nonzero = np.nonzero(label.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        low, high = int(nonzero.min()), int(nonzero.max())
        widen = max(LA_OUTPUT_SIZE[axis] - (high - low), 0) // 2
        start = max(low - int(rng.integers(10, 20)) - widen, 0)
        stop = min(high + int(rng.integers(10, 20)) + widen, label.shape[axis])
        box.append(slice(start, stop))
    return box[0], box[1]


def convert_la(source: Path, target: Path, seed: int = 0) -> Path:
    from datamodules.la import DATA_FOLDER

    folder = source / DATA_FOLDER if (source / DATA_FOLDER).is_dir() else source
    cases = sorted(p.parent.name for p in folder.glob("*/lgemri.nrrd"))
    if not cases:
        raise UserError("no <ID>/lgemri.nrrd found", where=str(folder),
                        fix=f"give the challenge's '{DATA_FOLDER}' folder (or its parent)")
    rng = np.random.default_rng(seed)
    for case in cases:
        image_zyx, image = read_sitk(folder / case / "lgemri.nrrd")
        label_zyx, _ = read_sitk(folder / case / "laendo.nrrd")
        # nrrd.read (UA-MT) gives (x, y, z); SimpleITK's arrays are (z, y, x).
        volume, label = image_zyx.transpose(2, 1, 0), (label_zyx.transpose(2, 1, 0) == 255).astype(np.uint8)
        if volume.shape != label.shape or not label.any():
            raise UserError(f"laendo.nrrd is empty or not the size of lgemri.nrrd ({label.shape} vs {volume.shape})",
                            where=str(folder / case), fix="re-download the case")
        normalised = ((volume - volume.mean()) / volume.std()).astype(np.float32)  # over the uncropped volume
        box_x, box_y = ua_mt_crop(label, rng)
        write_h5(target / DATA_FOLDER / case / "mri_norm2.h5", normalised[box_x, box_y], label[box_x, box_y],
                 crop=(box_x.start, box_x.stop, box_y.start, box_y.stop, 0, volume.shape[2]),
                 source=str(folder / case / "lgemri.nrrd"), **geometry(image, reverse=False))
    # The published split: the alphabetically first 80 of the 100 IDs train, the last 20 test.
    cut = 80 if len(cases) == 100 else round(0.8 * len(cases))
    write_list(target / "train.list", cases[:cut])
    write_list(target / "test.list", cases[cut:])
    return target


# ---- ACDC -------------------------------------------------------------------------------------------------------
def read_info(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise UserError("missing Info.cfg", where=str(path), fix="each ACDC patient folder has Info.cfg (ED/ES frames)")
    return dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)


def convert_acdc(source: Path, target: Path, seed: int = 0) -> Path:
    folder = next((f for f in (source / "database" / "training", source / "training", source) if list(f.glob("patient*/Info.cfg"))), None)
    if folder is None:
        raise UserError("no patientNNN/Info.cfg found", where=str(source),
                        fix="give ACDC's database/training folder (or the folder holding it)")
    patients = sorted(p.parent.name for p in folder.glob("patient*/Info.cfg"))
    rng = np.random.default_rng(seed)
    train_volumes: dict[str, list[str]] = {}
    split_volumes: dict[str, list[str]] = {"val": [], "test": []}
    for patient in patients:
        info = read_info(folder / patient / "Info.cfg")
        frames = sorted(int(info[key].strip()) for key in ("ED", "ES"))
        number = int(patient[len("patient"):])
        split = "val" if number in ACDC_VAL_PATIENTS else "test" if number in ACDC_TEST_PATIENTS else "train"
        for new_index, frame in enumerate(frames, start=1):
            stem = f"{patient}_frame{frame:02d}"
            image_array, image = read_sitk(folder / patient / f"{stem}.nii.gz")
            label_array, _ = read_sitk(folder / patient / f"{stem}_gt.nii.gz")
            low, high = float(image_array.min()), float(image_array.max())
            volume = ((image_array - low) / (high - low)).astype(np.float32)  # per-volume min-max (SSL4MIS)
            label = label_array.astype(np.uint8)
            name = f"{patient}_frame{new_index:02d}"  # renumbered as in the distributed files (SSL4MIS issue #14)
            attributes = dict(source=str(folder / patient / f"{stem}.nii.gz"), source_frame=frame, **geometry(image, reverse=True))
            write_h5(target / "data" / f"{name}.h5", volume, label, **attributes)
            if split == "train":
                for z in range(volume.shape[0]):
                    write_h5(target / "data" / "slices" / f"{name}_slice_{z + 1}.h5", volume[z], label[z], **attributes)
                train_volumes.setdefault(patient, []).append(name)
            else:
                split_volumes[split].append(name)
    order = [list(train_volumes)[i] for i in rng.permutation(len(train_volumes))]
    slice_names = []
    for patient in order:
        for name in train_volumes[patient]:
            depth = len(list((target / "data" / "slices").glob(f"{name}_slice_*.h5")))
            slice_names += [f"{name}_slice_{z + 1}" for z in rng.permutation(depth)]
    write_list(target / "train_slices.list", slice_names)
    write_list(target / "train.list", [name for patient in order for name in train_volumes[patient]])
    write_list(target / "val.list", split_volumes["val"])
    write_list(target / "test.list", split_volumes["test"])
    return target


# ---- BraTS ------------------------------------------------------------------------------------------------------
def convert_brats(source: Path, target: Path, seed: int = 0) -> Path:
    folders = {p.parent.name: p.parent for p in source.rglob(f"*_{SEG}.nii.gz")}
    if not folders:
        raise UserError("no BraTS case folders (<ID>/<ID>_seg.nii.gz) found", where=str(source),
                        fix="give the MICCAI_BraTS_2019_Data_Training folder (or the folder holding it)")
    for case, folder in sorted(folders.items()):
        flair, affine = read_nifti_zyx(folder / f"{case}_flair.nii.gz")
        seg, _ = read_nifti_zyx(folder / f"{case}_{SEG}.nii.gz")
        box = brain_box([flair])
        image, label = preprocess_case({"flair": flair}, seg, ("flair",), regions=False)
        spacing_xyz = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        write_h5(target / "data" / f"{case}.h5", image, label, spacing=tuple(spacing_xyz[::-1]), affine=np.asarray(affine),
                 crop=tuple(v for s in box for v in (s.start, s.stop)), source=str(folder / f"{case}_flair.nii.gz"))
    for name in ("train.txt", "val.txt", "test.txt"):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    missing = [n for n in ("train.txt", "val.txt", "test.txt") if not (target / n).is_file()]
    if missing:
        print(f"note: {', '.join(missing)} not in the source: copy SSL4MIS's data/BraTS2019 lists into {target}")
    return target


CONVERTERS: dict[str, Converter] = {
    "la": Converter(convert_la, "la", "LA challenge <ID>/lgemri.nrrd + laendo.nrrd -> UA-MT h5"),
    "acdc": Converter(convert_acdc, "acdc", "ACDC database/training NIfTI -> SSL4MIS h5 slices and volumes"),
    "brats": Converter(convert_brats, "brats", "BraTS 2019 NIfTI case folders -> SSL4MIS h5 (flair, whole tumour)"),
}
