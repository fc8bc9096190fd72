"""Dataset families and the registry of dataset names.

A name maps to a DataModule family, its protocol spec and where its data comes from: real data sets need a
DATA_ROOT; the synthetic ones are generated on first use in the same on-disk layout as the real ones, so the
very same loaders run on them (datamodules/registry.py).

The registry imports every family and with them Lightning (seconds); it is imported on the first use of one of
its names, so that the Lightning-free modules of this package (datamodules/listing.py: a data set's units counted
from its lists) load without it.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["DATASETS", "DatasetEntry", "DatasetSpec", "Split", "build_datamodule", "dataset_names", "get_dataset", "resolve_root"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("datamodules.registry"), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
