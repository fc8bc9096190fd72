"""What the command line needs to know without importing the methods and datamodules (which import torch and
Lightning, several seconds): the method and dataset names and the converters of ``data convert``, each method's
declared defaults and data needs, and each dataset's description (family, DataModule, spec values) from which
benchmark/finalize.py finishes a config (``run --show-config``, sweep planning).

The names are read once from the registries themselves and kept in a small JSON file in the cache folder
($SSL_BENCH_CACHE, else ~/.cache/ssl-medseg-bench), named by a digest of every source file of ``methods/`` and
``datamodules/``: an edit to any of them makes a new file, so the catalogue cannot go stale; `--help` and `list`
then answer from it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("methods", "datamodules", "core")
CACHE_ENV = "SSL_BENCH_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ssl-medseg-bench").expanduser()


def fingerprint() -> str:
    """A digest of the source files the registries are built from."""
    digest = hashlib.sha256()
    for package in SOURCES:
        for path in sorted((PACKAGE_ROOT / package).glob("*.py")):
            digest.update(f"{package}/{path.name}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build() -> dict[str, Any]:
    """The catalogue, read from the registries (imports every method and datamodule)."""
    from datamodules import DATASETS
    from datamodules.convert import CONVERTERS
    from methods.registry import get_method, method_names

    return {
        "methods": method_names(),
        "method_facts": {name: method_facts(get_method(name), DATASETS) for name in method_names()},
        "datasets": {name: dataset_facts(entry) for name, entry in sorted(DATASETS.items())},
        "converters": {name: {"dataset": converter.dataset, "help": converter.help} for name, converter in sorted(CONVERTERS.items())},
    }


def method_facts(method_cls, datasets: dict[str, Any]) -> dict[str, Any]:
    """What resolving and finishing a config needs of a method class: its declared defaults, and the datasets it
    refuses (``check_dataset``) with the error's what, where and fix."""
    from core.errors import UserError

    refuses = {}
    for name, entry in sorted(datasets.items()):
        try:
            method_cls.check_dataset(entry.spec)
        except UserError as error:
            refuses[name] = [error.what, error.where, error.fix]
    return {"defaults": method_cls.defaults, "uses_unlabeled": method_cls.uses_unlabeled,
            "labeled_partitions": method_cls.labeled_partitions, "refuses": refuses}


def dataset_facts(entry) -> dict[str, Any]:
    """What finishing a config needs of a registered dataset (benchmark/finalize.py: DatasetDescription)."""
    spec = entry.spec
    return {
        "family": entry.family, "synthetic": entry.synthetic, "layout_hint": entry.layout_hint,
        "datamodule": entry.datamodule.__name__, "data_options": dict(entry.datamodule.data_options),
        "spec": {"name": spec.name, "patch_size": list(spec.patch_size), "labeled_unit": spec.labeled_unit,
                 "labeled_counts": [[ratio, count] for ratio, count in spec.labeled_counts.items()]},
    }


def catalogue() -> dict[str, Any]:
    """The catalogue of the sources as they are now: from the cache file, else built and stored (a cache folder
    that cannot be written only costs the time of building it)."""
    path = cache_dir() / f"catalogue-{fingerprint()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    built = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(built, indent=1))
        temporary.replace(path)
    except OSError:
        pass
    return built
