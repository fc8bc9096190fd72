"""ACDC in the SSL4MIS h5 form: 2D training on slices, evaluation of whole volumes slice by slice.

Layout (docs/datasets.md#acdc-files)::

    root/train_slices.list  train.list  val.list  test.list
    root/data/slices/<patientNNN_frameFF_slice_S>.h5   'image' float32 (H, W), 'label' uint8 (H, W)
    root/data/<patientNNN_frameFF>.h5                  'image' float32 (Z, H, W), 'label' uint8 (Z, H, W)

Labeled units are patients: the first N patients of train_slices.list (the list is grouped by patient), which
is SSL4MIS's "first k slices" with k = patients_to_slices(N), computed from the list rather than hard-coded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import (
    ListedData, SemiSupervisedDataModule, check_files_exist, check_stored_dtypes, read_h5, read_list,
)
from core.spec import DatasetSpec
from datamodules.listing import patient_of
from datamodules.transforms import acdc_train_transform

ACDC_SPEC = DatasetSpec(
    name="acdc",
    spatial_dims=2,
    in_channels=1,
    class_names=("background", "RV", "Myo", "LV"),
    patch_size=(256, 256),
    eval_mode="slicewise",
    # The 3/7/14 patient convention of SSL4MIS, MC-Net, SS-Net and BCP ("5/10/20 %" of 70).
    labeled_counts={0.05: 3, 0.1: 7, 0.2: 14, 1.0: 70},
    labeled_unit="patient",
    dice_include_background=True,
)


class ACDCDataModule(SemiSupervisedDataModule):
    def read_split(self):
        slices_list = self.root / "train_slices.list"
        slice_names = read_list(slices_list, "training slices")
        val_cases = read_list(self.root / "val.list", "validation")
        test_cases = read_list(self.root / "test.list", "test")
        check_files_exist([self.slice_path(n) for n in slice_names], slices_list)
        check_files_exist([self.volume_path(c) for c in val_cases], self.root / "val.list")
        check_files_exist([self.volume_path(c) for c in test_cases], self.root / "test.list")
        patients: dict[str, list[str]] = {}
        for name in slice_names:  # dicts keep first-appearance order = the list's patient order
            patients.setdefault(patient_of(name), []).append(name)
        return ListedData(list(patients.items()), val_cases, test_cases, listed_units=len(patients))

    def case_unit(self, case_id: str) -> str:
        return patient_of(case_id)

    def describe(self, kind: str, name: str) -> str:
        return str(self.slice_path(name) if kind == "item" else self.volume_path(name))

    def check_sample(self, kind, name, image, label, checks):
        check_stored_dtypes(image, label, self.describe(kind, name), checks)
        if image.size and not (image.min() >= 0.0 and image.max() <= 1.0):
            checks.problem(
                f"image values span [{image.min():.3g}, {image.max():.3g}]; the SSL4MIS files are min-max "
                "normalised per volume to [0, 1]",
                self.describe(kind, name),
                "convert the raw NIfTI with `python -m benchmark data convert acdc RAW OUT`",
            )

    def slice_path(self, name: str) -> Path:
        return self.root / "data" / "slices" / f"{name}.h5"

    def volume_path(self, case: str) -> Path:
        return self.root / "data" / f"{case}.h5"

    def load_item(self, item, with_label):
        arrays = read_h5(self.slice_path(item), ["image", "label"] if with_label else ["image"])
        return arrays["image"], arrays.get("label")

    def train_transform(self, rng: np.random.Generator, image, label):
        return acdc_train_transform(rng, image, label, self.patch_size)

    def load_case(self, case_id):
        arrays = read_h5(self.volume_path(case_id), ["image", "label"])
        # No spacing is stored in the SSL4MIS h5 files; the literature's metrics are in pixels
        # (docs/datasets.md#evaluation-conventions).
        return {"case": case_id, "image": arrays["image"], "label": arrays["label"], "spacing": None}
