"""The registry of dataset names (imported by ``datamodules`` on first use of one of its names).

A name maps to a DataModule family, its protocol spec and where its data comes from: real data sets need a
DATA_ROOT; the synthetic ones are generated on first use in the same on-disk layout as the real ones, so the
very same loaders run on them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.errors import unknown_name
from core.spec import DatasetSpec
from datamodules.acdc import ACDC_SPEC, ACDCDataModule
from datamodules.base import SemiSupervisedDataModule, Split
from datamodules.brats import BRATS_REGIONS_SPEC, BRATS_SPEC, BraTSDataModule
from datamodules.cadis import CADIS_SPECS, CaDISDataModule
from datamodules.endoscopy import (
    ART_NET_SPEC,
    ENDOVIS17_SPEC,
    KVASIR_INSTRUMENT_SPEC,
    KVASIR_SEG_SPEC,
    ROBOTOOL_SPEC,
    EndoVis17DataModule,
    ImageMaskFoldersDataModule,
    KvasirDataModule,
    KvasirInstrumentDataModule,
)
from datamodules.la import LA_SPEC, LADataModule
from datamodules.listing import data_root
from datamodules.nuclei import DSB_SPEC, NUCLEI_SPEC, DSB2018DataModule, MoNuSegDataModule


@dataclass(frozen=True)
class DatasetEntry:
    datamodule: type[SemiSupervisedDataModule]
    spec: DatasetSpec
    family: str  # the published protocol this name follows; method presets are keyed by it
    synthetic: bool = False
    layout_hint: str = ""


DATASETS: dict[str, DatasetEntry] = {
    "acdc": DatasetEntry(
        ACDCDataModule, ACDC_SPEC, "acdc",
        layout_hint="train_slices.list, val.list, test.list, data/slices/*.h5, data/*.h5 (SSL4MIS form)",
    ),
    "la": DatasetEntry(
        LADataModule, LA_SPEC, "la",
        layout_hint="'2018LA_Seg_Training Set/<ID>/mri_norm2.h5' with train.list and test.list (UA-MT form)",
    ),
    "brats": DatasetEntry(
        BraTSDataModule, BRATS_SPEC, "brats",
        layout_hint="train.txt, val.txt, test.txt with data/<ID>.h5 (SSL4MIS form) or the raw <ID>/<ID>_*.nii.gz folders",
    ),
    "brats_regions": DatasetEntry(
        BraTSDataModule, BRATS_REGIONS_SPEC, "brats",
        layout_hint="train.txt, val.txt, test.txt and the raw BraTS 2019 <ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz folders",
    ),
    "monuseg": DatasetEntry(
        MoNuSegDataModule, NUCLEI_SPEC, "monuseg",
        layout_hint="Train_Folder/, Val_Folder/, Test_Folder/ each with img/ and labelcol/",
    ),
    "dsb2018": DatasetEntry(
        DSB2018DataModule, DSB_SPEC, "dsb2018",
        layout_hint="stage1_train/<id>/images/<id>.png and stage1_train/<id>/masks/*.png",
    ),
    **{
        spec.name: DatasetEntry(
            CaDISDataModule, spec, "cadis",
            layout_hint="Video01 .. Video25, each with Images/ and Labels/ (the CaDIS 'segmentation' folder)",
        )
        for spec in CADIS_SPECS.values()
    },
    "kvasir_seg": DatasetEntry(
        KvasirDataModule, KVASIR_SEG_SPEC, "kvasir_seg",
        layout_hint="images/<id>.jpg, masks/<id>.jpg and train.txt, val.txt, test.txt (Kvasir layout)",
    ),
    # The other endoscopy sets follow Kvasir-SEG's protocol (MMS), so they share its presets (family kvasir_seg);
    # configs/datasets/<name>.yaml holds what differs.
    "kvasir_instrument": DatasetEntry(
        KvasirInstrumentDataModule, KVASIR_INSTRUMENT_SPEC, "kvasir_seg",
        layout_hint="images/<uuid>.jpg, masks/<uuid>.png and train.txt, test.txt (Kvasir-instrument download)",
    ),
    "endovis17": DatasetEntry(
        EndoVis17DataModule, ENDOVIS17_SPEC, "kvasir_seg",
        layout_hint="train/instrument_dataset_1..8, each with left_frames/ and ground_truth/<Instrument>_labels/",
    ),
    "art_net": DatasetEntry(
        ImageMaskFoldersDataModule, ART_NET_SPEC, "kvasir_seg",
        layout_hint="train/ and test/, each with image/ and mask/ of the same file names (as packaged by MMS)",
    ),
    "robotool": DatasetEntry(
        ImageMaskFoldersDataModule, ROBOTOOL_SPEC, "kvasir_seg",
        layout_hint="train/ and test/, each with image/ and mask/ of the same file names (as packaged by MMS)",
    ),
    # Synthetic stand-ins: same loaders, smaller images, no published labeled-count table (ratios round).
    "synthetic_acdc": DatasetEntry(
        ACDCDataModule, replace(ACDC_SPEC, name="synthetic_acdc", labeled_counts={}), "acdc", synthetic=True
    ),
    "synthetic_la": DatasetEntry(
        LADataModule, replace(LA_SPEC, name="synthetic_la", labeled_counts={}, spacing=None), "la", synthetic=True
    ),
    "synthetic_brats": DatasetEntry(
        BraTSDataModule, replace(BRATS_SPEC, name="synthetic_brats", labeled_counts={}), "brats", synthetic=True
    ),
    "synthetic_monuseg": DatasetEntry(
        MoNuSegDataModule, replace(NUCLEI_SPEC, name="synthetic_monuseg"), "monuseg", synthetic=True
    ),
    "synthetic_kvasir": DatasetEntry(
        KvasirDataModule, replace(KVASIR_SEG_SPEC, name="synthetic_kvasir"), "kvasir_seg", synthetic=True
    ),
}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def get_dataset(name: str) -> DatasetEntry:
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    return DATASETS[name]


def resolve_root(name: str, root: str | Path | None) -> Path:
    entry = get_dataset(name)
    return data_root(name, root, entry.synthetic, entry.layout_hint)


def build_datamodule(
    name: str, config: dict[str, Any], use_unlabeled: bool = True, labeled_partitions: int = 1
) -> SemiSupervisedDataModule:
    entry = get_dataset(name)
    data, trainer = config["data"], config["trainer"]
    return entry.datamodule(
        entry.spec,
        resolve_root(name, data.get("root")),
        patch_size=data["patch_size"],
        labeled_batch_size=data["labeled_batch_size"],
        unlabeled_batch_size=data["unlabeled_batch_size"],
        max_steps=trainer["max_steps"],
        seed=config["run"]["seed"],
        ratio=data.get("ratio"),
        labeled=data.get("labeled"),
        use_unlabeled=use_unlabeled,
        num_workers=data["num_workers"],
        cache_decoded=data.get("cache_decoded", True),
        val_holdout=data.get("val_holdout", 0),
        max_eval_cases=data.get("max_eval_cases"),
        labeled_partitions=labeled_partitions,
        options={key: data[key] for key in entry.datamodule.data_options if key in data},
    )


__all__ = ["DATASETS", "DatasetEntry", "DatasetSpec", "Split", "build_datamodule", "dataset_names", "get_dataset", "resolve_root"]
