"""What the command line needs to know without importing the methods and datamodules (which import torch and
Lightning, several seconds): the method and dataset names and the converters of ``data convert``.

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
SOURCES = ("methods", "datamodules")
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
    from methods.registry import method_names

    return {
        "methods": method_names(),
        "datasets": {name: {"family": entry.family, "synthetic": entry.synthetic} for name, entry in sorted(DATASETS.items())},
        "converters": {name: {"dataset": converter.dataset, "help": converter.help} for name, converter in sorted(CONVERTERS.items())},
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
