"""Dataset families and the registry of dataset names.

A name maps to a DataModule family, its protocol spec and where its data comes from: real data sets need a
DATA_ROOT; the synthetic ones are generated on first use in the same on-disk layout as the real ones, so the
very same loaders run on them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmark.errors import UserError, unknown_name
from datamodules.acdc import ACDC_SPEC, ACDCDataModule
from datamodules.base import SemiSupervisedDataModule, Split
from datamodules.la import LA_SPEC, LADataModule
from datamodules.spec import DatasetSpec


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
    # Synthetic stand-ins: same loaders, smaller images, no published labeled-count table (ratios round).
    "synthetic_acdc": DatasetEntry(
        ACDCDataModule, replace(ACDC_SPEC, name="synthetic_acdc", labeled_counts={}), "acdc", synthetic=True
    ),
    "synthetic_la": DatasetEntry(
        LADataModule, replace(LA_SPEC, name="synthetic_la", labeled_counts={}, spacing=None), "la", synthetic=True
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
    if root not in (None, ""):
        return Path(root).expanduser()
    if entry.synthetic:
        from datamodules.synthetic import ensure_synthetic

        return ensure_synthetic(name)
    raise UserError(
        f"dataset '{name}' needs DATA_ROOT (the folder holding {entry.layout_hint})",
        fix=f"e.g. make bench DATASET={name} DATA_ROOT=/path/to/{name.upper()}",
    )


def build_datamodule(name: str, config: dict[str, Any], use_unlabeled: bool = True) -> SemiSupervisedDataModule:
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
    )


__all__ = ["DATASETS", "DatasetEntry", "DatasetSpec", "Split", "build_datamodule", "dataset_names", "get_dataset", "resolve_root"]
