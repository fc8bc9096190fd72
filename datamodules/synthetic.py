"""The built-in synthetic data sets (``synthetic_acdc``, ``synthetic_la``, ``synthetic_kvasir``, ...) and the cache they
are generated into once, on first use (:func:`ensure_synthetic`).

Each data set has a generator of its own that writes the real data set's exact on-disk layout (names, list
formats, h5 keys, dtypes, value ranges, gzip; docs/datasets.md), so the very same loaders read it:
datamodules/synthetic_acdc.py, synthetic_la.py, synthetic_kvasir.py, synthetic_brats.py, synthetic_nuclei.py
(and, for tests only, synthetic_cadis.py and synthetic_endoscopy.py). The generated sets are learnable in a few
hundred CPU steps, but need shape and context, and vary enough across cases that one or two labeled patients
generalise clearly worse than twenty, which leaves room for what a semi-supervised method adds.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from core.errors import UserError, unknown_name
from datamodules.synthetic_acdc import write_acdc_layout
from datamodules.synthetic_kvasir import write_kvasir_layout
from datamodules.synthetic_la import write_la_layout

try:  # POSIX advisory locks; elsewhere only the rename race below protects concurrent callers.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


@dataclass(frozen=True)
class SyntheticDataset:
    """A built-in synthetic dataset: which writer makes it and with what arguments.

    The cache folder is ``<name>-v<version>``: bump ``version`` whenever the generated files change (new
    arguments or a changed drawing), so caches made by older code are not reused.
    """

    writer: Callable[..., Path] | str  # a function or "module:function" (imported on use, no import cycles)
    version: int
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


SYNTHETIC_DATASETS: dict[str, SyntheticDataset] = {
    # 30 patients x 2 frames, 6-9 slices of about 96 x 80: ~300 training slices, 20 val/test volumes.
    "synthetic_acdc": SyntheticDataset(
        write_acdc_layout,
        version=1,
        params=dict(
            n_train_patients=20, n_val_patients=4, n_test_patients=6, slices=(6, 9), shape=(96, 80), seed=0, frames=2
        ),
        description="cardiac short-axis-like slices, 4 classes (RV, Myo, LV), SSL4MIS ACDC layout",
    ),
    # 20 volumes of 72 x 64 x 40, lists at the root (MC-Net/BCP layout).
    "synthetic_la": SyntheticDataset(
        write_la_layout,
        version=1,
        params=dict(n_train=16, n_test=4, shape=(72, 64, 40), seed=0, lists_in="root"),
        description="atrium-like blob among distractors, binary, UA-MT LA layout",
    ),
    # 26 heads of 48 x 56 x 48 (z, y, x), brain-cropped to about 36 x 46 x 34.
    "synthetic_brats": SyntheticDataset(
        "datamodules.synthetic_brats:write_brats_layout",
        version=1,
        params=dict(n_train=16, n_val=4, n_test=6, shape=(48, 56, 48), seed=0, form="h5"),
        description="glioma-like lesions in a brain, flair + whole tumour, SSL4MIS BraTS 2019 h5 layout",
    ),
    # 16 H&E-like tiles of 200 x 200 (10 train, 2 val, 4 test).
    "synthetic_monuseg": SyntheticDataset(
        "datamodules.synthetic_nuclei:write_monuseg_layout",
        version=1,
        params=dict(n_train=10, n_val=2, n_test=4, shape=(200, 200), seed=0, image_suffix=".png"),
        description="H&E-like tiles with nuclei and look-alike cytoplasm, binary, MoNuSeg segmentation layout",
    ),
    # 80 RGB frames of about 88 x 104 with JPEG masks: 60 train / 10 val / 10 test.
    "synthetic_kvasir": SyntheticDataset(
        write_kvasir_layout,
        version=1,
        params=dict(n_train=60, n_val=10, n_test=10, shape=(88, 104), seed=0, mask_format="jpg"),
        description="colonoscopy-like RGB frames with one polyp, binary, Kvasir-SEG layout",
    ),
}


def _writer(dataset: SyntheticDataset) -> Callable[..., Path]:
    if callable(dataset.writer):
        return dataset.writer
    import importlib

    module, function = dataset.writer.split(":")
    return getattr(importlib.import_module(module), function)

CACHE_ENV = "SSL_BENCH_CACHE"
_PARTIAL_MARK = ".partial-"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ssl-medseg-bench").expanduser()


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``path`` (blocking). Yields whether a real lock is held.

    The kernel drops the lock when its holder dies, so a killed generation never blocks the next one.
    """
    if fcntl is None:
        yield False
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_synthetic(name: str, cache_dir: str | Path | None = None) -> Path:
    """The root of the built-in synthetic dataset ``name``, generated on first use.

    Looks in ``cache_dir``, else $SSL_BENCH_CACHE, else ~/.cache/ssl-medseg-bench. Generation writes into a
    temporary sibling folder that is renamed to ``<name>-v<version>`` only when complete, so the final folder
    exists if and only if the dataset is whole. Concurrent callers serialise on a lock file; without locks (or
    if the lock is not honoured, e.g. on some network file systems) the loser of the rename race discards its copy.
    """
    if name not in SYNTHETIC_DATASETS:
        raise unknown_name("synthetic dataset", name, SYNTHETIC_DATASETS)
    dataset = SYNTHETIC_DATASETS[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder_name = f"{name}-v{dataset.version}"
    final = cache / folder_name
    if final.is_dir():
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create the cache folder for synthetic data ({error})",
            where=str(cache),
            fix=f"set {CACHE_ENV} to a writable folder",
        ) from error

    with _exclusive_lock(cache / f"{folder_name}.lock") as locked:
        if final.is_dir():  # another process finished it while this one waited for the lock
            return final
        if locked:
            # Holding the lock means no generation is running, so leftovers are from killed ones.
            for stale in cache.glob(f".{folder_name}{_PARTIAL_MARK}*"):
                shutil.rmtree(stale, ignore_errors=True)
        # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide a shared cache from other users.
        partial = cache / f".{folder_name}{_PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        try:
            _writer(dataset)(partial, **dataset.params)
            try:
                os.rename(partial, final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(partial, ignore_errors=True)  # lost the race: an identical copy is already in place
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return final


__all__ = ["CACHE_ENV", "SYNTHETIC_DATASETS", "SyntheticDataset", "default_cache_dir", "ensure_synthetic"]
