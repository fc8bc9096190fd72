"""Left atrium (2018 challenge) in the UA-MT h5 form: 3D random crops, sliding-window evaluation.

Layout (docs/datasets.md#la-files): ``<root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5`` ('image' float32 (X, Y, Z),
'label' uint8 {0, 1}); ``train.list`` (80 IDs) and ``test.list`` (20 IDs) at the root (MC-Net/BCP), inside the data
folder (DTC) or in a ``lists/`` folder. CRLF list files (FBA-Net's copies) are read fine.

The published protocol has no validation split (MC-Net, SS-Net, BCP and FBA-Net select on test.list). Here the
last ``val_holdout`` IDs of train.list (default 8) are held out of training entirely and used for model
selection; labeled = the first N of train.list as published (8 = "10 %", 16 = "20 %"), unlabeled = the rest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import UserError
from datamodules.base import (
    ListedData, SemiSupervisedDataModule, check_files_exist, check_stored_dtypes, read_h5, read_list,
)
from core.spec import DatasetSpec
from datamodules.listing import LA_DATA_FOLDER, check_val_holdout, la_lists_folder
from datamodules.transforms import la_train_transform

LA_SPEC = DatasetSpec(
    name="la",
    spatial_dims=3,
    in_channels=1,
    class_names=("background", "LA"),
    patch_size=(112, 112, 80),
    eval_mode="sliding_window",
    eval_stride=(18, 18, 4),
    spacing=(0.625, 0.625, 0.625),
    labeled_counts={0.05: 4, 0.1: 8, 0.2: 16, 1.0: 80},
    labeled_unit="case",
    # UA-MT's supervised loss: CE + Dice on the foreground channel only.
    dice_include_background=False,
)

DATA_FOLDER = LA_DATA_FOLDER


class LADataModule(SemiSupervisedDataModule):
    def lists_folder(self) -> Path:
        return la_lists_folder(self.root)

    def read_split(self):
        lists = self.lists_folder()
        if not (self.root / DATA_FOLDER).is_dir():
            raise UserError(
                f"LA data folder '{DATA_FOLDER}' (with a space) is missing",
                where=str(self.root),
                fix="DATA_ROOT is the folder that contains '2018LA_Seg_Training Set/<ID>/mri_norm2.h5'",
            )
        train_ids = read_list(lists / "train.list", "training")
        test_ids = read_list(lists / "test.list", "test")
        check_files_exist([self.case_path(i) for i in train_ids], lists / "train.list")
        check_files_exist([self.case_path(i) for i in test_ids], lists / "test.list")
        cut = check_val_holdout(self.val_holdout, len(train_ids), "cases")
        units = [(case, [case]) for case in train_ids[:cut]]
        return ListedData(units, train_ids[cut:], test_ids, listed_units=len(train_ids))

    def describe(self, kind: str, name: str) -> str:
        return str(self.case_path(name))

    def check_sample(self, kind, name, image, label, checks):
        check_stored_dtypes(image, label, self.describe(kind, name), checks)

    def case_path(self, case_id: str) -> Path:
        return self.root / DATA_FOLDER / case_id / "mri_norm2.h5"

    def load_item(self, item, with_label):
        arrays = read_h5(self.case_path(item), ["image", "label"] if with_label else ["image"])
        return arrays["image"], arrays.get("label")

    def train_transform(self, rng: np.random.Generator, image, label):
        return la_train_transform(rng, image, label, self.patch_size)

    def load_case(self, case_id):
        arrays = read_h5(self.case_path(case_id), ["image", "label"])
        return {"case": case_id, "image": arrays["image"], "label": arrays["label"], "spacing": self.spec.spacing}
